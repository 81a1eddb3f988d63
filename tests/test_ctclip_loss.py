"""CLIP loss over the global batch, feature-cached gradient accumulation, distributed setup.

The multi-process tests run 2 real gloo ranks on CPU (tests/ddp_utils.py) and compare against one
process on the joined batch, with a plain two-cross-entropy implementation as the oracle.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ctclip.losses import (
    ClipLoss,
    clip_logits,
    contrastive_loss_with_cached,
    gather_features,
    sentence_image_loss,
)
from ctcore.distributed import (
    DistInfo,
    all_reduce_mean,
    barrier,
    broadcast_object,
    cleanup_distributed,
    expand_slurm_nodelist,
    init_distributed,
    read_launch_env,
)
from tests.ddp_utils import free_port, run_distributed

VOL_IN, TEXT_IN, EMBED = 6, 5, 4
LAUNCH_VARS = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_LOCALID",
    "SLURM_NTASKS", "SLURM_NPROCS", "SLURM_NODELIST", "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
    "SLURM_JOB_ID",
)  # fmt: skip


class TwoTower(nn.Module):
    """Stand-in for the CLIP model: two linear towers, normalised features, learnable temperature."""

    def __init__(self) -> None:
        super().__init__()
        self.volume = nn.Linear(VOL_IN, EMBED)
        self.text = nn.Linear(TEXT_IN, EMBED)
        self.log_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_vol: torch.Tensor, x_text: torch.Tensor):
        v = F.normalize(self.volume(x_vol), dim=-1)
        t = F.normalize(self.text(x_text), dim=-1)
        return v, t, self.log_scale.exp()


def make_model() -> TwoTower:
    torch.manual_seed(0)
    return TwoTower()


def make_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, VOL_IN, generator=gen), torch.randn(n, TEXT_IN, generator=gen)


def reference_loss(v: torch.Tensor, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The textbook CLIP loss on the full logits matrix: the oracle for everything else."""
    logits = scale * v @ t.T
    labels = torch.arange(v.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def reference_grads(x_vol: torch.Tensor, x_text: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of a fresh model, one process, whole batch."""
    model = make_model()
    loss = reference_loss(*model(x_vol, x_text))
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Max-abs check. (torch.testing.assert_close imports torch.distributed.tensor, and with it sympy,
    once a process group exists: seconds per spawned rank.)"""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual.detach() - expected.detach()).abs().max().item()
    assert err <= atol, f"{what}: max abs difference {err:.3g} > {atol:g}"


def assert_grads_close(model: nn.Module, expected: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    for name, p in model.named_parameters():
        name = name.removeprefix("module.")
        assert_close(p.grad, expected[name], atol, f"gradient of {name}")


def cached_accumulation_step(
    model: nn.Module, chunks: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[float]:
    """Feature-cached accumulation as a training loop does it; returns the loss of every micro-step."""
    with torch.no_grad():
        cached = [model(xv, xt) for xv, xt in chunks]
    cached_v, cached_t = [c[0] for c in cached], [c[1] for c in cached]
    losses = []
    for k, (xv, xt) in enumerate(chunks):
        v, t, scale = model(xv, xt)
        loss = contrastive_loss_with_cached(v, t, cached_v, cached_t, k, scale)
        loss.backward()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- single process


def test_clip_loss_matches_reference_and_is_symmetric():
    gen = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(7, EMBED, generator=gen), dim=-1).requires_grad_()
    t = F.normalize(torch.randn(7, EMBED, generator=gen), dim=-1).requires_grad_()
    scale = torch.tensor(14.0, requires_grad=True)
    loss = ClipLoss()(v, t, scale)
    assert_close(loss, reference_loss(v, t, scale), 1e-6, "loss vs reference")
    assert_close(loss, ClipLoss()(t, v, scale), 1e-6, "loss with volume and text swapped")

    per_volume, per_text = clip_logits(v, t, scale)
    assert_close(per_volume, scale * v @ t.T, 1e-6, "logits per volume")
    assert_close(per_text, per_volume.T, 0, "logits per text")

    loss.backward()
    for grad in (v.grad, t.grad, scale.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_sentence_image_loss_matches_a_loop_over_the_sentences():
    """Each sentence's cross-entropy over the volumes against a uniform target on the volumes whose report holds the
    same sentence; a sentence every report holds is left out."""
    torch.manual_seed(0)
    v = F.normalize(torch.randn(4, 8), dim=-1)
    # (report, group): group 0 is in every report (left out), group 1 in reports 0 and 2, 2 in 1, 3 in 3
    pairs = [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (2, 1), (1, 2), (3, 3)]
    text = torch.tensor([r for r, _ in pairs])
    group = torch.tensor([g for _, g in pairs])
    s = F.normalize(torch.randn(len(pairs), 8), dim=-1).requires_grad_()
    scale = 12.0
    expected = []
    for i, (_, g) in enumerate(pairs):
        holders = sorted({r for r, h in pairs if h == g})
        if len(holders) == 4:
            continue
        logits = [scale * float(s[i].detach() @ v[k]) for k in range(4)]
        log_z = math.log(sum(math.exp(x) for x in logits))
        expected.append(-sum(logits[k] - log_z for k in holders) / len(holders))
    loss = sentence_image_loss(s, text, group, v, scale)
    assert float(loss.detach()) == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    loss.backward()
    assert s.grad[:4].abs().sum() == 0 and s.grad[4:].abs().sum() > 0  # group 0 tells nothing apart
    # nothing informative, or no sentences at all: 0, still differentiable
    for keep in (slice(0, 4), slice(0, 0)):
        zero = sentence_image_loss(s[keep], text[keep], group[keep], v.requires_grad_(), scale)
        assert float(zero.detach()) == 0.0
        zero.backward()



def test_sentence_image_loss_with_match_cos_counts_close_wordings_as_targets():
    """With match_cos, a sentence's targets are also the volumes whose report holds a sentence at least that
    cosine-similar to it (two wordings of one finding), and nothing else; the similarity carries no gradient."""
    torch.manual_seed(1)
    v = F.normalize(torch.randn(4, 8), dim=-1)
    base = F.normalize(torch.randn(8), dim=0)
    close = F.normalize(base + 0.2 * F.normalize(torch.randn(8), dim=0), dim=0)  # another wording: cos ~0.98
    far = [F.normalize(torch.randn(8), dim=0) for _ in range(3)]
    # report 0 says `base`, report 1 `close`, reports 2 and 3 something else; reports 0 and 1 share far[2]
    s = torch.stack([base, close, far[0], far[1], far[2], far[2]]).requires_grad_()
    text = torch.tensor([0, 1, 2, 3, 0, 1])
    group = torch.tensor([0, 1, 2, 3, 4, 4])
    cos = float(base @ close)
    assert cos > 0.9 and max(float(s[i].detach() @ s[j].detach()) for i in (0, 1) for j in (2, 3, 4)) < cos
    scale = 10.0

    def oracle(targets: list[list[int]]) -> float:
        out = []
        for i, holders in enumerate(targets):
            logits = [scale * float(s[i].detach() @ v[k]) for k in range(4)]
            log_z = math.log(sum(math.exp(x) for x in logits))
            out.append(-sum(logits[k] - log_z for k in holders) / len(holders))
        return sum(out) / len(out)

    exact = [[0], [1], [2], [3], [0, 1], [0, 1]]
    matched = [[0, 1], [0, 1], [2], [3], [0, 1], [0, 1]]
    def value(match_cos: float = 0.0) -> float:
        return float(sentence_image_loss(s, text, group, v, scale, match_cos=match_cos).detach())

    assert value() == pytest.approx(oracle(exact), rel=1e-5)
    assert value(cos - 0.01) == pytest.approx(oracle(matched), rel=1e-5)
    assert value(min(cos + 0.01, 1.0)) == pytest.approx(oracle(exact), rel=1e-5)
    loss = sentence_image_loss(s, text, group, v, scale, match_cos=cos - 0.01)
    loss.backward()  # through the logits only
    assert torch.isfinite(s.grad).all()

def test_clip_loss_rejects_mismatched_features():
    with pytest.raises(ValueError, match="differ"):
        ClipLoss()(torch.randn(3, EMBED), torch.randn(4, EMBED), 1.0)


def test_gather_features_is_identity_without_group():
    x = torch.randn(3, EMBED)
    assert gather_features(x) is x


@pytest.mark.parametrize("sizes", [(3, 3, 3, 3), (2, 5, 1)])
def test_cached_accumulation_equals_big_batch(sizes):
    x_vol, x_text = make_batch(sum(sizes))
    expected_loss, expected = reference_grads(x_vol, x_text)

    model = make_model()
    chunks = list(zip(x_vol.split(list(sizes)), x_text.split(list(sizes))))
    losses = cached_accumulation_step(model, chunks)
    assert losses == pytest.approx([expected_loss] * len(sizes), abs=1e-6)
    assert_grads_close(model, expected)


def test_cached_accumulation_validates_its_inputs():
    cached = [torch.randn(2, EMBED), torch.randn(2, EMBED)]
    chunk = torch.randn(2, EMBED)
    with pytest.raises(IndexError):
        contrastive_loss_with_cached(chunk, chunk, cached, cached, 2, 1.0)
    with pytest.raises(ValueError, match="cached slot"):
        contrastive_loss_with_cached(torch.randn(3, EMBED), torch.randn(3, EMBED), cached, cached, 0, 1.0)
    with pytest.raises(ValueError, match="text chunks"):
        contrastive_loss_with_cached(chunk, chunk, cached, cached[:1], 0, 1.0)


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu17", ["gpu17"]),
        ("a[8-10],b3", ["a8", "a9", "a10", "b3"]),
        ("n[098-101]-ib", ["n098-ib", "n099-ib", "n100-ib", "n101-ib"]),
        ("r[1-2]c[1,3]", ["r1c1", "r1c3", "r2c1", "r2c3"]),
    ],
)
def test_expand_slurm_nodelist(nodelist, hosts):
    assert expand_slurm_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node[a-b]", "node[4-1]", "n[1[2]]", ""])
def test_expand_slurm_nodelist_rejects_garbage(bad):
    with pytest.raises(ValueError):
        expand_slurm_nodelist(bad)


def test_launch_env_from_slurm_and_torchrun_precedence():
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_NODELIST": "gpu[03-06]",
        "SLURM_JOB_ID": "123456",
    }
    env = read_launch_env(slurm)
    assert env is not None and env.launcher == "slurm"
    assert (env.rank, env.local_rank, env.world_size) == (5, 1, 8)
    assert (env.master_addr, env.master_port) == ("gpu03", 20000 + 123456 % 10000)
    env = read_launch_env({**slurm, "MASTER_ADDR": "head", "MASTER_PORT": "1234"})
    assert (env.master_addr, env.master_port) == ("head", 1234)

    torchrun = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "29400"}
    env = read_launch_env({**slurm, **torchrun})  # torchrun inside a SLURM allocation
    assert env.launcher == "torchrun" and (env.rank, env.local_rank, env.world_size) == (3, 1, 4)
    assert read_launch_env({}) is None
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "1"})


def test_init_distributed_from_slurm_env_single_task(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_NODELIST", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    info = init_distributed(True, device="cpu")
    try:
        assert info == DistInfo(
            rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend="gloo"
        )
        assert info.distributed and info.is_main
        assert all_reduce_mean(torch.tensor([2, 4])).tolist() == [2.0, 4.0]
    finally:
        cleanup_distributed(info)
    assert not dist.is_initialized() and not info.distributed
    cleanup_distributed(info)  # twice is harmless


def test_init_distributed_without_launcher_env_is_a_clear_error(monkeypatch):
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        init_distributed(True)


def test_single_process_info_and_noop_collectives():
    info = init_distributed(False)
    expected_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert info == DistInfo(rank=0, local_rank=0, world_size=1, device=expected_device, backend=None)
    assert info.is_main and not info.distributed
    assert init_distributed(False, device="cpu").device == torch.device("cpu")
    obj = {"a": 1}
    assert broadcast_object(obj) is obj
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_mean(t) is t
    barrier()
    cleanup_distributed(info)


# ---------------------------------------------------------------- two gloo processes

GLOBAL_BATCH = 8


def _naive_gather(x: torch.Tensor) -> torch.Tensor:
    """Local tensor put back into its slot, nothing else: the cross-rank gradient terms are lost."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts)


def _ddp_clip_loss(rank: int, world_size: int) -> None:
    info = init_distributed(True, device="cpu")  # from the torchrun variables set by run_distributed
    assert info == DistInfo(
        rank=rank, local_rank=rank, world_size=world_size, device=torch.device("cpu"), backend="gloo"
    )
    assert info.distributed and info.is_main == (rank == 0)
    assert broadcast_object({"run": "abc"} if rank == 0 else None) == {"run": "abc"}
    assert all_reduce_mean(torch.tensor(float(rank))).item() == pytest.approx((world_size - 1) / 2)
    barrier()

    x_vol, x_text = make_batch(GLOBAL_BATCH)
    expected_loss, expected = reference_grads(x_vol, x_text)
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)

    model = make_model()
    v, t, scale = model(x_vol[local], x_text[local])
    gathered = gather_features(v)
    assert_close(gathered, model(x_vol, x_text)[0], 1e-6, "gathered volume features")
    loss = ClipLoss()(v, t, scale)
    assert all_reduce_mean(loss).item() == pytest.approx(expected_loss, abs=1e-5)
    loss.backward()
    for p in model.parameters():  # what DDP does to the gradients
        p.grad = all_reduce_mean(p.grad)
    assert_grads_close(model, expected)

    # The slot trick alone is not enough: without summing column gradients over ranks, gradients differ.
    naive = make_model()
    v, t, scale = naive(x_vol[local], x_text[local])
    labels = torch.arange(v.shape[0]) + rank * v.shape[0]
    bad_v = F.cross_entropy(scale * v @ _naive_gather(t).T, labels)
    bad = (bad_v + F.cross_entropy(scale * t @ _naive_gather(v).T, labels)) / 2
    bad.backward()
    worst = max(
        (all_reduce_mean(p.grad) - expected[n]).abs().max().item() for n, p in naive.named_parameters()
    )
    assert worst > 1e-3

    # Unequal local batches: the same clear error on every rank, not a hang or a garbled gather.
    with pytest.raises(ValueError, match="same number of rows"):
        gather_features(torch.randn(2 + rank, EMBED))
    barrier()
    cleanup_distributed(info)


def _ddp_cached_accumulation(rank: int, world_size: int, chunk_sizes: tuple[int, ...]) -> None:
    info = init_distributed(True, device="cpu")  # reuses the group run_distributed created
    assert (info.rank, info.world_size, info.backend) == (rank, world_size, "gloo")
    per_rank = sum(chunk_sizes)
    x_vol, x_text = make_batch(per_rank * world_size)
    expected_loss, expected = reference_grads(x_vol, x_text)
    local = slice(rank * per_rank, (rank + 1) * per_rank)

    model = DistributedDataParallel(make_model())  # averages gradients over ranks, as in training
    chunks = list(zip(x_vol[local].split(list(chunk_sizes)), x_text[local].split(list(chunk_sizes))))
    with torch.no_grad():
        cached = [model(xv, xt) for xv, xt in chunks]
    cached_v, cached_t = [c[0] for c in cached], [c[1] for c in cached]
    for k, (xv, xt) in enumerate(chunks):
        last = k == len(chunks) - 1
        with nullcontext() if last else model.no_sync():  # one gradient all-reduce per optimizer step
            v, t, scale = model(xv, xt)
            loss = contrastive_loss_with_cached(v, t, cached_v, cached_t, k, scale)
            loss.backward()
        assert all_reduce_mean(loss).item() == pytest.approx(expected_loss, abs=1e-5)
    assert_grads_close(model, expected)


@pytest.mark.ddp
def test_ddp_two_ranks_match_one_process():
    run_distributed(_ddp_clip_loss, 2, init_group=False)


@pytest.mark.ddp
def test_ddp_cached_accumulation_matches_one_process():
    run_distributed(_ddp_cached_accumulation, 2, (2, 1, 3))


def _fail_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("rank one exploded")
    dist.barrier()  # rank 0 would wait forever without the helper terminating it


@pytest.mark.ddp
def test_run_distributed_reports_child_failures():
    with pytest.raises(AssertionError, match="rank one exploded"):
        run_distributed(_fail_on_rank_one, 2, timeout_s=30)
