"""Causal attention from per-head queries, keys and values, for the edge-patching forward's own blocks.

The edge-patching forward (:mod:`.components`) runs the blocks itself where it can, rather than through
transformer_lens's hooks: each head's query, key and value come from its own corrected input, the keys and
values of a shared clean prefix are the clean run's, and in the last block only each prompt's last token needs
a query (the metric reads nothing else). The attention is assembled from the attention module's own pieces
(rotary tables, scale), head-major, so each head's scores and outputs are batched matmuls over views of the
projections (at small head sizes on CPU this is faster than ``scaled_dot_product_attention``). Architectures
whose blocks add anything else (local windows, ALiBi, sinks, soft caps, query/key norms, parallel or post-norm
blocks) keep transformer_lens's forward.
"""

from __future__ import annotations

import torch

from .head_inputs import shared_head_inputs_supported

__all__ = ["causal_attention", "own_blocks_supported", "rotate"]

# OLMo models normalise queries and keys inside the attention module itself
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def own_blocks_supported(model) -> bool:
    """Whether every block is ``resid + attn(ln1(resid))`` then ``+ mlp(ln2(.))`` (or attention only), with
    causal global attention over standard or rotary positions and nothing else in the scores."""
    cfg = model.cfg
    return (
        shared_head_inputs_supported(model)
        and cfg.positional_embedding_type in ("standard", "rotary")
        and cfg.original_architecture not in _QK_NORM_ARCHITECTURES
        and not getattr(cfg, "parallel_attn_mlp", False)
        and not getattr(cfg, "use_normalization_before_and_after", False)
        and not getattr(cfg, "use_qk_norm", False)
        and getattr(cfg, "clip_qkv", None) is None
        and not getattr(cfg, "use_logn_attn", False)
        and not getattr(cfg, "use_dynamic_ntk_rope", False)
        and not getattr(cfg, "use_attention_sinks", False)
        and not (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
        and all((getattr(block.attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
                and getattr(block.attn, "attn_type", "global") != "local" for block in model.blocks)
    )


def rotate(attn, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of ``x [..., d_head]`` at absolute ``positions`` (broadcastable to ``x.shape[:-1]``),
    with the attention module's own tables and pairing (adjacent pairs, or the two halves)."""
    rotary_dim = attn.cfg.rotary_dim
    if int(positions.max()) >= attn.rotary_cos.shape[0]:
        raise ValueError(f"position {int(positions.max())} is past the model's rotary table "
                         f"({attn.rotary_cos.shape[0]} positions); give prompts of at most n_ctx tokens.")
    x_rot = x[..., :rotary_dim].contiguous()
    cos, sin = attn.rotary_cos[positions].to(x.dtype), attn.rotary_sin[positions].to(x.dtype)  # [..., rotary_dim]
    # x rotated by 90 degrees in each pair is its pair partner with one sign flipped: fold the sign into sin
    if getattr(attn.cfg, "rotary_adjacent_pairs", False):
        partner = x_rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        sign = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device).repeat(rotary_dim // 2)
    else:
        partner = x_rot.roll(rotary_dim // 2, dims=-1)
        sign = torch.ones(rotary_dim, dtype=x.dtype, device=x.device)
        sign[: rotary_dim // 2] = -1.0
    # tables spelled out over every trailing dimension they vary with or sit inside, so the elementwise
    # passes run over long contiguous blocks instead of d_head-sized ones
    trailing = x_rot.shape[-cos.dim():]
    cos, sin = cos.expand(trailing).contiguous(), (sin * sign).expand(trailing).contiguous()
    rotated = (x_rot * cos).addcmul_(partner, sin)
    return rotated if rotary_dim == x.shape[-1] else torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


def causal_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Heads' outputs ``z [head, rows, query_pos, d_head]`` of masked attention, head-major throughout.

    Args:
        attn: the block's attention module (its scale is used).
        q: queries ``[head, rows, query_pos, d_head]`` after rotary; rows are ``copies * n``, copy-major.
        k, v: keys (after rotary) and values ``[head, rows, key_pos, d_head]`` (key/value heads one per
            query head).
        mask: additive ``[n, query_pos, key_pos]`` (0 or -inf) per prompt, the same in every copy.
    """
    heads, rows, queries, d_head = q.shape
    n, keys = mask.shape[0], k.shape[2]
    q = q * (1.0 / float(attn.attn_scale))
    scores = torch.bmm(q.reshape(heads * rows, queries, d_head), k.reshape(heads * rows, keys, d_head).mT)
    scores.view(heads, rows // n, n, queries, keys).add_(mask)
    pattern = scores.softmax(dim=-1)
    return torch.bmm(pattern, v.reshape(heads * rows, keys, d_head)).view(heads, rows, queries, d_head)


def keys_values_as_cached(attn, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``hook_k`` / ``hook_v`` ``[batch, pos, head, d_head]`` -> the keys and values transformer_lens keeps in
    its key-value cache (before rotary): per-head q/k norms applied (Qwen3, Gemma-3). Architectures whose
    cached keys :func:`prefix_keys_reproducible` rejects (full-vector q/k norms, clipped q/k/v) are not
    handled here."""
    if getattr(attn.cfg, "use_qk_norm", False):
        keys = attn._apply_qk_norm(keys, attn.k_norm)
    return keys, values


def prefix_keys_reproducible(model) -> bool:
    """Whether :func:`keys_values_as_cached` reproduces the model's cached keys and values from its hooks."""
    cfg = model.cfg
    return cfg.original_architecture not in _QK_NORM_ARCHITECTURES and getattr(cfg, "clip_qkv", None) is None
