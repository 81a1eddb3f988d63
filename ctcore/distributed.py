"""Process-group setup for single-process, torchrun and SLURM runs, and a few collective helpers.

One process, no process group::

    python scripts/ctclip_train.py ...   (or scripts/hemorrhage_train.py)

One node, N GPUs (torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)::

    torchrun --nproc_per_node=N scripts/ctclip_train.py --use_ddp ...

Several nodes under SLURM, one task per GPU (SLURM sets SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS,
SLURM_NODELIST; the first host of the node list becomes the master unless MASTER_ADDR is set)::

    srun --ntasks-per-node=4 --gpus-per-node=4 python scripts/ctclip_train.py ...   (or scripts/hemorrhage_train.py)se_ddp ...

torchrun launched inside a SLURM allocation works too: the torchrun variables take precedence.
NCCL is the backend on CUDA, gloo on CPU. The collective helpers below are no-ops without a
process group, so the same training code runs in every mode.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT = 29500


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job. ``backend`` is None when no process group was created."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or is_initialized()


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout and rendezvous address read from the launcher's environment variables."""

    launcher: str  # "torchrun" or "slurm"
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM host list such as ``node[01-04,07],gpu-a[1-2]-ib`` into host names.

    Handles comma-separated host expressions, any number of bracket groups per expression (their
    cartesian product, in order), ranges that keep zero padding (``[08-10]`` -> 08, 09, 10) and
    single values. That covers what SLURM writes into SLURM_NODELIST; no ``scontrol`` needed.
    """
    hosts: list[str] = []
    for expr in _split_top_level(nodelist.strip()):
        pieces = list(re.finditer(r"([^\[\]]+)|\[([^\[\]]*)\]", expr))
        if "".join(m.group(0) for m in pieces) != expr:
            raise ValueError(f"cannot parse SLURM host expression {expr!r} (nested brackets?)")
        parts = [[m.group(1)] if m.group(1) else _expand_bracket(m.group(2), expr) for m in pieces]
        hosts.extend("".join(combo) for combo in itertools.product(*parts))
    if not hosts:
        raise ValueError(f"empty SLURM node list {nodelist!r}")
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    exprs, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
        elif ch == "," and depth == 0:
            exprs.append(nodelist[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced brackets in SLURM node list {nodelist!r}")
    exprs.append(nodelist[start:])
    return [e.strip() for e in exprs if e.strip()]


def _expand_bracket(body: str, expr: str) -> list[str]:
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None:
            raise ValueError(f"cannot parse {item!r} in SLURM host expression {expr!r}")
        lo, hi = match.group(1), match.group(2) or match.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in SLURM host expression {expr!r}")
        width = len(lo)
        values.extend(str(v).zfill(width) for v in range(int(lo), int(hi) + 1))
    return values


def read_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Read the launcher's variables; None when neither torchrun nor SLURM variables are present."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise RuntimeError(
                f"RANK/WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun"
            )
        rank = int(env["RANK"])
        return LaunchEnv(
            launcher="torchrun",
            rank=rank,
            local_rank=int(env.get("LOCAL_RANK", rank)),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env["MASTER_ADDR"],
            master_port=int(env["MASTER_PORT"]),
        )
    if "SLURM_PROCID" in env and ("SLURM_NTASKS" in env or "SLURM_NPROCS" in env):
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        else:
            nodelist = next(
                (env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_NODELIST", "SLURM_JOB_NODELIST") if k in env),
                None,
            )
            if nodelist is None:
                raise RuntimeError("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_NODELIST is")
            master_addr = expand_slurm_nodelist(nodelist)[0]
        if "MASTER_PORT" in env:
            master_port = int(env["MASTER_PORT"])
        elif "SLURM_JOB_ID" in env:
            # Same port in every task of a job; different jobs sharing a node rarely collide.
            master_port = 20000 + int(env["SLURM_JOB_ID"]) % 10000
        else:
            master_port = DEFAULT_MASTER_PORT
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))),
            master_addr=master_addr,
            master_port=master_port,
        )
    return None


def _device_type(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return dev.type


def init_distributed(use_ddp: bool, device: str | None = None) -> DistInfo:
    """Create the process group (if ``use_ddp``) and pick this process's device.

    ``use_ddp=False``: one process, rank 0 of 1; ``device`` if given, else CUDA if available, else CPU.
    ``use_ddp=True``: rank layout from the torchrun variables (RANK, LOCAL_RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT), else from SLURM (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, master =
    first host of SLURM_NODELIST, port MASTER_PORT or derived from SLURM_JOB_ID). On CUDA the device
    is ``cuda:<local_rank>`` (set as the current device) and the backend NCCL; on CPU it is gloo.
    ``device`` chooses the device type only ("cpu" forces gloo on a GPU machine); under DDP a CUDA
    index other than the local rank is an error. If a process group already exists it is reused.
    """
    if not use_ddp:
        if device is None:
            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            _device_type(device)
            dev = torch.device(device)
        if dev.type == "cuda" and dev.index is not None:
            torch.cuda.set_device(dev)
        return DistInfo(rank=0, local_rank=0, world_size=1, device=dev, backend=None)

    if not dist.is_available():
        raise RuntimeError("--use_ddp was given but this torch build has no torch.distributed")
    launch = read_launch_env()
    if launch is None and not is_initialized():
        raise RuntimeError(
            "--use_ddp was given but no launcher environment was found: expected the torchrun variables "
            "(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) or SLURM's (SLURM_PROCID, "
            "SLURM_LOCALID, SLURM_NTASKS, SLURM_NODELIST). Launch with `torchrun --nproc_per_node=N ...` "
            "or `srun ...`, or drop --use_ddp for a single process."
        )
    dev_type = _device_type(device)
    if device is not None and dev_type == "cuda":
        index = torch.device(device).index
        local = launch.local_rank if launch is not None else None
        if index is not None and index != local:
            raise ValueError(
                f"under DDP the CUDA index is the local rank ({local}); pass device='cuda', not {device!r}"
            )

    if is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = launch.local_rank if launch is not None else rank
    else:
        rank, local_rank, world = launch.rank, launch.local_rank, launch.world_size
    if dev_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible on this node"
            )
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")

    if not is_initialized():
        backend = "nccl" if dev_type == "cuda" else "gloo"
        if launch.launcher == "torchrun":
            # torchrun's agent already serves the store at MASTER_PORT: env:// reuses it, tcp:// would clash.
            init_method = "env://"
        else:
            init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
        dist.init_process_group(
            backend=backend,
            init_method=init_method,
            rank=rank,
            world_size=world,
            device_id=dev if dev_type == "cuda" else None,
        )
    return DistInfo(
        rank=rank, local_rank=local_rank, world_size=world, device=dev, backend=dist.get_backend()
    )


def cleanup_distributed(info: DistInfo | None = None) -> None:
    """Destroy the process group if one exists (safe to call in every mode, and twice)."""
    if is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (picklable objects); ``obj`` itself without a group."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks, as a new detached tensor (integers become float32).

    Without a process group ``t`` is returned unchanged. Meant for logging metrics, not gradients.
    """
    if not is_initialized():
        return t
    out = t.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(dist.get_world_size())


def barrier() -> None:
    """Wait for every rank; no-op without a process group."""
    if is_initialized():
        dist.barrier()
