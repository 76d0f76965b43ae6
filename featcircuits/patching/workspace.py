"""Scratch buffers that outlive one batched forward.

A batched edge-patching forward writes several tensors of tens of MB per layer (senders' differences, the
removed edges' sums, per-head inputs) and throws them away. On CPU, fresh allocations that large come from
the operating system as new pages, and touching them the first time costs about as much as the write itself;
reusing one buffer per role across forwards avoids that. The buffers stay allocated while their owner (a
:class:`~featcircuits.circuits.ComponentGraph`) lives, up to a byte budget; past it, and on accelerators
(whose caching allocators already reuse memory), tensors are allocated fresh.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Workspace"]


class Workspace:
    """One reusable buffer per role; a role's tensor is valid until the next :meth:`take` of that role.

    Args:
        max_bytes: the most memory the cached buffers may hold together.
    """

    def __init__(self, max_bytes: int = 2**30) -> None:
        self.max_bytes = max_bytes
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in the buffer of ``role``."""
        if like.device.type != "cpu":
            return like.new_empty(shape)
        numel = math.prod(shape)
        buffer = self._buffers.pop(role, None)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            held = sum(kept.numel() * kept.element_size() for kept in self._buffers.values())
            buffer = like.new_empty(numel)
            if held + buffer.numel() * buffer.element_size() > self.max_bytes:
                return buffer.view(shape)  # over budget: used once, not kept
        self._buffers[role] = buffer
        return buffer[:numel].view(shape)
