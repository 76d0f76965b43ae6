"""``torch.distributed`` helpers: no-ops in a single process, collectives under ``torchrun``.

gloo on CPU, NCCL on CUDA. Data-parallel training averages gradients every step; distributing
dictionaries assigns dictionary ``i`` to rank ``i % world_size`` and needs no gradient traffic.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = [
    "init_from_environment", "is_distributed", "rank", "world_size", "average_gradients", "sum_",
    "average_", "barrier", "gather_objects", "all_gather_rows", "local_device", "shutdown",
]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def init_from_environment(device: str = "") -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1); False when run alone."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_distributed():
        return is_distributed()
    use_cuda = torch.cuda.is_available() and not device.startswith("cpu")
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def local_device(requested: str) -> torch.device:
    """The training device of this rank: ``requested``, else this rank's GPU, else the CPU."""
    if requested:
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average ``.grad`` over ranks in one flattened all-reduce."""
    if not is_distributed():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns ``tensor``."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def average_(tensor: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(tensor)
        tensor /= world_size()
    return tensor


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj`` (in rank order) on every rank."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``[rows, ...]`` tensor (equal shapes) in rank order."""
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()
