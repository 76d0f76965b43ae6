"""What the replacement model is made of and what its runs return: sites, clean runs, outputs, patches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..dictionaries import Dictionary

__all__ = ["Site", "CleanRun", "ReplacementOutput", "Patch", "apply_patch"]

# A patch is a replacement tensor ([pos, d] or [batch, pos, d]) or a function of the current value.
Patch = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Site:
    """One spliced place: ``dictionary`` reads ``hook_in`` and replaces ``hook_out`` (None: bare MLP)."""

    name: str
    hook_in: str
    hook_out: str
    layer: int
    dictionary: Dictionary | None

    @property
    def d_sae(self) -> int:
        return self.dictionary.cfg.d_sae if self.dictionary is not None else 0


@dataclass
class CleanRun:
    """Everything the frozen replacement model needs from one clean forward pass of one prompt.

    Tensors carry no batch axis: ``tokens [pos]``, ``logits [pos, d_vocab]``, ``embeddings [pos, d_model]``
    (resid_pre of block 0), ``final [pos, d_model]`` (the unembedding's input), per site ``inputs [pos, d_in]``, ``pre_acts``/``feature_acts [pos, d_sae]``,
    ``recon_features [pos, d_out]`` (decoder part without the skip path), ``errors [pos, d_out]``;
    ``patterns`` per layer ``[1, n_heads, pos, pos]`` and ``scales`` per hook ``[1, pos, 1]``.
    """

    tokens: torch.Tensor
    logits: torch.Tensor
    embeddings: torch.Tensor
    final: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_acts: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_acts: dict[str, torch.Tensor] = field(default_factory=dict)
    recon_features: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, torch.Tensor] = field(default_factory=dict)
    patterns: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class ReplacementOutput:
    """``logits [batch, pos, d_vocab]``; per site ``inputs [batch, pos, d_in]`` (frozen runs), ``pre_acts``
    and ``feature_acts [batch, pos, d_sae]`` (when asked for); ``final [batch, pos, d_model]`` is the
    unembedding's input."""

    logits: torch.Tensor
    final: torch.Tensor
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_acts: dict[str, torch.Tensor] = field(default_factory=dict)
    feature_acts: dict[str, torch.Tensor] = field(default_factory=dict)


def apply_patch(value: torch.Tensor, patch: Patch | None) -> torch.Tensor:
    if patch is None:
        return value
    if callable(patch):
        return patch(value)
    return patch.to(value.dtype).expand_as(value) if patch.dim() < value.dim() else patch.to(value.dtype)


