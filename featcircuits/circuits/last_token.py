"""The last block's attention for one query per row: each prompt's last token.

The metric reads the last block's output at each prompt's last token alone, so in that block only the keys
and values need every position; its queries, attention, MLP and the edges into the logits are needed at one
token per row. transformer_lens's attention computes every query position (its causal mask assumes the
queries are the trailing positions), so here the attention is assembled from the attention module's own
pieces (rotary, scores with their scale and soft cap) with a mask per row. Architectures whose attention
adds anything else (local windows, ALiBi, sinks, query/key norms) keep transformer_lens's block.
"""

from __future__ import annotations

import torch

from .head_inputs import shared_head_inputs_supported

__all__ = ["last_token_attention", "last_token_supported"]

# OLMo models normalise queries and keys inside the attention module itself
_QK_NORM_ARCHITECTURES = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def last_token_supported(model) -> bool:
    """Whether the last block is ``resid + attn(ln1(resid))`` then ``+ mlp(ln2(.))`` (or attention only) with
    causal global attention over standard or rotary positions and nothing else in the scores."""
    cfg, attn = model.cfg, model.blocks[-1].attn
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
        and (getattr(attn, "_attention_dir_override", None) or cfg.attention_dir) == "causal"
        and getattr(attn, "attn_type", "global") != "local"
    )


def last_token_attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_offset: int,
                         last: torch.Tensor) -> torch.Tensor:
    """Each row's attention output ``z [batch, head, d_head]`` at its own last token.

    Args:
        attn: the block's attention module (its rotary tables, scale and soft cap are used).
        q: queries ``[batch, pos, head, d_head]`` before rotary, at absolute positions ``query_offset`` on.
        k, v: keys and values ``[batch, key_pos, head, d_head]`` before rotary, from absolute position 0
            (key/value heads one per query head).
        last: ``[batch]`` each row's query, an index into ``q``'s positions; keys after it are masked.
    """
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.apply_rotary(q, query_offset)
        k = attn.apply_rotary(k, 0)
    rows = torch.arange(q.shape[0], device=q.device)
    scores = attn.calculate_attention_scores(q[rows, last].unsqueeze(1), k)  # [batch, head, 1, key_pos]
    hidden = torch.arange(k.shape[1], device=q.device) > (last + query_offset)[:, None]  # [batch, key_pos]
    pattern = scores.masked_fill(hidden[:, None, None], float("-inf")).softmax(dim=-1).to(v.dtype)
    return torch.einsum("bhk,bkhd->bhd", pattern[:, :, 0], v)
