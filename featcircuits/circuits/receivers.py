"""Edge attribution with exact receivers: AtP*'s QK fix carried to every receiver, and a secant downstream.

Plain edge AtP (EAP) scores an edge ``s -> r`` as ``delta_s . grad(r's input)``: the whole model after
the sender, the receiver's own nonlinearity included, is linearised at the clean run. Where the receiver
is saturated (a near one-hot attention softmax, a ReLU/step MLP on a plateau) that gradient is ~0 however
large the real effect: the false negatives Kramar et al. 2024 (AtP*) describe for queries and keys. Their
QK fix recomputes the attention softmax with the patched query/key and linearises only what follows. Here
the same is done for every receiver and every part of it:

* ``exact``: the receiver (one head with its query, key and value inputs, or one MLP) is rerun with the
  sender's contribution replaced by its ablation, for every sender at once (one batched forward of that
  block per layer); its exact output change is scored by the gradient of the metric with respect to the
  receiver's output at the clean run (which holds every path through later components). Edges into the
  logits are exact outright (unembedding and metric recomputed).
* ``secant``: as ``exact``, but the downstream model is linearised along a secant instead of the tangent:
  the receiver's change ``d`` is split into its component along the receiver's own ablation
  ``D = ablated - clean`` and the rest; the first is scaled by the receiver's exact node effect
  ``m(receiver ablated) - m(model)`` (all nodes' ablations in one batched forward), the rest by the
  gradient. It is exact when the edge removal ablates the receiver (``d = D``) and equals ``exact`` when the
  downstream model is linear along ``D``; it sees through a saturated component *after* the receiver,
  which no clean-run gradient can.

Both are first-order in what lies after the receiver: a change orthogonal to ``D`` that acts only
through later saturated units (or ReLUs sitting exactly at zero) still scores ~0.
"""

from __future__ import annotations

from typing import Any

import torch

from ..patching.ablation import repeat_copies
from ..patching.edge_hooks import FwdHooks, edge_hooks_enabled, head_input_hooks
from ..patching.logits import logits_from_resid

__all__ = ["RECEIVER_RULES", "check_receivers", "receiver_changes", "exact_edge_scores"]

RECEIVER_RULES = ("linear", "exact", "secant")


def check_receivers(receivers: str) -> str:
    if receivers not in RECEIVER_RULES:
        raise ValueError(f"receivers={receivers!r}; choose one of {RECEIVER_RULES} ('linear' is plain AtP).")
    return receivers


def _copy_major(delta: torch.Tensor) -> torch.Tensor:
    """``[n, senders, pos, d] -> [senders * n, pos, d]`` (copy j = sender j, the task's prompts inside)."""
    return delta.transpose(0, 1).reshape(-1, *delta.shape[2:])


@torch.no_grad()
def receiver_changes(graph: Any, layer: int, delta: torch.Tensor,
                     clean_mlp_in: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Exact output change of every receiver of ``layer`` when one sender's output is ablated in its input.

    Args:
        graph: the :class:`ComponentGraph`.
        delta: ``[n, senders, pos, d_model]`` sender ablated minus clean output.
        clean_mlp_in: ``[n, pos, d_model]`` the layer's clean MLP input (``None`` for attention-only models).

    Returns ``(heads [S_h, n, pos, n_heads, d_model], mlp [S_m, n, pos, d_model] | None)``: the change of each
    head's ``hook_result`` (``S_h = 1 + layer * per_layer`` senders) and of ``hook_mlp_out`` (``S_m = S_h +
    n_heads``: the layer's own heads feed its MLP).
    """

    n, model = len(graph.task), graph.model
    n_head_senders = 1 + layer * graph.per_layer
    n_senders = n_head_senders + graph.n_heads * int(graph.has_mlp)
    clean, _ = graph._sender_outputs()
    first = 1 + layer * graph.per_layer
    clean_heads = clean[:, first:first + graph.n_heads].permute(0, 2, 1, 3)  # [n, pos, heads, d]
    heads, mlps = [], []
    for chunk in torch.arange(n_senders, device=delta.device).split(graph.max_copies):
        copies = len(chunk)
        shift = _copy_major(delta[:, chunk])  # [copies * n, pos, d]
        # senders after the layer's attention (its own heads) reach only its MLP
        into_heads = (chunk < n_head_senders).to(shift.dtype).repeat_interleave(n).view(-1, 1, 1, 1)
        captured: dict[str, torch.Tensor] = {}

        def shift_heads(x, hook, s=shift, k=into_heads):
            return x + s[:, :, None, :] * k

        def set_mlp_in(x, hook, s=shift, c=copies):
            assert clean_mlp_in is not None  # hooked only on models with MLPs, whose inputs the graph keeps
            return repeat_copies(clean_mlp_in, c, n) + s  # the clean input, not the one the heads above changed

        def capture(x, hook, store=captured):
            store[hook.name] = x
            return x

        hooks: FwdHooks = [(name, shift_heads) for name in head_input_hooks(model, layer)]
        hooks.append((f"blocks.{layer}.attn.hook_result", capture))
        if graph.has_mlp:
            hooks += [(f"blocks.{layer}.hook_mlp_in", set_mlp_in), (f"blocks.{layer}.hook_mlp_out", capture)]
        with edge_hooks_enabled(model):
            graph.forwards += 1  # one block of one forward
            model.run_with_hooks(repeat_copies(graph._clean_resid[layer], copies, n), start_at_layer=layer,
                                 stop_at_layer=layer + 1, fwd_hooks=hooks)
        result = captured[f"blocks.{layer}.attn.hook_result"].view(copies, n, *clean_heads.shape[1:])
        heads.append(result - clean_heads)
        if graph.has_mlp:
            out = captured[f"blocks.{layer}.hook_mlp_out"].view(copies, n, *clean.shape[2:])
            mlps.append(out - clean[:, first + graph.n_heads])
    return torch.cat(heads)[:n_head_senders], (torch.cat(mlps) if graph.has_mlp else None)


@torch.no_grad()
def _logits_receiver_effects(graph: Any, delta: torch.Tensor) -> torch.Tensor:
    """``[senders]`` exact metric change when one sender is ablated in the final residual (unembed rerun)."""
    n, model = len(graph.task), graph.model
    final = graph._clean_final  # [n, pos, d_model]
    effects = []
    for chunk in torch.arange(delta.shape[1], device=delta.device).split(graph.max_copies):
        resid = repeat_copies(final, len(chunk), n) + _copy_major(delta[:, chunk])
        graph.forwards += 1  # the model's own head: final norm, unembedding, any logit soft-cap
        effects.append(graph._score(logits_from_resid(model, resid)) - graph.full_metric)
    return torch.cat(effects)


def exact_edge_scores(graph: Any, sender_grads: torch.Tensor, delta: torch.Tensor, secant: bool) -> torch.Tensor:
    """Edge scores ``[n_edges]`` (in ``graph.edge_ids`` order) with exact receivers (see the module docstring).

    Args:
        sender_grads: ``[n, senders, pos, d_model]`` gradient of the metric (summed over the task) with respect
            to each sender's output at the clean run.
        delta: ``[n, senders, pos, d_model]`` sender ablated minus clean output.
        secant: scale the component along each receiver's own ablation by its exact node effect.
    """
    with torch.no_grad():
        sender_grads, delta = sender_grads.detach(), delta.detach()
        if secant:  # exact node effects: row i ablates node i alone
            n_nodes = len(graph.node_ids)
            node_effects = graph.node_metric(1.0 - torch.eye(n_nodes)) - graph.full_metric  # [nodes]
        mlp_ins = graph._clean_mlp_in
        scores = []
        for layer in range(graph.n_layers):
            first = 1 + layer * graph.per_layer
            heads, mlp = receiver_changes(graph, layer, delta, mlp_ins[layer] if graph.has_mlp else None)
            # receivers as a trailing axis: heads [S, n, pos, R, d] with R = n_heads, the MLP R = 1
            groups = [(heads, first, graph.n_heads)]
            if mlp is not None:
                groups.append((mlp[:, :, :, None], first + graph.n_heads, 1))
            for change, start, width in groups:
                own = delta[:, start:start + width].permute(0, 2, 1, 3)  # [n, pos, R, d] each receiver's ablation
                grad = sender_grads[:, start:start + width].permute(0, 2, 1, 3)
                score = torch.einsum("snprd,nprd->sr", change, grad)
                if secant:
                    norm = torch.einsum("nprd,nprd->r", own, own)
                    along = torch.einsum("snprd,nprd->sr", change, own) / norm.clamp_min(1e-30)
                    along = torch.where(norm > 0, along, torch.zeros_like(along))
                    tangent = torch.einsum("nprd,nprd->r", own, grad)
                    score = score + along * (node_effects[start - 1:start - 1 + width] - tangent)
                scores.append(score.T.flatten())  # receiver-major, as graph.edge_ids
        scores.append(_logits_receiver_effects(graph, delta))
    return torch.cat(scores)
