"""torchrun support: one process per device, gloo on CPU and NCCL on GPU, rank 0 logs and saves."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process runs; ``world_size == 1`` without torchrun."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device: str | None = None) -> Context:
    """Join the torchrun process group if there is one (``WORLD_SIZE`` > 1), else a single process.

    ``device``: ``"cuda"``/``"cpu"``; default CUDA when available. Under torchrun each process
    takes ``cuda:LOCAL_RANK``.
    """
    kind = device or ("cuda" if torch.cuda.is_available() else "cpu")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context(device=torch.device(kind))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        target = torch.device("cuda", local_rank)
    else:
        target = torch.device(kind)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if target.type == "cuda" else "gloo")
    return Context(rank, local_rank, world_size, target)


def mean(value: torch.Tensor, ctx: Context) -> torch.Tensor:
    """The mean of ``value`` over all processes (a copy; itself without torchrun)."""
    value = value.detach().clone()
    if ctx.distributed:
        dist.all_reduce(value)
        value /= ctx.world_size
    return value


def gather(obj, ctx: Context) -> list:
    """``obj`` from every rank, in rank order (``[obj]`` without torchrun)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def shutdown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
