"""Component nodes (attention heads, MLPs) of a HookedTransformer, patched through hooks, batched.

Node ids: ``"L{layer}.H{head}"`` for a head, ``"L{layer}.MLP"`` for an MLP; edges run from a sender
(``"embed"``, a head, an MLP) to a receiver (a later head or MLP, or ``"logits"``) through the residual
stream. A node is ablated at its output (``hook_z`` per head, ``hook_mlp_out``); an edge is ablated by
taking the sender's contribution out of that one receiver's input (a head's own input, from which its
query, key and value are recomputed at ``hook_q/k/v``; ``hook_mlp_in``; the final residual) and putting
the ablation value in its place: receiver input ``-= sender_out - sender_ablated``. Every copy in the
batch has its own mask, so one forward scores many patterns. Gradients (AtP) are taken at per-head inputs
(``hook_attn_in``, or ``hook_q/k/v_input`` under grouped-query attention).

For pre-norm causal models with standard or rotary positions, edge patching and plain edge AtP run the blocks
in :mod:`.own_blocks` instead of through these hooks (the same arithmetic, head-major, over each prompt's
window of changed positions); other architectures, and the straightforward evaluator
(``skip_clean_prefix=False``), use the hooks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from ..nodes import Node
from ..patching.ablation import ablation_value, check_ablation, interpolation_alphas, repeat_copies
from ..patching.attention import keys_values_as_cached, own_blocks_supported, prefix_keys_reproducible
from ..patching.component_hooks import (
    node_ablation_hooks,
    node_interpolation_hooks,
    node_names,
    receiver_probe_hooks,
    sender_interpolation_hooks,
)
from ..patching.edge_hooks import edge_hooks_enabled, head_input_hooks
from ..patching.hooked_edges import hooked_edge_forward
from ..patching.logits import logits_from_resid
from ..patching.own_blocks import OwnBlocks
from ..patching.sender_diffs import SenderDiffs
from ..patching.windows import first_differences, frozen_prefix_cache
from .receivers import check_receivers, exact_edge_scores
from .tasks import ContrastiveTask, get_metric

__all__ = ["ComponentGraph"]


class ComponentGraph:
    """Heads and MLPs of ``model`` as circuit nodes for ``task`` under one ablation.

    Args:
        model: a HookedTransformer.
        task: the contrastive task (its clean prompts are the ones run).
        ablation: ``zero``, ``mean`` (over the task's clean prompts) or ``patch`` (from the corrupt run).
        metric: ``logit_diff``, ``prob_diff``, ``kl`` or a function ``(task, last_logits [copies, n, vocab], clean_last [n, vocab]) -> [copies]``.
        max_copies: most ablation patterns per forward (bounds memory).
        skip_clean_prefix: edge ablations start each pattern's forward at the first layer that has a removed
            edge, from the clean residual stream (everything before it is the clean run's), run only each
            prompt's positions from its first clean/corrupt difference on, and run the last block's queries,
            MLP and the edges into the logits at each prompt's last token only. ``False`` runs every forward
            over the whole model through transformer_lens's hooks (the straightforward evaluator).
    """

    measured_in = "model"  # the model its ablations run in (Circuit.measured_in)

    def __init__(self, model, task: ContrastiveTask, ablation: str = "patch",
                 metric: str | Callable = "logit_diff", max_copies: int = 64, skip_clean_prefix: bool = True) -> None:
        self.model, self.task, self.ablation = model, task, check_ablation(ablation)
        self.skip_clean_prefix = skip_clean_prefix
        self.metric_fn, self.max_copies = get_metric(metric), max_copies
        cfg = model.cfg
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.has_mlp = not cfg.attn_only
        self.node_ids: list[str] = []
        for layer in range(self.n_layers):
            self.node_ids += [Node("head", layer=layer, head=head).id for head in range(self.n_heads)]
            if self.has_mlp:
                self.node_ids.append(Node("mlp", layer=layer).id)
        self.per_layer = self.n_heads + int(self.has_mlp)
        self.sender_ids = [Node("embedding").id, *self.node_ids]
        # Edges grouped by receiver in topological order; each receiver reads a prefix of the senders.
        self.edge_ids: list[tuple[str, str]] = []
        # (input hooks, first edge, n receivers, n senders)
        self._receiver_groups: list[tuple[list[str], int, int, int]] = []
        for layer in range(self.n_layers):
            n_senders = 1 + layer * self.per_layer
            self._add_receivers(head_input_hooks(model, layer), [Node("head", layer=layer, head=h).id for h in range(self.n_heads)],
                                n_senders)
            if self.has_mlp:
                self._add_receivers([f"blocks.{layer}.hook_mlp_in"], [Node("mlp", layer=layer).id], n_senders + self.n_heads)
        self._add_receivers([f"blocks.{self.n_layers - 1}.hook_resid_post"], [Node("logits").id], len(self.sender_ids))
        self.forwards = 0
        with torch.no_grad():
            self.clean_last = task.last_logits(self._run(task.clean_tokens, []))[0]
            self.full_metric = float(self.metric_fn(task, self.clean_last[None], self.clean_last)[0])
        self._node_values: dict[str, torch.Tensor] | None = None
        self._sender_values: tuple[torch.Tensor, torch.Tensor] | None = None
        self._own: OwnBlocks | None = None

    def _add_receivers(self, hooks: list[str], receivers: list[str], n_senders: int) -> None:
        self._receiver_groups.append((hooks, len(self.edge_ids), len(receivers), n_senders))
        self.edge_ids += [(sender, receiver) for receiver in receivers for sender in self.sender_ids[:n_senders]]

    # -- plumbing -----------------------------------------------------------------------------

    def _run(self, tokens: torch.Tensor, hooks: list) -> torch.Tensor:
        self.forwards += 1
        return self.model.run_with_hooks(tokens, fwd_hooks=hooks)

    def _tokens(self, copies: int) -> torch.Tensor:
        return self.task.clean_tokens.repeat(copies, 1)

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        return self.metric_fn(self.task, self.task.last_logits(logits), self.clean_last)

    def _run_to_metric(self, inputs: torch.Tensor, hooks: list, start_at_layer: int | None = None,
                       past_kv_cache: TransformerLensKeyValueCache | None = None) -> torch.Tensor:
        """The metric ``[copies]`` of a batched forward from ``inputs`` (tokens, or the residual stream at
        ``start_at_layer``) ``[copies * n, pos(, d_model)]``; with ``past_kv_cache``, ``inputs`` are the
        positions after the cached ones."""
        self.forwards += 1
        resid = self.model.run_with_hooks(inputs, start_at_layer=start_at_layer, stop_at_layer=self.n_layers,
                                          past_kv_cache=past_kv_cache, fwd_hooks=hooks)
        offset = 0 if past_kv_cache is None else past_kv_cache[0].past_keys.shape[1]
        return self._metric_from_final(resid, offset)  # resid [copies * n, pos - offset, d_model]

    def _metric_from_final(self, resid: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """The metric ``[copies]`` from the residual stream after the last block ``[copies * n, pos - offset,
        d_model]`` (positions from ``offset`` on). The final norm and the unembedding run at each prompt's
        last token only: the metric reads nothing else, and the unembedding is the widest matmul of a small
        model's forward."""
        return self._metric_from_last(self.task.last_logits(resid, offset=offset))

    def _metric_from_last(self, final: torch.Tensor) -> torch.Tensor:
        """The metric ``[copies]`` from the residual stream after the last block at each prompt's last token,
        ``[copies, n, d_model]``."""
        logits = logits_from_resid(self.model, final)
        return self.metric_fn(self.task, logits, self.clean_last)

    def _lengths(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Real positions ``[n]`` of each clean and each corrupt prompt (the rest is padding)."""
        return self.task.clean_last + 1, self.task.corrupt_last + 1

    def node_values(self) -> dict[str, torch.Tensor]:
        """Clean and ablated ``hook_z`` ``[n, pos, head, d_head]`` and ``hook_mlp_out`` per layer."""
        if self._node_values is None:
            names = node_names(self.n_layers, self.has_mlp)
            with torch.no_grad():
                _, clean = self.model.run_with_cache(self.task.clean_tokens, names_filter=names)
                corrupt = None
                if self.ablation == "patch":
                    _, corrupt = self.model.run_with_cache(self.task.corrupt_tokens, names_filter=names)
            self.forwards += 1 + int(corrupt is not None)
            self._node_values = {}
            for name in names:
                self._node_values[name] = clean[name]
                self._node_values[name + ".ablated"] = ablation_value(
                    self.ablation, clean[name], None if corrupt is None else corrupt[name], *self._lengths())
        return self._node_values

    def _sender_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and ablated sender outputs, each ``[n | 1, senders, pos, d_model]``."""
        if self._sender_values is None:
            names = ["blocks.0.hook_resid_pre"]
            resid_names = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
            mlp_in_names = [f"blocks.{layer}.hook_mlp_in" for layer in range(self.n_layers)] if self.has_mlp else []
            final_name = f"blocks.{self.n_layers - 1}.hook_resid_post"
            z_names = [f"blocks.{layer}.attn.hook_z" for layer in range(self.n_layers)]
            kv_names = [f"blocks.{layer}.attn.hook_{kind}" for layer in range(self.n_layers) for kind in "kv"]
            for layer in range(self.n_layers):
                names.append(f"blocks.{layer}.attn.hook_result")
                if self.has_mlp:
                    names.append(f"blocks.{layer}.hook_mlp_out")

            def stack(cache) -> torch.Tensor:
                parts = []
                for name in names:
                    value = cache[name]
                    parts.append(value.permute(0, 2, 1, 3) if value.dim() == 4 else value.unsqueeze(1))
                return torch.cat(parts, dim=1)

            with torch.no_grad(), edge_hooks_enabled(self.model):
                _, cache = self.model.run_with_cache(self.task.clean_tokens,
                                                     names_filter=names + z_names + kv_names + resid_names
                                                     + mlp_in_names + [final_name])
                clean = stack(cache)
                self._clean_resid = [cache[name] for name in resid_names]  # [n, pos, d_model] each
                self._clean_mlp_in = [cache[name] for name in mlp_in_names]  # receivers' inputs (exact receivers)
                self._clean_final = cache[final_name]
                clean_z = [cache[name] for name in z_names]  # [n, pos, head, d_head] each
                # keys and values before rotary, as the key-value cache holds them (q/k norms applied), key/value
                # heads ungrouped: [n, pos, head, d_head]
                self._clean_kv = [keys_values_as_cached(self.model.blocks[layer].attn,
                                                        cache[f"blocks.{layer}.attn.hook_k"],
                                                        cache[f"blocks.{layer}.attn.hook_v"])
                                  for layer in range(self.n_layers)]
                corrupt, corrupt_z = None, [None] * self.n_layers
                if self.ablation == "patch":
                    _, cache = self.model.run_with_cache(self.task.corrupt_tokens, names_filter=names + z_names)
                    corrupt = stack(cache)
                    corrupt_z = [cache[name] for name in z_names]
            # heads' ablated z: a head's ablated output is its ablated z times W_O under every ablation
            self._ablated_z = [ablation_value(self.ablation, clean_z[layer], corrupt_z[layer], *self._lengths())
                               for layer in range(self.n_layers)]
            self.forwards += 1 + int(corrupt is not None)
            self._sender_values = (clean, ablation_value(self.ablation, clean, corrupt, *self._lengths(), pos_dim=2))
        return self._sender_values

    # -- node ablation ------------------------------------------------------------------------

    def node_metric(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep [copies, n_nodes]`` (1 keeps, 0 ablates) -> metric ``[copies]``, ``max_copies`` per forward."""
        keep = keep.to(self.task.clean_tokens.device, torch.float32)
        return torch.cat([self._node_metric_chunk(chunk) for chunk in keep.split(self.max_copies)])

    @torch.no_grad()
    def _node_metric_chunk(self, keep: torch.Tensor) -> torch.Tensor:
        hooks = node_ablation_hooks(self.node_values(), keep.view(keep.shape[0], self.n_layers, self.per_layer),
                                    len(self.task), self.n_heads, self.has_mlp)
        return self._run_to_metric(self._tokens(keep.shape[0]), hooks)

    def node_attribution(self, steps: int = 1) -> torch.Tensor:
        """AtP (``steps=1``) or AtP-IG (``steps`` midpoints) node scores ``[n_nodes]``.

        Every node's value is set to ``clean + alpha * (ablated - clean)`` while gradients flow through
        it as through the identity, so each node's gradient includes its paths through later nodes.
        Score = ``(ablated - clean) . mean_alpha grad``. At ``alpha = 0`` (AtP) this is the exact derivative;
        for IG all nodes move together in one batched pass, a cheaper stand-in for one IG path per node
        (exact, complete IG when no node feeds another).
        """
        hooks, leaves = node_interpolation_hooks(self.node_values(), len(self.task), steps)
        with torch.enable_grad():
            logits = self._run(self._tokens(steps), hooks)
            total = self._score(logits).sum() / steps
            grads = torch.autograd.grad(total, [leaf for leaf, _ in leaves.values()])
        scores = torch.zeros(self.n_layers, self.per_layer, device=logits.device)
        for (name, (_, delta)), grad in zip(leaves.items(), grads, strict=False):
            layer = int(name.split(".")[1])
            contribution = (delta.repeat(steps, *[1] * (delta.dim() - 1)) * grad)
            if name.endswith("hook_z"):
                scores[layer, : self.n_heads] = contribution.sum(dim=(0, 1, 3))
            else:
                scores[layer, self.n_heads] = contribution.sum()
        return scores.flatten()

    # -- edge ablation ------------------------------------------------------------------------

    def edge_metric(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep [copies, n_edges]`` -> metric ``[copies]``, ``max_copies`` per forward.

        With ``skip_clean_prefix``, copies are grouped by the first layer they remove an edge into, and each
        group's forward starts there from the clean residual stream: in an ACDC chain most copies try an edge
        late in the model, and a batch-wide start would run every copy from the earliest one's layer."""
        keep = keep.to(self.task.clean_tokens.device, torch.float32)
        if not self.skip_clean_prefix:
            return torch.cat([self._edge_metric_chunk(chunk, 0) for chunk in keep.split(self.max_copies)])
        starts = self._start_layers(keep)
        metric = keep.new_empty(keep.shape[0])
        for start_layer in starts.unique().tolist():
            rows = (starts == start_layer).nonzero()[:, 0]
            for chunk in rows.split(self.max_copies):
                metric[chunk] = self._edge_metric_chunk(keep[chunk], start_layer)
        return metric

    def _start_layers(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep [copies, n_edges]`` -> ``[copies]`` the first layer whose block input changes: the layer of
        the earliest receiver with a removed edge (``n_layers`` when only edges into the logits are removed)."""
        starts = torch.full((keep.shape[0],), self.n_layers, dtype=torch.long, device=keep.device)
        for names, first, n_r, n_s in reversed(self._receiver_groups):  # the earliest receiver is set last
            layer = self.n_layers if names[0].endswith("hook_resid_post") else int(names[0].split(".")[1])
            starts[(keep[:, first:first + n_r * n_s] < 1).any(dim=1)] = layer
        return starts

    def _shared_positions(self) -> int:
        """Leading positions at which every ablation pattern's forward is the clean run: under patch
        ablation, positions before the first token where any clean and corrupt prompt differ (each sender's
        output equals its ablation there, so no edge removal changes anything). Their keys and values are
        read from the clean run; the forward runs the later positions only."""
        if (self.ablation != "patch" or not self.skip_clean_prefix
                or self.model.cfg.positional_embedding_type == "shortformer"
                or not prefix_keys_reproducible(self.model)):
            return 0
        task = self.task
        return int(first_differences(task.clean_tokens, task.corrupt_tokens, task.clean_last).min())

    def _clean_kv_cache(self, copies: int, positions: int) -> TransformerLensKeyValueCache:
        """The clean run's keys and values at the first ``positions``, for ``copies`` patterns (frozen)."""
        n = len(self.task)
        return frozen_prefix_cache([(repeat_copies(keys[:, :positions], copies, n),
                                     repeat_copies(values[:, :positions], copies, n)) for keys, values in self._clean_kv])

    @torch.no_grad()
    def _edge_metric_chunk(self, keep: torch.Tensor, start_layer: int) -> torch.Tensor:
        """The metric of ``keep [copies, n_edges]`` from a forward that starts at ``start_layer`` (every copy
        reads the clean residual stream there: no edge into an earlier receiver is removed)."""
        copies, n = keep.shape[0], len(self.task)
        removed = 1.0 - keep.repeat_interleave(n, dim=0)  # [copies * n, n_edges]
        if self.skip_clean_prefix and own_blocks_supported(self.model):
            return self._own_blocks().edge_metric(removed, copies, start_layer)
        skip = self._shared_positions()
        clean, ablated = self._sender_outputs()
        clean, ablated = clean[:, :, skip:], ablated[:, :, skip:]  # [n | 1, senders, pos - skip, d_model]
        if start_layer == self.n_layers:  # only edges into the logits: no block runs, every sender is clean
            _, first, _, n_s = self._receiver_groups[-1]
            senders = SenderDiffs(clean, ablated, copies, n_s)
            correction = senders.removed_sum(removed[:, first:first + n_s].view(-1, 1, n_s))[:, 0]
            self.forwards += 1  # the final norm and unembedding: counted as a (short) forward
            final = repeat_copies(self._clean_final[:, skip:], copies, n) - correction
            return self._metric_from_final(final, skip)
        return hooked_edge_forward(self, removed, copies, start_layer, skip, clean, ablated)

    def _own_blocks(self) -> OwnBlocks:
        """The edge-patching forward that runs the blocks itself (:mod:`.own_blocks`), built on first use."""
        if self._own is None:
            self._own = OwnBlocks(self)
        return self._own

    def edge_attribution(self, steps: int = 1, receivers: str = "linear") -> torch.Tensor:
        """AtP / AtP-IG edge scores ``[n_edges]``: ``(sender_ablated - sender_clean) . grad(receiver input)``.

        For IG every sender's output is moved along ``clean + alpha * (ablated - clean)`` (gradients pass
        through as the identity) and receiver-input gradients are averaged over the ``steps`` midpoints.
        ``receivers``: ``linear`` (plain AtP, above), ``exact`` or ``secant`` (each receiver rerun with the
        edge removed, AtP*'s QK fix extended to values and MLPs; ``secant`` also scales the part along the
        receiver's own ablation by its exact node effect): see :mod:`featcircuits.circuits.receivers`.
        """
        if check_receivers(receivers) != "linear" and steps != 1:
            raise ValueError(f"receivers={receivers!r} is an AtP estimator (steps=1); integrated gradients "
                             "(steps > 1) use receivers='linear'.")
        if steps == 1 and receivers == "linear" and own_blocks_supported(self.model):
            return self._own_blocks().edge_attribution()
        clean, ablated = self._sender_outputs()
        n = len(self.task)
        delta = repeat_copies(ablated, 1, n) - clean  # [n, senders, pos, d_model]
        alphas = interpolation_alphas(steps, delta.device).repeat_interleave(n).view(-1, 1, 1, 1)
        targets = (clean.repeat(steps, 1, 1, 1) + alphas * delta.repeat(steps, 1, 1, 1)).requires_grad_()
        probes, receiver_inputs = receiver_probe_hooks([hook for names, *_ in self._receiver_groups for hook in names])
        hooks = sender_interpolation_hooks(targets, self.n_layers, self.n_heads, self.has_mlp) + probes
        with torch.enable_grad(), edge_hooks_enabled(self.model):
            total = self._score(self._run(self._tokens(steps), hooks)).sum() / steps
            names = list(receiver_inputs)
            target_grad, *input_grads = torch.autograd.grad(total, [targets] + [receiver_inputs[n] for n in names])
            grads = dict(zip(names, input_grads, strict=True))
        if receivers != "linear":
            return exact_edge_scores(self, target_grad, delta, secant=receivers == "secant")
        delta = delta.repeat(steps, 1, 1, 1)
        scores = []
        for hook_names, _, _, n_senders in self._receiver_groups:
            # q, k and v inputs each carry the residual; reduce, not sum(), so the type stays a Tensor
            grad = functools.reduce(torch.add, (grads[name] for name in hook_names))
            grad = grad if grad.dim() == 4 else grad.unsqueeze(2)  # [batch, pos, receivers, d_model]
            scores.append(torch.einsum("bspd,bprd->rs", delta[:, :n_senders], grad).flatten())
        return torch.cat(scores)
