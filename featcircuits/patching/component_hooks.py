"""The hooked forwards' patches for component nodes (heads at ``hook_z``, MLPs at ``hook_mlp_out``) and for
component edges' attribution (senders moved, receivers probed).

Batches are copy-major ``[copies * n, ...]`` (the task's ``n`` prompts once per pattern). Node values come
from :func:`.ablation.ablation_value`; attribution holds each unit at ``clean + alpha (ablated - clean)``
with gradients passing through it as through the identity (:func:`.ablation.held_at`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ablation import held_at, interpolation_alphas, mix, repeat_copies
from .edge_hooks import FwdHooks

__all__ = ["node_names", "node_ablation_hooks", "node_interpolation_hooks", "sender_interpolation_hooks",
           "receiver_probe_hooks"]


def node_names(n_layers: int, has_mlp: bool) -> list[str]:
    """The hook of every component node's output: each layer's ``hook_z`` (all heads), then ``hook_mlp_out``."""
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    return names + ([f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)] if has_mlp else [])


def node_ablation_hooks(values: dict[str, torch.Tensor], keep: torch.Tensor, n: int, n_heads: int,
                        has_mlp: bool) -> FwdHooks:
    """Hooks that give ``keep [copies, layers, per_layer]`` (1 keeps, 0 ablates; heads, then the MLP) to every
    node, with ``values`` per hook ``name`` (clean) and ``name + ".ablated"`` ``[n | 1, pos, ...]``."""
    copies, n_layers = keep.shape[0], keep.shape[1]
    per_prompt = keep.repeat_interleave(n, dim=0)  # [copies * n, layers, per_layer]
    hooks: FwdHooks = []
    for layer in range(n_layers):
        name = f"blocks.{layer}.attn.hook_z"
        ablated = repeat_copies(values[name + ".ablated"], copies, n)
        head_keep = per_prompt[:, layer, :n_heads].view(-1, 1, n_heads, 1)
        hooks.append((name, lambda z, hook, a=ablated, k=head_keep: mix(z, a, k)))
        if has_mlp:
            name = f"blocks.{layer}.hook_mlp_out"
            ablated = repeat_copies(values[name + ".ablated"], copies, n)
            mlp_keep = per_prompt[:, layer, n_heads].view(-1, 1, 1)
            hooks.append((name, lambda out, hook, a=ablated, k=mlp_keep: mix(out, a, k)))
    return hooks


def node_interpolation_hooks(values: dict[str, torch.Tensor], n: int, steps: int
                             ) -> tuple[FwdHooks, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Hooks holding every node at ``clean + alpha (ablated - clean)`` for ``steps`` IG points (batch
    ``[steps * n, ...]``; one point, alpha 0, for AtP), and per hook its leaf and ``ablated - clean [n, ...]``."""
    alphas = interpolation_alphas(steps, next(iter(values.values())).device)
    leaves: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks: FwdHooks = []
    for name in [k for k in values if not k.endswith(".ablated")]:
        clean = values[name]
        delta = repeat_copies(values[name + ".ablated"], 1, n) - clean
        ones = [1] * (clean.dim() - 1)
        shape = (-1,) + (1,) * (clean.dim() - 1)
        target = clean.repeat(steps, *ones) + alphas.repeat_interleave(n).view(shape) * delta.repeat(steps, *ones)
        leaves[name] = (target.requires_grad_(), delta)
        hooks.append((name, lambda x, hook, t=target: held_at(x, t)))
    return hooks, leaves


def sender_interpolation_hooks(targets: torch.Tensor, n_layers: int, n_heads: int, has_mlp: bool) -> FwdHooks:
    """Hooks holding every sender's output at ``targets [batch, senders, pos, d_model]`` (senders: the
    embeddings, then per layer its heads at ``hook_result`` and its MLP)."""
    per_layer = n_heads + int(has_mlp)

    def move(start: int, width: int) -> Callable:
        def hook(x, hook):
            target = targets[:, start:start + width]
            return held_at(x, target.permute(0, 2, 1, 3) if x.dim() == 4 else target[:, 0])
        return hook

    hooks: FwdHooks = [("blocks.0.hook_resid_pre", move(0, 1))]
    for layer in range(n_layers):
        start = 1 + layer * per_layer
        hooks.append((f"blocks.{layer}.attn.hook_result", move(start, n_heads)))
        if has_mlp:
            hooks.append((f"blocks.{layer}.hook_mlp_out", move(start + n_heads, 1)))
    return hooks


def receiver_probe_hooks(hook_names: list[str]) -> tuple[FwdHooks, dict[str, torch.Tensor]]:
    """Hooks adding a zero probe (a gradient leaf) to every receiver input, and the probes by hook name,
    filled as the forward reaches them."""
    probes: dict[str, torch.Tensor] = {}

    def watch(x, hook):
        probe = torch.zeros_like(x, requires_grad=True)
        probes[hook.name] = probe
        return x + probe

    return [(name, watch) for name in hook_names], probes
