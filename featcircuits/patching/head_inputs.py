"""Queries, keys and values of heads whose residual inputs differ per head, without per-head residual copies.

An edge ablation into a head changes only that head's input: ``resid - correction[head]``. transformer_lens
models this with ``use_split_qkv_input``: three per-head copies of the residual stream
``[batch, pos, head, d_model]`` (query, key and value), each normalised by ``ln1`` on its own, which makes
the attention inputs the largest part of a batched edge-patching forward. The three inputs of one head are
equal here (an edge reaches a head's query, key and value alike), so :func:`head_qkv` normalises each
head's input once and projects it with the query, key and value weights together.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# from their defining modules: transformer_lens.components re-exports them without declaring them public
from transformer_lens.components.layer_norm import LayerNorm
from transformer_lens.components.layer_norm_pre import LayerNormPre
from transformer_lens.components.rms_norm import RMSNorm
from transformer_lens.components.rms_norm_pre import RMSNormPre
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from .edge_hooks import FwdHooks

__all__ = ["HeadInputHooks", "head_qkv", "head_qkv_head_major", "shared_head_inputs_supported",
           "shared_qkv_head_major"]

# norms whose scale can move past the projection: per-position centering (LN) and a root-mean-square scale
_FOLDABLE_NORMS = (LayerNorm, LayerNormPre, RMSNorm, RMSNormPre)


def shared_head_inputs_supported(model) -> bool:
    """Whether the block computes ``q, k, v = attn(ln1(resid))`` with nothing added between and plain weights:
    not for post-norm architectures (no ``ln1`` before attention), shortformer positions (added to the query
    and key inputs) or 4-bit weights (projected by their own kernel)."""
    cfg = model.cfg
    return (cfg.original_architecture not in POST_NORM_ARCHITECTURES and cfg.positional_embedding_type != "shortformer"
            and not getattr(cfg, "load_in_4bit", False))


def head_qkv(block, resid: torch.Tensor, correction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head ``q, k, v [batch, pos, head, d_head]`` from the inputs ``resid [batch, pos, d_model] - correction
    [batch, head, pos, d_model]``, as the block's ``hook_q``/``hook_k``/``hook_v`` would carry them (before
    rotary and query/key norms, which the attention applies after those hooks). Key and value heads are one
    per query head (grouped-query attention ungrouped)."""
    qkv = head_qkv_head_major(block, resid, correction)
    q, k, v = (part.permute(1, 2, 0, 3) for part in qkv.split(block.attn.W_Q.shape[-1], dim=-1))
    return q, k, v


def _qkv_weights(attn) -> tuple[torch.Tensor, torch.Tensor]:
    weights = torch.cat([attn.W_Q, attn.W_K, attn.W_V], dim=-1)  # [head, d_model, 3 * d_head]
    biases = torch.cat([attn.b_Q, attn.b_K, attn.b_V], dim=-1)  # [head, 3 * d_head]
    return weights, biases


def head_qkv_head_major(block, resid: torch.Tensor, correction: torch.Tensor,
                        inputs: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`head_qkv` head-major: ``[head, batch, pos, 3 * d_head]``, queries, keys and values side by side.

    The norm's scale is applied after the projection (``ln(x) W = ((x - mean) (w * W)) / scale + b W``), so
    the normalised per-head inputs, the largest tensor here, are never written. ``inputs``: an uninitialised
    ``[head, batch, pos, d_model]`` buffer for the per-head inputs (scratch), else a fresh one.
    """
    norm = block.ln1
    weights, biases = _qkv_weights(block.attn)
    # head-major [head, batch, pos, d_model], written in one pass, so each head's projection is one matmul
    if inputs is None:  # (also the path gradients take)
        inputs = (resid.unsqueeze(0) - correction.transpose(0, 1)).contiguous()
    else:
        torch.sub(resid.unsqueeze(0), correction.transpose(0, 1), out=inputs)
    if not isinstance(norm, _FOLDABLE_NORMS) or inputs.dtype not in (torch.float32, torch.float64):
        return torch.einsum("hbpd,hde->hbpe", norm(inputs), weights) + biases[:, None, None]
    if isinstance(norm, (LayerNorm, LayerNormPre)):
        inputs -= inputs.mean(-1, keepdim=True)
    # one pass for the mean square (no squared copy): ||x||^2 / d_model
    mean_square = torch.linalg.vector_norm(inputs, dim=-1, keepdim=True).square() / inputs.shape[-1]
    inverse_scale = torch.rsqrt(mean_square + norm.eps)  # [head, batch, pos, 1]
    if isinstance(norm, LayerNorm):
        biases = biases + torch.einsum("d,hde->he", norm.b, weights)
    if isinstance(norm, (LayerNorm, RMSNorm)):
        weights = weights * norm.w[None, :, None]
    qkv = torch.einsum("hbpd,hde->hbpe", inputs, weights)
    return qkv.mul_(inverse_scale).add_(biases[:, None, None])


def shared_qkv_head_major(block, resid: torch.Tensor) -> torch.Tensor:
    """Every head's ``q, k, v`` from the one input ``resid [batch, pos, d_model]``, as
    :func:`head_qkv_head_major` gives them: ``[head, batch, pos, 3 * d_head]``."""
    weights, biases = _qkv_weights(block.attn)
    return torch.einsum("bpd,hde->hbpe", block.ln1(resid), weights) + biases[:, None, None]


class HeadInputHooks:
    """Hooks that give each head of one layer its own input ``resid - correction[head]`` through ``hook_q``,
    ``hook_k`` and ``hook_v``: the residual is taken at ``hook_resid_pre`` and, at ``hook_q``, ``correction()``
    (``[batch, head, pos, d_model]``, or ``None`` when no head's input differs from the residual) is asked for
    and the queries, keys and values recomputed once for all three hooks."""

    def __init__(self, model, layer: int, correction: Callable[[], torch.Tensor | None]) -> None:
        self.block, self.layer, self.correction = model.blocks[layer], layer, correction
        self.resid: torch.Tensor | None = None
        self.qkv: tuple[torch.Tensor, ...] | None = None

    def hooks(self) -> FwdHooks:
        attn = f"blocks.{self.layer}.attn"
        return [(f"blocks.{self.layer}.hook_resid_pre", self._take_resid), (f"{attn}.hook_q", self._queries),
                (f"{attn}.hook_k", self._give(1)), (f"{attn}.hook_v", self._give(2))]

    def _take_resid(self, resid: torch.Tensor, hook) -> torch.Tensor:
        self.resid, self.qkv = resid, None
        return resid

    def _queries(self, q: torch.Tensor, hook) -> torch.Tensor:
        correction = self.correction()
        if correction is None:
            return q  # every head reads the residual stream itself: transformer_lens's own q, k, v stand
        assert self.resid is not None  # hook_resid_pre runs before hook_q
        self.qkv = head_qkv(self.block, self.resid, correction)
        return self.qkv[0]

    def _give(self, index: int) -> Callable:
        def hook(value: torch.Tensor, hook) -> torch.Tensor:
            return value if self.qkv is None else self.qkv[index]
        return hook
