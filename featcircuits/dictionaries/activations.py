"""Sparsifying activation functions, each a small registered module.

Every activation maps encoder pre-activations ``[..., d_sae]`` to feature activations of the same shape.
Each says whether it is ``elementwise`` (a feature's activation depends on its own pre-activation alone),
which feature-edge ACDC relies on to skip edges into features nobody reads. New ones register with
:func:`register_activation` and become available to every dictionary kind,
the file formats and the trainer by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "register_activation", "make_activation", "ReLU", "TopK", "BatchTopK", "JumpReLU"]

ACTIVATIONS: dict[str, type[nn.Module]] = {}

_ActivationClass = TypeVar("_ActivationClass", bound=type[nn.Module])


def register_activation(name: str) -> Callable[[_ActivationClass], _ActivationClass]:
    # the class comes back as itself (type[TopK], not type[nn.Module]), so its own attributes stay typed
    def add(cls: _ActivationClass) -> _ActivationClass:
        ACTIVATIONS[name] = cls
        setattr(cls, "name", name)  # noqa: B010 -- any nn.Module subclass registers; none declares `name`
        return cls

    return add


@register_activation("relu")
class ReLU(nn.Module):
    """``max(0, pre)``; sparsity comes from an L1 penalty during training."""

    elementwise = True  # each feature's activation depends on its own pre-activation alone

    def __init__(self, d_sae: int, k: int | None = None) -> None:
        super().__init__()

    def forward(self, pre_acts: torch.Tensor) -> torch.Tensor:
        return pre_acts.relu()


def topk_scatter(pre_acts: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest entries of the last axis (then ReLU), zero the rest."""
    values, indices = pre_acts.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre_acts).scatter_(-1, indices, values.relu())


@register_activation("topk")
class TopK(nn.Module):
    """The ``k`` largest pre-activations per token survive (ReLU applied to them)."""

    elementwise = False  # which features fire depends on every pre-activation at the token

    def __init__(self, d_sae: int, k: int | None = None) -> None:
        super().__init__()
        if not k or k < 1 or k > d_sae:
            raise ValueError(f"TopK needs 1 <= k <= d_sae={d_sae}; got k={k}. Set the config's k.")
        self.k = k

    def forward(self, pre_acts: torch.Tensor) -> torch.Tensor:
        return topk_scatter(pre_acts, self.k)


@register_activation("batchtopk")
class BatchTopK(nn.Module):
    """``k * n_tokens`` largest pre-activations across a training batch; at inference a global threshold.

    The threshold (a scalar buffer) is the mean smallest activation a batch selection keeps, which the
    trainer measures with the final weights; in eval mode the activation is a JumpReLU with that one
    threshold for every feature, so a token's features no longer depend on the rest of its batch.
    """

    elementwise = True  # at inference (the graphs and circuits run in eval mode)
    threshold: torch.Tensor  # a registered buffer (nn.Module's __getattr__ would type it Tensor | Module)

    def __init__(self, d_sae: int, k: int | None = None) -> None:
        super().__init__()
        if not k or k < 1 or k > d_sae:
            raise ValueError(f"BatchTopK needs 1 <= k <= d_sae={d_sae}; got k={k}. Set the config's k.")
        self.k = k
        self.register_buffer("threshold", torch.zeros(()))

    def forward(self, pre_acts: torch.Tensor) -> torch.Tensor:
        if self.training:
            flat = pre_acts.reshape(-1)
            n_keep = min(self.k * (flat.numel() // pre_acts.shape[-1]), flat.numel())
            values, indices = flat.topk(n_keep, sorted=False)
            return torch.zeros_like(flat).scatter_(0, indices, values.relu()).reshape(pre_acts.shape)
        return pre_acts.relu() * (pre_acts > self.threshold)


@register_activation("jumprelu")
class JumpReLU(nn.Module):
    """``pre * [pre > threshold]`` with a learned per-feature threshold ``[d_sae]``."""

    elementwise = True

    def __init__(self, d_sae: int, k: int | None = None) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.zeros(d_sae))

    def forward(self, pre_acts: torch.Tensor) -> torch.Tensor:
        return pre_acts.relu() * (pre_acts > self.threshold)


def make_activation(name: str, d_sae: int, k: int | None = None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"Unknown activation {name!r}; known: {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name](d_sae, k)
