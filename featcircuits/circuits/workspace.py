"""Scratch buffers that outlive one batched forward.

A batched edge-patching forward writes several tensors of tens of MB per layer (senders' differences, the
removed edges' sums, per-head inputs) and throws them away. Fresh allocations that large come from the
operating system as new pages, and on CPU touching them the first time costs about as much as the write
itself; reusing one buffer per role across forwards avoids that. The buffers stay allocated while their
owner (a :class:`~featcircuits.circuits.ComponentGraph`) lives.
"""

from __future__ import annotations

import math

import torch

__all__ = ["Workspace"]


class Workspace:
    """One reusable buffer per role; a role's tensor is valid until the next :meth:`take` of that role."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(self, role: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in the buffer of ``role``."""
        numel = math.prod(shape)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffers[role] = like.new_empty(numel)
        return buffer[:numel].view(shape)
