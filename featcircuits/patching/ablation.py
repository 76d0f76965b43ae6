"""The one definition of each ablation, and batched mask application, for every kind of node.

Many ablation patterns run in one forward: the task's ``n`` prompts are repeated once per pattern
(copy-major batch ``[copies * n, ...]``) and every copy gets its own keep-mask. An ablated unit takes
its ablation value:

* ``zero``: 0;
* ``mean``: its mean over the task's clean prompts at the same position, counting only the prompts that
  reach that position (prompts of unequal length are right-padded; padding is never averaged in);
* ``patch``: its value in the corrupt run at the same position; where a corrupt prompt is shorter than
  its clean one (prompts aligned at their first token), the positions past its end keep the clean value.

Component nodes (heads, MLPs) and feature nodes (features, errors) both take their values from
:func:`ablation_value`, so one ablation means the same thing in every engine.
"""

from __future__ import annotations

import torch

__all__ = ["ABLATIONS", "check_ablation", "ablation_value", "mean_over_prompts", "repeat_copies", "mix",
           "pad_prompts", "held_at", "interpolation_alphas"]

ABLATIONS = ("zero", "mean", "patch")


def check_ablation(ablation: str) -> str:
    if ablation not in ABLATIONS:
        raise ValueError(f"Unknown ablation {ablation!r}; choose one of {ABLATIONS}.")
    return ablation


def _valid(lengths: torch.Tensor, like: torch.Tensor, pos_dim: int) -> torch.Tensor:
    """A mask broadcastable to ``like [n, ..., pos (at pos_dim), ...]``: True at each prompt's real positions."""
    positions = torch.arange(like.shape[pos_dim], device=like.device)
    valid = positions[None] < lengths.to(like.device)[:, None]  # [n, pos]
    shape = [1] * like.dim()
    shape[0], shape[pos_dim] = valid.shape
    return valid.view(shape)


def mean_over_prompts(values: torch.Tensor, lengths: torch.Tensor | None = None, pos_dim: int = 1) -> torch.Tensor:
    """``values [n, ..., pos, ...]`` -> ``[1, ..., pos, ...]``: per position, the mean over the prompts that
    reach it.

    ``lengths [n]``: each prompt's number of real positions (None: every position is real); ``pos_dim``:
    the positions' axis. A position no prompt reaches gets 0 (nothing reads it).
    """
    if lengths is None:
        return values.mean(0, keepdim=True)
    valid = _valid(lengths, values, pos_dim).to(values.dtype)
    total = (values * valid).sum(0, keepdim=True)
    return total / valid.sum(0, keepdim=True).clamp_min(1.0)


def ablation_value(ablation: str, clean: torch.Tensor, corrupt: torch.Tensor | None = None,
                   clean_lengths: torch.Tensor | None = None, corrupt_lengths: torch.Tensor | None = None,
                   pos_dim: int = 1) -> torch.Tensor:
    """The value an ablated unit takes, broadcastable to ``clean [n, ..., pos, ...]``.

    Args:
        ablation: ``zero``, ``mean`` or ``patch``.
        clean: the unit's values in the clean prompts, right-padded, positions on axis ``pos_dim``.
        corrupt: the same in the corrupt prompts (patch ablation), laid out like ``clean``.
        clean_lengths, corrupt_lengths: ``[n]`` real positions of each clean / corrupt prompt (None: all).
    """
    check_ablation(ablation)
    if ablation == "zero":
        return torch.zeros_like(clean[:1])
    if ablation == "mean":
        return mean_over_prompts(clean, clean_lengths, pos_dim)
    if corrupt is None:
        raise ValueError("Patch ablation needs the corrupt run's activations.")
    if corrupt_lengths is None:
        return corrupt
    return torch.where(_valid(corrupt_lengths, clean, pos_dim), corrupt, clean)


def pad_prompts(values: list[torch.Tensor], width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-prompt tensors ``[pos_i, ...]`` -> right-padded ``[n, width, ...]`` (zeros) and lengths ``[n]``."""
    width = width or max(v.shape[0] for v in values)
    padded = values[0].new_zeros(len(values), width, *values[0].shape[1:])
    for index, value in enumerate(values):
        padded[index, : value.shape[0]] = value
    lengths = torch.tensor([v.shape[0] for v in values], device=values[0].device)
    return padded, lengths


def repeat_copies(value: torch.Tensor, copies: int, n: int) -> torch.Tensor:
    """Repeat a per-prompt tensor ``[n, ...]`` (or a broadcast ``[1, ...]``) to ``[copies * n, ...]``."""
    if value.shape[0] == 1:
        return value.expand(copies * n, *value.shape[1:])
    return value.repeat(copies, *([1] * (value.dim() - 1)))


def mix(current: torch.Tensor, ablated: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``keep * current + (1 - keep) * ablated``; ``keep`` broadcasts (1 keeps, 0 ablates, between interpolates)."""
    keep = keep.to(current.dtype)
    return ablated + keep * (current - ablated)


def held_at(current: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``target``'s value, with gradients flowing into ``current`` as through the identity: attribution's
    linearisation point (``target`` the clean value for AtP, an IG point between clean and ablated)."""
    return current - current.detach() + target


def interpolation_alphas(steps: int, device: torch.device | str) -> torch.Tensor:
    """``[steps]`` points along clean -> ablated: 0 for AtP (``steps=1``), else the midpoints of ``steps``
    equal intervals (integrated gradients)."""
    alphas = torch.zeros(1) if steps == 1 else (torch.arange(steps) + 0.5) / steps
    return alphas.to(device)
