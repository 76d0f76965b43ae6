"""Ablation values and batched mask application, shared by component and feature nodes.

Many ablation patterns run in one forward: the task's ``n`` prompts are repeated once per pattern
(copy-major batch ``[copies * n, ...]``) and every copy gets its own keep-mask. An ablated unit takes
its ablation value: zero, its mean over the task's clean prompts, or its value in the corrupt run.
"""

from __future__ import annotations

import torch

__all__ = ["ABLATIONS", "check_ablation", "ablation_value", "repeat_copies", "mix", "KEEP_ALL"]

ABLATIONS = ("zero", "mean", "patch")
KEEP_ALL = None


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; choose one of {ABLATIONS}.")
    return ablation


def ablation_value(ablation: str, clean: torch.Tensor, corrupt: torch.Tensor | None) -> torch.Tensor:
    """The value an ablated unit takes, broadcastable to ``clean`` ``[n, pos, ...]``.

    ``mean`` averages over the task's prompts (dim 0), keeping positions apart.
    """
    if ablation == "zero":
        return torch.zeros_like(clean[:1])
    if ablation == "mean":
        return clean.mean(0, keepdim=True)
    if corrupt is None:
        raise ValueError("Patch ablation needs the corrupt run's activations.")
    return corrupt


def repeat_copies(value: torch.Tensor, copies: int, n: int) -> torch.Tensor:
    """Repeat a per-prompt tensor ``[n, ...]`` (or a broadcast ``[1, ...]``) to ``[copies * n, ...]``."""
    if value.shape[0] == 1:
        return value.expand(copies * n, *value.shape[1:])
    return value.repeat(copies, *([1] * (value.dim() - 1)))


def mix(current: torch.Tensor, ablated: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep * current + (1 - keep) * ablated``; ``keep`` broadcasts (1 keeps, 0 ablates, between interpolates)."""
    keep = keep.to(current.dtype)
    return ablated + keep * (current - ablated)
