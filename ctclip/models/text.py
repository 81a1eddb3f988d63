"""Text side: CLIP BPE tokenizer (the vocabulary open_clip ships) and the CLIP text transformer.

The tower is open_clip's `TextTransformer` in OpenAI CLIP's layout (QuickGELU, causal mask, pooling
at the end-of-text token, which has the largest id), so OpenAI CLIP weights load key for key:
`token_embedding, positional_embedding, transformer.resblocks.*, ln_final, text_projection`.
`load_openai_text_weights` takes a full CLIP state dict or OpenAI's TorchScript archive and adapts
the position table to the configured context length.
"""

from __future__ import annotations

import functools
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ctclip.models.openclip_import import open_clip

SimpleTokenizer = open_clip.SimpleTokenizer
QuickGELU = open_clip.transformer.QuickGELU
TextTransformer = open_clip.transformer.TextTransformer

VOCAB_SIZE = 49408  # CLIP BPE: 256 bytes x2 + 48894 merges + start/end of text
TEXT_KEYS = ("token_embedding.", "positional_embedding", "transformer.resblocks.", "ln_final.", "text_projection")


@functools.lru_cache(maxsize=4)
def get_tokenizer(context_length: int = 77) -> SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer (lower-cased, cleaned; truncation keeps the end-of-text token)."""
    return SimpleTokenizer(context_length=context_length)


def tokenize(texts: list[str] | str, context_length: int = 77) -> torch.LongTensor:
    """(B, context_length) token ids; longer texts are truncated and still end with end-of-text."""
    return get_tokenizer(context_length)(texts, context_length=context_length)


def build_text_tower(context_length: int, width: int, layers: int, heads: int, embed_dim: int) -> TextTransformer:
    return TextTransformer(
        context_length=context_length,
        vocab_size=VOCAB_SIZE,
        width=width,
        heads=heads,
        layers=layers,
        output_dim=embed_dim,
        act_layer=QuickGELU,
        pool_type="argmax",
    )


TEXT_POOLS = ("eot", "mean", "sentence")
PERIOD_ID = 269  # "." in CLIP's BPE vocabulary (".</w>")
SOT_ID, EOT_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1


@functools.lru_cache(maxsize=1)
def _digit_ids() -> torch.Tensor:
    """(VOCAB_SIZE,) bool: the token is a number ("4</w>", "12"): a period between two of them is a decimal point."""
    table = torch.zeros(VOCAB_SIZE, dtype=torch.bool)
    for text, i in get_tokenizer().encoder.items():
        table[i] = text.removesuffix("</w>").isdigit()
    return table


def sentence_layout(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) ids -> (sentence index, position within the sentence, is a word token), each (B, L).

    A sentence ends with its period (a period between two numbers, "4.5 mm", is a decimal point and
    does not end one); the start and end tokens and the padding are not word tokens. The last sentence
    may lack its period (a truncated report)."""
    n, length = tokens.shape
    word = (tokens != 0) & (tokens != SOT_ID) & (tokens != EOT_ID)
    digit = _digit_ids().to(tokens.device)[tokens.clamp(0, VOCAB_SIZE - 1)]
    before = F.pad(digit[:, :-1], (1, 0))
    after = F.pad(digit[:, 1:], (0, 1))
    end = (tokens == PERIOD_ID) & ~(before & after)
    sentence = torch.cumsum(end.long(), dim=1) - end.long()  # the period belongs to its own sentence
    idx = torch.arange(length, device=tokens.device).expand(n, -1)
    starts = F.pad(end[:, :-1] | (tokens[:, :-1] == SOT_ID), (1, 0), value=True)
    first = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return sentence, idx - first, word


@dataclass
class Sentences:
    """The sentences of a text batch, each encoded on its own (text pool "sentence"): `features` (S, D), the text
    each belongs to (`text`, S), and `group` (S): identical sentences (the same word tokens) anywhere in the batch
    share one, so that "No pleural effusion was detected." in ten reports is known as one sentence."""

    features: torch.Tensor
    text: torch.Tensor
    group: torch.Tensor

    def select(self, keep: torch.Tensor) -> Sentences:
        return Sentences(self.features[keep], self.text[keep], self.group[keep])


def encode_tokens(tower: TextTransformer, tokens: torch.Tensor, pool: str = "eot", causal: bool = True) -> torch.Tensor:
    """`tower(tokens)` computed only up to the batch's longest text; `pool` "mean" averages the final
    token features over each text's tokens (start and end tokens included, padding excluded) instead of
    taking the end-of-text token's. `causal` False (with "mean" or "sentence") lets every token attend to the whole
    text instead of to the tokens before it (padding never attended to): in "Pleural effusion is not
    present." the finding's own tokens then see the negation, where under the causal mask only the words
    after "not" can. `pool` "sentence" (non-causal only) encodes each sentence on its own: a token attends
    to the tokens of its sentence, positions count from the sentence's start, and the text is the mean of
    its sentences' token means (`sentence_layout` says where sentences end), so a one-sentence prompt is
    embedded exactly as the same sentence inside a report.

    The tokenizer pads every text to the context length (a long context holds whole CT-RATE reports), but
    with the causal mask nothing after a text's end-of-text token reaches the token the tower pools, so
    the padding columns change nothing and cost most of the work when reports vary in length. Equal to
    the full forward up to float rounding (tests/test_ctclip_models.py).
    """
    if pool not in TEXT_POOLS:
        raise ValueError(f"text pool must be one of {TEXT_POOLS}, got {pool!r}")
    if not causal and pool == "eot":
        raise ValueError("a non-causal text tower needs text pool 'mean' or 'sentence' (the end token is the causal "
                         "summary)")
    if causal and pool == "sentence":
        raise ValueError("text pool 'sentence' needs a non-causal text tower (text_causal false)")
    if not _plain_layout(tower):
        if pool != "eot":
            raise ValueError(f"text pool {pool!r} needs a text tower without a CLS token")
        return tower(tokens)  # layouts this shortcut does not cover
    length = _longest(tokens)
    if length >= tokens.shape[1] and pool == "eot":
        return tower(tokens)
    cut = tokens[:, :length]
    if pool == "sentence":
        return _project(tower, _encode_sentences(tower, cut)[0])
    x = tower.token_embedding(cut).to(tower.transformer.get_cast_dtype())
    x = x + tower.positional_embedding[:length].to(x.dtype)
    mask = tower.attn_mask[:length, :length] if causal else _padding_mask(cut, tower, x.dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=mask))
    if pool == "mean":
        keep = (cut != 0).unsqueeze(-1).to(x.dtype)
        pooled = (x * keep).sum(dim=1) / keep.sum(dim=1).clamp_min(1)
    else:
        pooled = x[torch.arange(x.shape[0], device=x.device), cut.argmax(dim=-1)]
    return _project(tower, pooled)


def encode_sentences(tower: TextTransformer, tokens: torch.Tensor) -> tuple[torch.Tensor, Sentences]:
    """`encode_tokens` with pool "sentence" (non-causal), and each sentence's own projected features: the report
    embedding is the mean of these, and a one-sentence prompt is embedded as the same sentence in a report."""
    if not _plain_layout(tower):
        raise ValueError("sentence features need a text tower without a CLS token")
    per_text, sentences = _encode_sentences(tower, tokens[:, :_longest(tokens)], with_sentences=True)
    sentences.features = _project(tower, sentences.features)
    return _project(tower, per_text), sentences


def _plain_layout(tower: TextTransformer) -> bool:
    """No CLS token, argmax pooling and a causal mask buffer: the layout the shortcuts here are written for."""
    return tower.cls_emb is None and tower.pool_type == "argmax" and tower.attn_mask is not None


def _longest(tokens: torch.Tensor) -> int:
    """The batch's longest text in tokens (at least 1): the columns after it are padding for every text."""
    return max(int((tokens != 0).sum(dim=1).max()), 1)


def _project(tower: TextTransformer, pooled: torch.Tensor) -> torch.Tensor:
    if isinstance(tower.text_projection, torch.nn.Linear):
        return tower.text_projection(pooled)
    return pooled @ tower.text_projection if tower.text_projection is not None else pooled


def _additive_mask(allowed: torch.Tensor, tower: TextTransformer, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) bool, True where a query may attend -> additive (B * heads, L, L) mask for the tower's blocks."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return mask.repeat_interleave(tower.transformer.resblocks[0].attn.num_heads, dim=0)


def _padding_mask(cut: torch.Tensor, tower: TextTransformer, dtype: torch.dtype) -> torch.Tensor:
    """Every query sees the text's real tokens, never its padding."""
    return _additive_mask((cut != 0)[:, None, :].expand(-1, cut.shape[1], -1), tower, dtype)


def _encode_sentences(tower: TextTransformer, cut: torch.Tensor, with_sentences: bool = False
                      ) -> tuple[torch.Tensor, Sentences | None]:
    """(B, L) ids -> (B, W) pooled features of the "sentence" pool, before the projection, and with
    `with_sentences` each sentence's (S, W) features, text and group of identical sentences.

    The sentences of the whole batch (their word tokens only) are packed into rows as long as the longest
    sentence, several short ones to a row (`pack_sentences`), each at positions from 0, with a mask that
    lets a token attend to the tokens of its own sentence only. A token then sees exactly what it would
    under a (B, L, L) sentence mask over the reports, but the attention costs ~(tokens x longest sentence)
    instead of (tokens x longest report), and padding is nearly gone (32 synthetic reports of 266 tokens on
    average: a text tower training step 1.77x less CPU, `benchmarks/bench_text_pool.py`). Token features are
    averaged per sentence over its words, then per text over its sentences; a text without words gives
    zeros."""
    n, length = cut.shape
    sentence, position, word = sentence_layout(cut)
    width = tower.ln_final.normalized_shape[0]
    key = (torch.arange(n, device=cut.device).unsqueeze(1) * length + sentence)[word]
    if key.numel() == 0:
        dtype = tower.transformer.get_cast_dtype()
        none = torch.zeros(0, dtype=torch.long, device=cut.device)
        return (torch.zeros(n, width, device=cut.device, dtype=dtype),
                Sentences(torch.zeros(0, width, device=cut.device, dtype=dtype), none, none) if with_sentences else None)
    first_keys, sid = torch.unique(key, sorted=True, return_inverse=True)  # sid: each word token's sentence
    lengths = torch.bincount(sid)
    row, offset, capacity = (torch.as_tensor(a, device=cut.device) for a in pack_sentences(lengths.cpu().numpy()))
    pos = position[word]
    r, c = row[sid], offset[sid] + pos
    rows = int(row.max()) + 1
    packed = torch.zeros(rows, int(capacity), dtype=cut.dtype, device=cut.device)
    packed[r, c] = cut[word]
    at = torch.zeros_like(packed)
    at[r, c] = pos
    segment = torch.full_like(packed, -1)  # padding: its own segment, never seen by a word token
    segment[r, c] = sid
    x = tower.token_embedding(packed).to(tower.transformer.get_cast_dtype())
    x = x + tower.positional_embedding[at].to(x.dtype)
    mask = _additive_mask(segment[:, :, None] == segment[:, None, :], tower, x.dtype)
    x = tower.ln_final(tower.transformer(x, attn_mask=mask))[r, c]  # (tokens, W)
    sums = torch.zeros(len(lengths), width, dtype=x.dtype, device=x.device).index_add_(0, sid, x)
    means = sums / lengths.unsqueeze(-1).to(x.dtype)
    text = first_keys // length
    per_text = torch.zeros(n, width, dtype=x.dtype, device=x.device).index_add_(0, text, means)
    per_text = per_text / torch.bincount(text, minlength=n).clamp_min(1).unsqueeze(-1).to(x.dtype)
    if not with_sentences:
        return per_text, None
    words = torch.zeros(len(lengths), int(capacity), dtype=cut.dtype, device=cut.device)
    words[sid, pos] = cut[word]  # each sentence's word tokens from position 0, zero-padded
    group = torch.unique(words, dim=0, return_inverse=True)[1]
    return per_text, Sentences(means, text, group)


def pack_sentences(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Sentence lengths (S,) -> (row, offset within the row) of each sentence and the row length (the longest
    sentence): first-fit decreasing, so rows are nearly full and no sentence is split. One numpy step per
    sentence (~850 for 32 reports: a few ms, against ~0.5 s for a training step)."""
    capacity = int(lengths.max())
    row = np.empty(len(lengths), dtype=np.int64)
    offset = np.empty(len(lengths), dtype=np.int64)
    free = np.full(len(lengths), capacity, dtype=np.int64)  # at most one row per sentence
    used = 0
    for i in np.argsort(-lengths, kind="stable"):
        k = int(np.argmax(free[:used + 1] >= lengths[i]))  # row `used` is still empty: it always fits
        row[i], offset[i] = k, capacity - free[k]
        free[k] -= lengths[i]
        used += k == used
    return row, offset, capacity


def read_clip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP checkpoint as a state dict: OpenAI's TorchScript archives or plain (wrapped) state dicts."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CLIP weights file not found: {path}")
    if zipfile.is_zipfile(path) and any(n.endswith("/constants.pkl") for n in zipfile.ZipFile(path).namelist()):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a CLIP state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_openai_text_weights(tower: TextTransformer, path: str | Path) -> None:
    """Initialise `tower` from the text keys of a full OpenAI-layout CLIP checkpoint.

    Context lengths other than the file's are handled by truncating (shorter) or linearly interpolating
    (longer) the position table; width, depth, vocabulary or projection mismatches raise ValueError.
    """
    state = read_clip_state_dict(path)
    text = {k: v for k, v in state.items() if k.startswith(TEXT_KEYS)}
    missing = [k for k in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection")
               if k not in text]
    if missing:
        raise ValueError(f"{path}: not an OpenAI-layout CLIP checkpoint, missing {missing} "
                         "(open_clip checkpoints of custom-text models keep these under 'text.')")
    vocab, width = text["token_embedding.weight"].shape
    layers = len({m.group(1) for k in text if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    proj = tuple(text["text_projection"].shape)
    want_proj = (tower.width, tower.output_dim)
    problems = []
    if width != tower.width:
        problems.append(f"text width {width} (token_embedding {tuple(text['token_embedding.weight'].shape)}) "
                        f"!= text_width {tower.width}")
    if vocab != tower.vocab_size:
        problems.append(f"vocabulary {vocab} != {tower.vocab_size}")
    if layers != len(tower.transformer.resblocks):
        problems.append(f"{layers} text layers != text_layers {len(tower.transformer.resblocks)}")
    if proj != want_proj:
        problems.append(f"text_projection {proj} != (text_width, embed_dim) {want_proj}")
    if problems:
        raise ValueError(f"{path}: text weights do not fit the configured text tower: " + "; ".join(problems))
    text["positional_embedding"] = resize_positional_embedding(text["positional_embedding"], tower.num_pos)
    tower.load_state_dict(text, strict=True)


def resize_positional_embedding(pos: torch.Tensor, length: int) -> torch.Tensor:
    """(L, W) -> (length, W): the first `length` rows when shorter, linear interpolation when longer."""
    if pos.shape[0] >= length:
        return pos[:length].clone()
    grown = F.interpolate(pos.float().T.unsqueeze(0), size=length, mode="linear", align_corners=True)
    return grown[0].T.to(pos.dtype).contiguous()
