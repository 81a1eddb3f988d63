"""Symmetric InfoNCE (CLIP) loss over the global batch, and its gradient-accumulation variant.

Conventions shared by every function here:
- features are (batch, dim) and expected to be L2-normalised already (the model does it); the loss
  does not normalise them;
- ``logit_scale`` is the multiplicative temperature, i.e. ``exp`` of the learnable log-scale, as a
  scalar tensor (gradient flows into it) or a float;
- row ``i`` of the volume features and row ``i`` of the text features are a positive pair.

Distributed semantics (the point of this module): each rank's loss is the mean, over its own rows,
of the cross-entropies against ALL columns of the global batch. The mean of the per-rank losses is
the single-process loss on the concatenated batch, and after DDP averages the parameter gradients
they equal the single-process gradients, because ``gather_features`` sends each rank's column
gradients back to the rank that owns the rows (see there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    if _dist_ready():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_equal_sizes(sizes: Sequence[int], device: torch.device, what: str) -> None:
    """Raise the same clear error on every rank if ranks disagree on ``sizes`` (one small all_gather)."""
    mine = torch.tensor(list(sizes), dtype=torch.long, device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    table = torch.stack(everyone).tolist()
    if any(row != table[0] for row in table):
        raise ValueError(
            f"{what}: every rank must hold the same number of rows; got per-rank sizes {table}. "
            "Use drop_last=True in the DistributedSampler/DataLoader so local batches are equal."
        )


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from all ranks in rank order, without gradient."""
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts, dim=0)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and returns this rank's rows.

    Every rank's loss uses every rank's features as columns. Returning only the local part of the
    local gradient (the "put the local tensor back in its slot" trick alone) would drop
    d loss_s / d features_r for s != r, and the DDP-averaged gradient would no longer be the
    single-process one. Summing over ranks (a reduce-scatter; all_reduce + slice here, which gloo
    supports too) restores those terms.
    """

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.rows = dist.get_rank(), features.shape[0]
        return _all_gather_cat(features)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_unchecked(features: torch.Tensor) -> torch.Tensor:
    if not _dist_ready():
        return features
    if not features.requires_grad:
        return _all_gather_cat(features)
    gathered = _GatherWithGrad.apply(features)
    # Put the local tensor itself into its slot so autograd sees this rank's rows directly
    # (identical values; the slot of the gathered tensor then carries no gradient of its own).
    rank, rows = dist.get_rank(), features.shape[0]
    return torch.cat([gathered[: rank * rows], features, gathered[(rank + 1) * rows :]], dim=0)


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' ``features`` (rows, ...) concatenated in rank order; identity without a process group.

    If ``features`` requires grad, the result is differentiable: this rank's slot is the local tensor
    itself, and the gradient that reaches the other slots is summed over all ranks in backward and
    delivered to the rank owning those rows. So every rank must call backward (as under DDP).
    Ranks must hold the same number of rows; otherwise a ValueError is raised on every rank.
    """
    if not _dist_ready():
        return features
    _check_equal_sizes([features.shape[0]], features.device, "gather_features")
    return _gather_unchecked(features)


def clip_logits(
    volume_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process logits: ``(logits_per_volume, logits_per_text)``, each (B_v, B_t) / (B_t, B_v)."""
    logits_per_volume = logit_scale * volume_feats @ text_feats.T
    return logits_per_volume, logits_per_volume.T


def _symmetric_ce(
    local_v: torch.Tensor,
    local_t: torch.Tensor,
    all_v: torch.Tensor,
    all_t: torch.Tensor,
    logit_scale: torch.Tensor | float,
    offset: int,
) -> torch.Tensor:
    labels = torch.arange(offset, offset + local_v.shape[0], device=local_v.device)
    logits_v = logit_scale * local_v @ all_t.T
    logits_t = logit_scale * local_t @ all_v.T
    return (F.cross_entropy(logits_v, labels) + F.cross_entropy(logits_t, labels)) / 2


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the global batch.

    ``forward(volume_feats, text_feats, logit_scale)`` with local (B, D) features returns this rank's
    ``(CE(volume->text) + CE(text->volume)) / 2``, each a mean over the B local rows, whose logits are
    the local rows against the gathered columns of all ranks (labels offset by ``rank * B``). The mean
    over ranks equals the single-process loss on the concatenated batch; with DDP's gradient averaging
    the gradients equal the single-process ones too. Without a process group it is the plain CLIP loss.
    """

    def forward(
        self, volume_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        if volume_feats.shape != text_feats.shape:
            raise ValueError(
                f"volume {tuple(volume_feats.shape)} and text {tuple(text_feats.shape)} features differ"
            )
        rank, _ = _rank_world()
        if _dist_ready():
            _check_equal_sizes([volume_feats.shape[0]], volume_feats.device, "ClipLoss")
        all_v = _gather_unchecked(volume_feats)
        all_t = _gather_unchecked(text_feats)
        return _symmetric_ce(
            volume_feats, text_feats, all_v, all_t, logit_scale, rank * volume_feats.shape[0]
        )


def contrastive_loss_with_cached(
    volume_feats_chunk: torch.Tensor,
    text_feats_chunk: torch.Tensor,
    cached_volume: Sequence[torch.Tensor],
    cached_text: Sequence[torch.Tensor],
    chunk_index: int,
    logit_scale: torch.Tensor | float,
) -> torch.Tensor:
    """CLIP loss of the whole accumulated batch, differentiable only through micro-batch ``chunk_index``.

    Gradient accumulation that keeps every negative (feature caching):

    1. run the model without grad on the K local micro-batches and keep their features
       (``cached_volume[k]``, ``cached_text[k]``: this rank's features of micro-batch k, (m_k, D));
    2. for each k: recompute micro-batch k WITH grad, call this function with its features and
       ``chunk_index=k``, and ``backward()`` the result, letting the gradients add up;
    3. one optimizer step.

    The features of micro-batch ``chunk_index`` replace their cached slot (all ranks' cached features
    are gathered inside, without gradient; the current chunks are gathered with gradient), and the
    result is ClipLoss over the full global batch of W ranks x K micro-batches: this rank's rows (all
    its K micro-batches) against all columns. Its value is therefore the same for every k and equals
    the full-batch loss (report it once, do NOT divide by K), and the sum over k of the gradients (and,
    with DDP, their mean over ranks) equals the gradient of the full-batch loss: gradient reaches the
    model only through the current chunk, and ``logit_scale``, which every call uses, has its gradient
    scaled by 1/K so that it too adds up to the full-batch value.

    Exactness needs the recomputed features to equal the cached ones (deterministic forward: same
    dropout masks or none, same AMP settings). Every rank must hold the same micro-batch sizes.
    """
    k_chunks = len(cached_volume)
    if len(cached_text) != k_chunks:
        raise ValueError(f"{k_chunks} cached volume chunks but {len(cached_text)} cached text chunks")
    if not 0 <= chunk_index < k_chunks:
        raise IndexError(f"chunk_index {chunk_index} outside the {k_chunks} cached micro-batches")
    sizes = [int(c.shape[0]) for c in cached_volume]
    if [int(c.shape[0]) for c in cached_text] != sizes:
        raise ValueError("cached volume and text chunks have different sizes")
    for name, chunk, cached in (
        ("volume", volume_feats_chunk, cached_volume[chunk_index]),
        ("text", text_feats_chunk, cached_text[chunk_index]),
    ):
        if chunk.shape != cached.shape:
            raise ValueError(
                f"{name} chunk {tuple(chunk.shape)} does not match its cached slot {tuple(cached.shape)}"
            )

    start = sum(sizes[:chunk_index])
    stop = start + sizes[chunk_index]
    rank, world = _rank_world()
    if _dist_ready():
        _check_equal_sizes(sizes, volume_feats_chunk.device, "contrastive_loss_with_cached")

    def assemble(chunk: torch.Tensor, cached: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        local_cache = torch.cat([c.detach() for c in cached], dim=0)
        local = torch.cat([local_cache[:start], chunk, local_cache[stop:]], dim=0)
        if world == 1:
            return local, local
        # Rank-major layout (rank r's K micro-batches in order), current chunk swapped in on every rank.
        cache_all = _all_gather_cat(local_cache).view(world, local_cache.shape[0], *local_cache.shape[1:])
        chunk_all = _gather_unchecked(chunk).view(world, chunk.shape[0], *chunk.shape[1:])
        glob = torch.cat([cache_all[:, :start], chunk_all, cache_all[:, stop:]], dim=1)
        return local, glob.reshape(-1, *local_cache.shape[1:])

    local_v, all_v = assemble(volume_feats_chunk, cached_volume)
    local_t, all_t = assemble(text_feats_chunk, cached_text)
    if isinstance(logit_scale, torch.Tensor) and logit_scale.requires_grad:
        # Same value, gradient / K: the K calls each see the full-batch loss through logit_scale.
        frozen = logit_scale.detach()
        logit_scale = frozen + (logit_scale - frozen) / k_chunks
    return _symmetric_ce(local_v, local_t, all_v, all_t, logit_scale, rank * local_v.shape[0])


def sentence_image_loss(sentences: torch.Tensor, text: torch.Tensor, group: torch.Tensor, volume_feats: torch.Tensor,
                        logit_scale: torch.Tensor | float, match_cos: float = 0.0) -> torch.Tensor:
    """Each sentence of the batch's reports against the batch's volumes (this rank's only).

    `sentences` (S, D) are the sentences' own embeddings, `text` (S,) the report (= volume row) each comes
    from, `group` (S,) shared by identical sentences. A sentence's target is uniform over the volumes whose
    report holds the same sentence: "No pleural effusion was detected." belongs to every volume whose report
    says it, "Bilateral pleural effusion." to those whose report says that. The loss is the cross-entropy of
    the softmax over the volumes against that target, averaged over the sentences; a sentence that every
    report of the batch holds tells no volume apart and is left out (0 when none is left). Where the report
    loss sees a finding only through the whole report, this gives every sentence its own gradient, in the
    form zero-shot scoring reads the model: one sentence against a volume.

    With `match_cos` > 0 a sentence's targets are also the volumes whose report holds a sentence with at least
    that cosine to it (the embeddings as given, detached, so the text tower's own sense of "says the same").
    Identical sentences alone make every other wording of a finding a negative: "Lymphadenopathy is present."
    is pushed away from the volumes whose report says "Enlarged lymph nodes up to 24 mm are seen in the
    mediastinum.", though zero-shot scoring needs it near them.
    """
    n = volume_feats.shape[0]
    if sentences.shape[0] == 0:
        return volume_feats.sum() * 0.0
    holds = torch.zeros(int(group.max()) + 1, n, dtype=torch.bool, device=volume_feats.device)
    holds[group, text] = True
    target = holds[group]  # (S, n): the volumes whose report holds this sentence
    if match_cos > 0:
        with torch.no_grad():
            f = sentences.detach()
            closest = torch.full((f.shape[0], n), -2.0, dtype=f.dtype, device=f.device)
            # closest[s, j]: the highest cosine between sentence s and a sentence of report j
            closest.scatter_reduce_(1, text.unsqueeze(0).expand(f.shape[0], -1), f @ f.T, reduce="amax")
            target = target | (closest >= match_cos)
    informative = ~target.all(dim=1)
    if not bool(informative.any()):
        return volume_feats.sum() * 0.0
    target = target[informative].to(volume_feats.dtype)
    logp = (logit_scale * sentences[informative] @ volume_feats.T).log_softmax(dim=-1)
    return -((logp * target).sum(dim=1) / target.sum(dim=1)).mean()
