"""Causal attention from per-head queries, keys and values, for the edge-patching forward's own blocks.

The edge-patching forward (:mod:`.components`) runs the blocks itself where it can, rather than through
transformer_lens's hooks: each head's query, key and value come from its own corrected input, the keys and
values of a shared clean prefix are the clean run's, and in the last block only each prompt's last token needs
a query (the metric reads nothing else). The attention is assembled from the attention module's own pieces
(rotary tables, scale) around ``scaled_dot_product_attention``. Architectures whose blocks add
anything else (local windows, ALiBi, sinks, soft caps, query/key norms, parallel or post-norm blocks) keep
transformer_lens's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .head_inputs import shared_head_inputs_supported

__all__ = ["causal_attention", "own_blocks_supported"]

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
        and not getattr(cfg, "use_attention_sinks", False)
        and not (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0
        and all((getattr(block.attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
                and getattr(block.attn, "attn_type", "global") != "local" for block in model.blocks)
    )


def causal_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_offset: int,
                     last: torch.Tensor | None = None) -> torch.Tensor:
    """Heads' outputs ``z [batch, query_pos, head, d_head]`` of causal attention.

    Args:
        attn: the block's attention module (its rotary tables and scale are used).
        q: queries ``[batch, pos, head, d_head]`` before rotary, at absolute positions ``query_offset`` on.
        k, v: keys and values ``[batch, query_offset + pos, head, d_head]`` before rotary, from absolute
            position 0 (key/value heads one per query head).
        last: ``[batch]`` an index into ``q``'s positions per row: only that query is computed
            (``query_pos`` 1), keys after it masked. ``None``: every query.
    """
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.apply_rotary(q, query_offset)
        k = attn.apply_rotary(k, 0)
    keys = torch.arange(k.shape[1], device=q.device)
    if last is None:
        queries = torch.arange(q.shape[1], device=q.device) + query_offset
        visible = keys <= queries[:, None]  # [query_pos, key_pos]
    else:
        q = q[torch.arange(q.shape[0], device=q.device), last].unsqueeze(1)
        visible = (keys <= (last + query_offset)[:, None])[:, None, None]  # [batch, 1, 1, key_pos]
    z = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=visible,
                                       scale=1.0 / float(attn.attn_scale))
    return z.transpose(1, 2)
