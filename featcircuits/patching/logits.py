"""The one logits head: what the model applies after its last block, applied the same way everywhere.

Every patched forward ends here (the replacement model, component and feature-edge patching, exact
receivers, graph targets), so that a model detail such as Gemma-2's output soft cap is handled once:

    final  = ln_final(resid)                      (when the model has a final norm)
    logits = soft_cap(final @ W_U + b_U)          soft_cap(x) = cap * tanh(x / cap) when cap > 0

Attribution graphs read their targets off ``final`` (the unembedding input) before the cap: that read-out
is affine, hence exact; the cap is a per-logit monotone squashing applied after it.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["final_norm", "unembed", "logits_from_resid", "output_soft_cap", "unembedding"]


def output_soft_cap(model: Any) -> float | None:
    """The model's output logit soft cap, or None when it has none (``cfg.output_logits_soft_cap <= 0``)."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    return float(cap) if cap is not None and cap > 0 else None


def final_norm(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """``resid [..., d_model]`` after the last block -> the unembedding input ``[..., d_model]``."""
    return model.ln_final(resid) if model.cfg.normalization_type is not None else resid


def unembed(model: Any, final: torch.Tensor) -> torch.Tensor:
    """The unembedding input ``[..., d_model]`` -> logits ``[..., d_vocab]``, soft-capped as the model does."""
    logits = model.unembed(final)
    cap = output_soft_cap(model)
    return cap * torch.tanh(logits / cap) if cap is not None else logits


def logits_from_resid(model: Any, resid: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block ``[..., d_model]`` -> logits ``[..., d_vocab]``."""
    return unembed(model, final_norm(model, resid))


def unembedding(model: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``W_U [d_model, d_vocab]`` and ``b_U [d_vocab]`` (zeros where the model has no unembedding bias),
    detached: the affine read-out graph targets are taken from (before any soft cap)."""
    W_U = model.unembed.W_U.detach()
    b_U = getattr(model.unembed, "b_U", None)
    b_U = b_U.detach() if b_U is not None else torch.zeros(W_U.shape[-1], dtype=W_U.dtype, device=W_U.device)
    return W_U, b_U
