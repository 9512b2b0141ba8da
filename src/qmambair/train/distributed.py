"""Multi-process training with ``torchrun``: gloo on CPU, nccl on GPU; single process needs nothing.

``torchrun --nproc_per_node N -m qmambair train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; :func:`setup` reads them. How the trainer uses this:

- every rank builds the same model (same seed) and DDP broadcasts rank 0's parameters and buffers;
- data is sharded by sample index (``StepBatchSampler``): step t's global batch is split into contiguous
  per-rank shares, deterministically, so the union over ranks equals the single-process batch;
- gradients are averaged by DistributedDataParallel;
- QAT quantizers initialise on each rank's first batch, then rank 0's state is broadcast to all
  (``qmambair.quant.initialize_quantizers``) *before* DDP wraps the model;
- only rank 0 writes logs, checkpoints and the progress bar (:attr:`DistInfo.is_main`).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "setup", "cleanup", "barrier", "all_reduce_sum", "all_gather_object", "wrap", "unwrap"]


@dataclass(frozen=True)
class DistInfo:
    """This process's place: rank, number of processes, local rank, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def _device(request: str, local_rank: int) -> torch.device:
    if request in ("", "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(request)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {request!r} asked for, but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1); pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = _device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev)


def cleanup() -> None:
    """Leave the process group (no-op without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every process (no-op without a process group)."""
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over processes in place and return it (unchanged in a single process)."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` in a single process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: nn.Module, info: DistInfo, find_unused: bool = False) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes, else ``model``.

    ``find_unused``: some quantizers hold parameters that a step may not reach (DDP must then look for them).
    """
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
