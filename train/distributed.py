"""Data parallelism under torchrun: process group setup, small collectives, gradient-sync control.

`torchrun --nproc_per_node N -m train.concept ...` sets RANK / WORLD_SIZE / LOCAL_RANK; without
them everything here is a no-op for one process. NCCL on CUDA, gloo on CPU. Rank 0 writes files;
every rank computes the same thing on its own slice of each global batch, and DDP averages the
gradients during backward.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from defectsynth.device import resolve_device


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local_rank> when available else cpu; otherwise the named device
    (the one resolver of every stage: defectsynth/device.py)."""
    return resolve_device(name, local_rank)


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group if there is one; return this process's place in it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_ddp(module: nn.Module, info: DistInfo, find_unused_parameters: bool = False) -> nn.Module:
    """DistributedDataParallel around `module` when running on several processes, else `module`."""
    if not info.enabled:
        return module
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids,
                                   find_unused_parameters=find_unused_parameters)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def grad_sync(modules: list[nn.Module], sync: bool) -> contextlib.AbstractContextManager:
    """Forward + backward context for one micro-batch: DDP all-reduces gradients only when `sync`
    (the last micro-batch of an optimizer step); earlier micro-batches just accumulate locally."""
    stack = contextlib.ExitStack()
    if not sync:
        for m in modules:
            if isinstance(m, DistributedDataParallel):
                stack.enter_context(m.no_sync())
    return stack


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of `values` over ranks (a copy; `values` itself is untouched)."""
    out = values.detach().clone()
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= dist.get_world_size()
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank (e.g. a stop signal seen by one)."""
    if not dist.is_initialized():
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] for one process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@torch.no_grad()
def assert_replicas_identical(params: list[torch.Tensor], device: torch.device) -> None:
    """Raise if the ranks' copies of `params` differ: exact comparison of per-tensor float64 sums
    and sums of squares, gathered from every rank (cheap enough to run at every checkpoint)."""
    if not dist.is_initialized():
        return
    stats = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params])
    stats = stats.to(device)
    gathered = [torch.empty_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    for rank, other in enumerate(gathered[1:], start=1):
        if not torch.equal(gathered[0], other):
            bad = (gathered[0] != other).any(dim=1).nonzero().flatten().tolist()
            raise RuntimeError(f"data-parallel replicas diverged: rank {rank} differs from rank 0 "
                               f"in trainable tensors {bad[:10]}")


@contextlib.contextmanager
def distributed_session(device: str = "auto") -> Iterator[DistInfo]:
    """`setup_distributed` for the duration of a run; the process group is destroyed on the way
    out, also after an error."""
    try:
        yield setup_distributed(device)
    finally:
        cleanup_distributed()
