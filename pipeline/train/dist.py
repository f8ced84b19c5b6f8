"""Rank helpers: the one place that asks torch.distributed who we are."""

from __future__ import annotations

import functools

import torch
import torch.distributed as td


def is_dist() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    return td.get_rank() if is_dist() else 0


def world_size() -> int:
    return td.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_dist():
        td.barrier()


def comm_device() -> torch.device:
    """Where tensors must be for collectives: NCCL reduces only CUDA tensors, gloo CPU ones."""
    if is_dist() and td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, whatever device ``x`` is on (a no-op on one process)."""
    if is_dist():
        y = x.to(comm_device())
        td.all_reduce(y, op=td.ReduceOp.SUM)
        if y is not x:
            x.copy_(y)
    return x


def all_reduce_host(values: list[int]) -> list[int]:
    """Sum integers the host already holds over ranks, on the CPU: beside NCCL over a gloo group of
    the same ranks, so the sum never waits for work queued on a GPU."""
    if not is_dist():
        return list(values)
    x = torch.tensor(values, dtype=torch.int64)
    td.all_reduce(x, op=td.ReduceOp.SUM, group=_cpu_group(td.group.WORLD) if td.get_backend() == "nccl" else None)
    return x.tolist()


@functools.cache
def _cpu_group(world):
    return td.new_group(backend="gloo")  # made on every rank at its first sum: a collective call


def all_gather_object(obj):
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]
