"""The edge-patching forward through transformer_lens's hooks, for blocks :class:`.OwnBlocks` does not cover
(and for the straightforward evaluator, ``skip_clean_prefix=False``).

Every receiver's input loses what its removed edges' senders wrote and gets their ablated values instead:
``receiver input -= sender_out - sender_ablated``, summed over the removed edges (:class:`.SenderDiffs`);
per-head receivers are set through their q/k/v inputs (:class:`.HeadInputHooks`) where that is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .ablation import repeat_copies
from .edge_hooks import FwdHooks, edge_hooks_enabled, head_input_hooks
from .head_inputs import HeadInputHooks, shared_head_inputs_supported
from .sender_diffs import SenderDiffs

__all__ = ["hooked_edge_forward"]


def hooked_edge_forward(graph: Any, removed: torch.Tensor, copies: int, start_layer: int, skip: int,
                        clean: torch.Tensor, ablated: torch.Tensor) -> torch.Tensor:
    """The edge-patching forward through transformer_lens's hooks, for blocks :class:`.OwnBlocks` does not
    cover (and for the straightforward evaluator): the metric ``[copies]``."""
    n = len(graph.task)
    prefix = 1 + start_layer * graph.per_layer if start_layer > 0 or skip else 0  # senders before the first block
    senders = SenderDiffs(clean, ablated, copies, prefix)
    corrections: dict[int, torch.Tensor] = {}  # per receiver group: grouped-query q/k/v inputs share one

    def record(start: int):
        def hook(x, hook):
            senders.store(start, x)
            return x
        return hook

    def record_heads(start: int, ablated_z: torch.Tensor, W_O: torch.Tensor):
        def hook(z, hook):  # z [batch, pos, head, d_head]
            senders.store_heads(start, z.permute(2, 0, 1, 3), ablated_z.permute(2, 0, 1, 3), W_O)
            return z
        return hook

    def receive(first: int, n_receivers: int, n_senders: int):
        def hook(x, hook):
            if first not in corrections:
                off = removed[:, first:first + n_receivers * n_senders].view(-1, n_receivers, n_senders)
                correction = senders.removed_sum(off)  # [batch, receivers, pos, d_model]
                corrections[first] = correction.transpose(1, 2) if x.dim() == 4 else correction[:, 0]
            return x - corrections[first]
        return hook

    def head_correction(first: int, n_senders: int) -> Callable[[], torch.Tensor | None]:
        def correction() -> torch.Tensor | None:  # [copies * n, head, pos, d_model], None if nothing removed
            off = removed[:, first:first + graph.n_heads * n_senders]
            return senders.removed_sum(off.view(-1, graph.n_heads, n_senders)) if bool(off.any()) else None
        return correction

    hooks: FwdHooks = [("blocks.0.hook_resid_pre", record(0))] if prefix == 0 else []
    for layer in range(start_layer, graph.n_layers):
        start = 1 + layer * graph.per_layer
        hooks.append((f"blocks.{layer}.attn.hook_z",
                      record_heads(start, graph._ablated_z[layer][:, skip:], graph.model.blocks[layer].attn.W_O)))
        if graph.has_mlp:
            hooks.append((f"blocks.{layer}.hook_mlp_out", record(start + graph.n_heads)))
    shared_inputs = shared_head_inputs_supported(graph.model)
    for names, first, n_r, n_s in graph._receiver_groups:
        layer = int(names[0].split(".")[1])
        if layer < start_layer:
            continue
        if shared_inputs and names == head_input_hooks(graph.model, layer):  # this layer's heads
            hooks += HeadInputHooks(graph.model, layer, head_correction(first, n_s)).hooks()
        else:
            hooks += [(hook, receive(first, n_r, n_s)) for hook in names]
    with edge_hooks_enabled(graph.model, attn_result=False, per_head_inputs=not shared_inputs):
        if prefix == 0:
            return graph._run_to_metric(graph._tokens(copies), hooks)
        resid = repeat_copies(graph._clean_resid[start_layer][:, skip:], copies, n)
        cache = graph._clean_kv_cache(copies, skip) if skip else None
        return graph._run_to_metric(resid, hooks, start_at_layer=start_layer, past_kv_cache=cache)
