"""What must hold before a training run starts (raised as SetupError before any step): the inputs,
the stores' shape and layout, and a resumed checkpoint's compatibility."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctclip.checkpoint import check_model_config
from ctclip.data.dataset import CTReportDataset
from ctclip.data.preprocess import check_layout
from ctclip.data.store import VolumeStore
from ctclip.zeroshot import load_templates
from ctcore.errors import UsageError

if TYPE_CHECKING:
    from ctclip.run.train import TrainConfig

log = logging.getLogger("ctclip.run.train")  # the training job's warnings, under the job's name


class SetupError(UsageError):
    """The run cannot start; raised before any training step, with a message naming the problem."""


def check_inputs(cfg: TrainConfig, data: CTReportDataset) -> None:
    if data.n_without_volume:
        log.warning("%d report rows of %s have no volume in %s and are not used", data.n_without_volume,
                    cfg.txt_filepath, cfg.ct_filepath)
    if data.n_empty_text == len(data):
        raise SetupError(f"every report in {cfg.txt_filepath} is empty for --text_column {cfg.text_column}")
    if data.n_empty_text:
        log.warning("%d of %d training reports have an empty %s", data.n_empty_text, len(data), cfg.text_column)
    if cfg.do_validate and (cfg.val_ct_filepath is None or cfg.val_label_path is None):
        raise SetupError("--do_validate needs --val_ct_filepath and --val_label_path")
    if cfg.cache_features and not cfg.model.freeze_dinov2:
        raise SetupError("--cache_features needs --freeze_dinov2 (a trained backbone changes its features)")
    if cfg.text_view_weight < 0 or not 0.0 < cfg.text_view_keep <= 1.0:
        raise SetupError(f"--text_view_weight must be >= 0 and --text_view_keep in (0, 1], got {cfg.text_view_weight} "
                         f"and {cfg.text_view_keep}")
    if cfg.text_view_weight and cfg.grad_accum != 1:
        raise SetupError("--text_view_weight needs --grad_accum 1 (the second view is not accumulated)")
    if not 0.0 < cfg.slice_keep <= 1.0:
        raise SetupError(f"--slice_keep must be in (0, 1], got {cfg.slice_keep}")
    if cfg.sentence_weight < 0:
        raise SetupError(f"--sentence_weight must be >= 0, got {cfg.sentence_weight}")
    if not 0.0 <= cfg.sentence_match_cos <= 1.0:
        raise SetupError(f"--sentence_match_cos must be in [0, 1], got {cfg.sentence_match_cos}")
    if not cfg.sentence_weight and cfg.sentence_match_cos:
        # not an error: a config may shape the term and a command line turn it off with --sentence_weight 0
        log.warning("--sentence_match_cos %s shapes the sentence term, which is off (--sentence_weight 0): it has "
                    "no effect", cfg.sentence_match_cos)
    if cfg.sentence_weight and cfg.grad_accum != 1:
        raise SetupError("--sentence_weight needs --grad_accum 1 (the sentence term is not accumulated)")
    if cfg.sentence_weight and cfg.model.text_pool != "sentence":
        raise SetupError(f"--sentence_weight needs a model with text_pool 'sentence' (this one has "
                         f"{cfg.model.text_pool!r}): only then is a report the mean of its sentences' embeddings")
    if cfg.cache_features and cfg.volume_shift:
        raise SetupError("--volume_shift moves the volumes, --cache_features encodes each volume once: use one")
    if cfg.do_validate:
        try:
            load_templates(cfg.val_templates)
        except ValueError as e:
            raise SetupError(str(e).replace("--templates", "--val_templates")) from e
    _warn_truncation(cfg, data)


def _warn_truncation(cfg: TrainConfig, data: CTReportDataset, sample: int = 2000) -> None:
    """Reports longer than the text context are cut: whatever comes after the cut (with
    findings_impressions, the whole impression) never reaches the text tower. Checked on a sample."""
    from ctclip.models.text import get_tokenizer

    tok = get_tokenizer(cfg.model.context_length)
    texts = data.texts[:: max(1, len(data.texts) // sample)]
    lengths = [len(tok.encode(t)) + 2 for t in texts]  # + start and end of text
    cut = sum(n > cfg.model.context_length for n in lengths)
    if cut:
        log.warning("%d of %d sampled reports (%s) are longer than the context length %d tokens (longest %d) "
                    "and are truncated; see --context_length / --text_column", cut, len(texts), cfg.text_column,
                    cfg.model.context_length, max(lengths))


def _store_facts(path: Path) -> tuple[list[int], str]:
    """The volume shape and the stored layout (axis codes) of a store."""
    with VolumeStore(path) as s:
        return [int(x) for x in s.file_attrs()["target_shape"]], s.axis_codes()


def check_stores(cfg: TrainConfig) -> tuple[list[int], str]:
    """The training store's volume shape and layout; a validation store must have the same layout."""
    store_shape, store_layout = _store_facts(Path(cfg.ct_filepath))
    if cfg.do_validate:
        problem = check_layout(str(cfg.val_ct_filepath), _store_facts(Path(cfg.val_ct_filepath))[1],
                               f"this run (training store {cfg.ct_filepath})", store_layout)
        if problem:
            raise SetupError(problem.replace("was trained on", "trains on"))
    return store_shape, store_layout


def check_resume(cfg: TrainConfig, ckpt: dict[str, Any], path: Path, store_shape: list[int], store_layout: str) -> None:
    """A checkpoint resumes only the same architecture on volumes of the same shape and layout."""
    check_model_config(ckpt["model_config"], asdict(cfg.model), path)
    if ckpt["store_shape"] != store_shape:
        raise SetupError(f"{cfg.ct_filepath} holds volumes of shape {store_shape}, but {path} was "
                         f"trained on {ckpt['store_shape']}")
    problem = check_layout(str(cfg.ct_filepath), store_layout, str(path), ckpt.get("store_layout"))
    if problem:
        raise SetupError(problem)
