"""The hook points transformer_lens must enable for edge patching, and the per-head input hooks.

Edge patching sets each receiver's own input: a head's (``hook_attn_in``, or under grouped-query attention
its ``hook_q/k/v_input`` with key/value heads ungrouped), an MLP's (``hook_mlp_in``) or the final residual.
:data:`FwdHooks` is the type of the hook lists handed to transformer_lens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from typing import TypeAlias

__all__ = ["FwdHooks", "grouped_query", "head_input_hooks", "edge_hooks_enabled"]

# ``fwd_hooks`` exactly as transformer_lens's run_with_hooks and hooks() declare it: (hook name or name
# filter, hook). A list is invariant, so a list inferred as list[tuple[str, ...]] would not be accepted.
FwdHooks: TypeAlias = list[tuple[str | Callable, Callable]]


def grouped_query(model) -> bool:
    return model.cfg.n_key_value_heads is not None and model.cfg.n_key_value_heads != model.cfg.n_heads


def head_input_hooks(model, layer: int) -> list[str]:
    """Per-head input hooks of a layer. Grouped-query attention has no per-head ``hook_attn_in``, so its
    query, key and value inputs are hooked separately, with key/value heads ungrouped (one per query head)."""
    if grouped_query(model):
        return [f"blocks.{layer}.hook_{kind}_input" for kind in ("q", "k", "v")]
    return [f"blocks.{layer}.hook_attn_in"]


@contextmanager
def edge_hooks_enabled(model, attn_result: bool = True, per_head_inputs: bool = True):
    """``hook_mlp_in``, key/value heads ungrouped, and where asked per-head outputs (``hook_result``) and
    per-head residual inputs. transformer_lens builds per-head outputs as a ``[batch, pos, head, d_head,
    d_model]`` product, the largest tensor of the forward, so code that only reads them computes them from
    ``hook_z``; code that only sets head inputs can set ``hook_q/k/v`` instead (:mod:`.head_inputs`)."""
    cfg = model.cfg
    saved = (cfg.use_attn_result, cfg.use_attn_in, cfg.use_split_qkv_input, cfg.use_hook_mlp_in,
             cfg.ungroup_grouped_query_attention)
    model.set_use_attn_result(attn_result)
    if grouped_query(model):
        cfg.ungroup_grouped_query_attention = True
        model.set_use_split_qkv_input(per_head_inputs)
    else:
        model.set_use_attn_in(per_head_inputs)
    if not cfg.attn_only:  # (attention-only models have no MLP input to hook)
        model.set_use_hook_mlp_in(True)
    try:
        yield
    finally:
        model.set_use_attn_result(saved[0])
        if grouped_query(model):
            model.set_use_split_qkv_input(saved[2])
            cfg.ungroup_grouped_query_attention = saved[4]
        else:
            model.set_use_attn_in(saved[1])
        if not cfg.attn_only:
            model.set_use_hook_mlp_in(saved[3])
