"""Edges between feature and error nodes, taken from the linear graph of the local replacement model.

The local replacement model of a prompt is the frozen replacement model (the clean run's attention
patterns and normalisation scales, error terms as inputs) with every dictionary's features recomputed
from their input. From feature activations and error terms to each site's encoder pre-activations and to
the final residual stream it is linear, so a sender's (feature or error node) direct effect on a receiver
(a later feature's pre-activation, or the logits through the final residual stream) is an exact edge
weight, the linear graph's edge. Removing the edge ``u -> d`` gives that one edge the sender's ablated
value::

    pre_d  =  pre_d(current run)  +  W_du * (ablated_u - current_u)

(the same on the last position's final residual stream for edges into the logits). Features that are not
nodes (equal in the clean and the ablated runs, e.g. inactive in both) hold their clean value, as they do
in the linear graph, which has no place for them. Removing every edge out of ``u`` is then ablating node
``u``; removing every edge ablates every node.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..nodes import Node
from ..patching.ablation import interpolation_alphas
from ..patching.direct_effects import DirectEffects
from ..patching.logits import unembed
from .features import FeatureGraph
from .tasks import is_distance

__all__ = ["FeatureEdgeGraph"]

LOGITS = Node("logits").id
# Under a distance metric the gradient at the clean run is zero, so candidate edges are ranked by AtP-IG
# with this many points instead of by AtP.
DISTANCE_RANKING_STEPS = 8


class FeatureEdgeGraph:
    """Edges of ``nodes`` (a :class:`FeatureGraph` with one node per position) for edge AtP and ACDC.

    Args:
        nodes: the feature/error nodes, their task, ablation and metric.
        max_edges: keep only this many candidate edges, those with the largest |AtP| score (AtP-IG under
            a distance metric; all edges with a non-zero weight when None). Edges left out always stay in
            the model.
        chunk: receivers whose weights one batched backward pass computes.
        engine: how edge weights are taken (:class:`featcircuits.patching.direct_effects.DirectEffects`):
            ``"linear"`` (the frozen model's transpose, as ``build_graph``), ``"autograd"``, or ``"auto"``.
        progress: show a bar over the backward passes that build the weights. Their memory is estimated
            (and refused over a budget) by :func:`featcircuits.circuits.edge_memory.check_feature_edge_memory`.

    Attributes:
        edge_ids: ``(sender node id, receiver node id or "logits")`` in topological order of receivers.
        complete: every non-zero edge is a candidate.
        free_removals: ``complete`` and every dictionary's activation elementwise: ACDC may then remove edges
            into nodes that left the circuit without a forward.
    """

    measured_in = "frozen local replacement"  # the model its ablations run in (Circuit.measured_in)

    def __init__(self, nodes: FeatureGraph, max_edges: int | None = None, chunk: int = 64,
                 engine: str = "auto", progress: bool = False) -> None:
        if nodes.positions != "each":
            raise ValueError("Feature edges connect nodes at positions; build the FeatureGraph with "
                             "positions='each' (positions='sum' has no per-position edges).")
        if max_edges is not None and max_edges < 1:
            raise ValueError(f"max_edges={max_edges}; keep at least one edge, or None for all.")
        left_out = [s.name for s in nodes.rm.sites if s.dictionary is not None and s.name not in nodes.feature_sites]
        if left_out:
            # their features would be neither nodes nor recomputed, cutting every path through them
            raise ValueError(f"Feature edges need every dictionary's features as nodes; the FeatureGraph leaves "
                             f"out {left_out}. Build it with sites=None, or drop those dictionaries.")
        self.nodes, self.rm, self.task = nodes, nodes.rm, nodes.task
        self.ablation, self.metric_fn, self.max_copies = nodes.ablation, nodes.metric_fn, nodes.max_copies
        self.node_ids = list(nodes.node_ids)
        self.clean_last, self.full_metric = nodes.clean_last, nodes.full_metric
        self.forwards = 0
        self._chunk = chunk
        self._ranking_steps = DISTANCE_RANKING_STEPS if is_distance(self.metric_fn) else 1
        self._masks: dict[tuple[int, str], torch.Tensor] = {}  # (prompt, site) -> node mask [pos, d_sae]
        self._values: dict[tuple[int, int], torch.Tensor] = {}  # (prompt, clean 0 / ablated 1) -> [n_nodes]
        self._index_nodes()
        self._clean_runs = [self.rm.clean_run(nodes._prompt(i)) for i in range(len(self.task))]
        self.forwards += len(self.task)
        # the linear graph's edge weights, per prompt: the frozen model's transpose where it runs the model
        self._effects = [DirectEffects(self.rm, clean, engine) for clean in self._clean_runs]
        self.engine = self._effects[0].engine
        self._collect_edges(max_edges, progress)
        self._effects = []  # only the weights needed them
        # ACDC may remove an edge into a feature that feeds nothing kept without measuring it only if no
        # other feature reads that feature's pre-activation: not under TopK, whose top k depend on every one
        self.free_removals = self.complete and all(
            getattr(site.dictionary.activation, "elementwise", False)
            for site in self.rm.sites if site.dictionary is not None)

    # -- nodes ----------------------------------------------------------------------------------

    def _index_nodes(self) -> None:
        site_order = {site.name: i for i, site in enumerate(self.rm.sites)}
        n = len(self.node_ids)
        self._site = torch.empty(n, dtype=torch.long)
        self._pos = torch.empty(n, dtype=torch.long)
        self._feat = torch.full((n,), -1, dtype=torch.long)
        self._is_error = torch.zeros(n, dtype=torch.bool)
        for key, site, start, pos, feats in self.nodes._site_units:
            span = slice(start, start + len(feats))
            self._site[span] = site_order[site]
            self._pos[span] = pos.cpu()
            if key.startswith("error:"):
                self._is_error[span] = True
            else:
                self._feat[span] = feats.cpu()
        self._receivers = (~self._is_error).nonzero()[:, 0]  # feature nodes; the logits come last
        self._site_index = site_order
        self._site_nodes = {i: ((self._site == i) & ~self._is_error).nonzero()[:, 0] for i in site_order.values()}

    def _sender_delta(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per node: ablated minus clean feature activation ``[n_nodes]`` (0 for errors), and per site
        the error terms' ablated minus clean ``[pos, d_model]``."""
        values = self.nodes.values[index]
        n_pos = self._clean_runs[index].n_pos
        delta = torch.zeros(len(self.node_ids))
        errors = {key.split(":", 1)[1]: (ablated - clean).detach() for key, (clean, ablated) in values.items()
                  if key.startswith("error:")}
        for key, _, start, pos, feats in self.nodes._site_units:
            if key.startswith("feat:"):
                clean, ablated = values[key]
                inside = pos < n_pos
                diff = (ablated - clean)[pos[inside], feats[inside]].detach().float().cpu()
                delta[start:start + len(feats)][inside.cpu()] = diff
        return delta, errors

    # -- edge weights -----------------------------------------------------------------------------

    def _jacobian_rows(self, index: int, receivers: torch.Tensor | None,
                       final_dims: torch.Tensor | None = None) -> torch.Tensor:
        """Direct effects on ``receivers`` (feature node indices; None: the last position's final residual
        stream at dimensions ``final_dims``) of every node: ``[rows, n_nodes]``, per unit of a feature's
        activation, and for an error node its whole ablation (ablated minus clean error term)."""
        clean = self._clean_runs[index]
        rows = receivers if receivers is not None else final_dims
        assert rows is not None, "rows of the final residual need final_dims"
        weights = torch.zeros(len(rows), len(self.node_ids))
        if receivers is not None and not (self._pos[receivers] < clean.n_pos).any():
            return weights  # every receiver lies past this prompt's end
        if receivers is None:
            grads = self._effects[index].grads(None, final_dims)
        else:
            inside = self._pos[receivers] < clean.n_pos  # receivers past a shorter prompt get no weights
            pos = torch.where(inside, self._pos[receivers], torch.zeros_like(receivers))
            grads = self._effects[index].grads((self._site[receivers], pos, self._feat[receivers]))
            # rows of receivers outside the prompt: zeroed (their seed sat at position 0 only to keep shapes)
            grads = {name: grad * inside.to(grad.device, grad.dtype).view(-1, 1, 1) for name, grad in grads.items()}
        self.forwards += 1
        _, error_delta = self._sender_delta(index)
        for key, site, start, pos, feats in self.nodes._site_units:
            grad = grads.get(site if key.startswith("feat:") else "error:" + site)
            if grad is None:
                continue
            inside = pos < clean.n_pos
            if key.startswith("feat:"):
                values = grad[:, pos[inside], feats[inside]]
            else:
                values = (grad[:, pos[inside]] * error_delta[site][pos[inside]]).sum(-1)
            weights[:, start:start + len(feats)][:, inside.cpu()] = values.detach().float().cpu()
        return weights

    def _metric_gradients(self, index: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean over the IG points ``clean + alpha (ablated - clean)`` of the metric's gradient with respect
        to every feature node's pre-activation ``[n_nodes]`` and the last final residual ``[d_model]``."""
        clean = self._clean_runs[index]
        values = self.nodes.values[index]
        device = clean.final.device
        alphas = interpolation_alphas(steps, device).view(-1, 1, 1)
        shifts = {name: torch.zeros(steps, *acts.shape, device=device, requires_grad=True)
                  for name, acts in clean.feature_acts.items()}
        final_shift = torch.zeros(steps, clean.final.shape[-1], device=device, requires_grad=True)
        targets = {key: clean_v + alphas * (ablated - clean_v) for key, (clean_v, ablated) in values.items()}

        def features(name: str, x: torch.Tensor) -> torch.Tensor:
            d = self.rm.site(name).dictionary
            acts = d.activation(d.pre_acts(x) + shifts[name])
            # every node sits at its interpolated value, gradients passing through it as the identity; the
            # other features hold their clean value
            held = targets.get("feat:" + name, clean.feature_acts[name])
            return held + self._node_mask(index, name) * (acts - acts.detach())

        errors = {key.split(":", 1)[1]: target for key, target in targets.items() if key.startswith("error:")}
        with torch.enable_grad():
            out = self.rm.run(clean.tokens, clean=clean, errors=errors, batch_size=steps,
                              features_from_inputs=features, compute_logits=False)
            logits = unembed(self.rm.model, out.final[:, -1] + final_shift)
            metric = self._prompt_metric(index, logits).sum() / steps
            grads = torch.autograd.grad(metric, [*shifts.values(), final_shift])
        self.forwards += 1
        by_site = dict(zip(shifts, grads[:-1], strict=True))
        node_grad = torch.zeros(len(self.node_ids))
        for key, site, start, pos, feats in self.nodes._site_units:
            if key.startswith("feat:"):
                inside = pos < clean.n_pos
                node_grad[start:start + len(feats)][inside.cpu()] = \
                    by_site[site].sum(0)[pos[inside], feats[inside]].detach().float().cpu()
        return node_grad, grads[-1].sum(0).detach().float().cpu()

    def _prompt_metric(self, index: int, last_logits: torch.Tensor) -> torch.Tensor:
        """The task metric with prompt ``index`` at ``last_logits [copies, vocab]`` and every other prompt at
        its clean logits: its gradient is that prompt's share of the metric's."""
        last = self.clean_last[None].expand(last_logits.shape[0], -1, -1).clone()
        last[:, index] = last_logits
        return self.metric_fn(self.task, last, self.clean_last)

    def _collect_edges(self, max_edges: int | None, progress: bool) -> None:
        """Candidate edges (non-zero weight in some prompt), their per-prompt weights and AtP scores."""
        n_prompts = len(self.task)
        d_model = self._clean_runs[0].final.shape[-1]
        n_chunks = -(-len(self._receivers) // self._chunk) + -(-d_model // self._chunk)
        bar = tqdm(total=n_prompts * (n_chunks + 1), desc=f"feature edge weights ({len(self.node_ids)} nodes)",
                   unit="pass", disable=not progress)
        gradients = [self._metric_gradients(i, self._ranking_steps) for i in range(n_prompts)]
        bar.update(n_prompts)
        # a feature's weight is per unit of activation, an error's is its whole ablation
        per_unit = torch.stack([self._sender_delta(i)[0] for i in range(n_prompts)]) + self._is_error.float()
        # per receiver chunk, edges into features: senders, receivers, scores [edges], weights [edges, prompts];
        # chunks come in receiver order and nonzero() walks rows then senders, so the pools stay sorted by
        # (receiver, sender): the topological order, with no sort
        pools: tuple[list[torch.Tensor], ...] = ([], [], [], [])
        self.complete = True

        def pooled() -> int:
            return sum(len(x) for x in pools[2])

        def keep_best(k: int) -> None:
            best = torch.cat(pools[2]).abs().topk(min(k, pooled())).indices.sort().values  # sorted: order kept
            for pool in pools:
                joined = torch.cat(pool)
                pool[:] = [joined[best]]
            self.complete = False

        for chunk in self._receivers.split(self._chunk):
            w = torch.stack([self._jacobian_rows(i, chunk) for i in range(n_prompts)])  # [prompts, rows, nodes]
            bar.update(n_prompts)
            rows, senders = (w != 0).any(0).nonzero(as_tuple=True)
            weight = w[:, rows, senders]  # [prompts, edges]
            del w
            grads = torch.stack([g[0][chunk[rows]] for g in gradients])  # at each edge's receiver
            for pool, part in zip(pools, (senders, chunk[rows], (weight * per_unit[:, senders] * grads).sum(0),
                                          weight.T), strict=True):
                pool.append(part)
            if max_edges is not None and pooled() > 2 * max_edges:
                keep_best(max_edges)
        # edges into the logits: rows are the last position's final residual dimensions
        dims = torch.arange(d_model).split(self._chunk)
        w = torch.stack([torch.cat([self._jacobian_rows(i, None, d) for d in dims])
                         for i in range(n_prompts)])  # [prompts, d_model, nodes]
        bar.update(n_prompts * len(dims))
        bar.close()
        grads = torch.stack([g[1] for g in gradients])  # [prompts, d_model]
        logit_senders = (w != 0).any(0).any(0).nonzero()[:, 0]
        logit_scores = (torch.bmm(grads[:, None, :], w)[:, 0] * per_unit).sum(0)[logit_senders]
        logit_weights = w[:, :, logit_senders].permute(2, 0, 1)  # [edges, prompts, d_model]
        del w

        def joined(pool: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
            out = torch.cat(pool) if pool else empty
            pool.clear()  # the pieces go as soon as they are joined
            return out

        sender, receiver = (joined(pool, torch.zeros(0, dtype=torch.long)) for pool in pools[:2])
        score, weight = joined(pools[2], torch.zeros(0)), joined(pools[3], torch.zeros(0, n_prompts))
        if max_edges is not None and len(score) + len(logit_scores) > max_edges:
            # exactly max_edges, ties broken by topk; sorted indices keep the order
            best = torch.cat([score, logit_scores]).abs().topk(max_edges).indices.sort().values
            into_features, into_logits = best[best < len(score)], best[best >= len(score)] - len(score)
            sender, receiver, score, weight = (x[into_features] for x in (sender, receiver, score, weight))
            logit_senders, logit_scores, logit_weights = (x[into_logits] for x in
                                                          (logit_senders, logit_scores, logit_weights))
            self.complete = False
        # receivers in topological order (node order is site-major), the logits last
        self._edge_sender = torch.cat([sender, logit_senders])
        self._edge_receiver = torch.cat([receiver, torch.full_like(logit_senders, -1)])
        self._feature_weights, self._logit_weights = weight, logit_weights
        self._ranking_scores = torch.cat([score, logit_scores])  # AtP, or AtP-IG under a distance
        self.n_feature_edges = len(score)
        del sender, score, weight
        # the edges into each site's features: one run of the receiver-sorted edges
        self._edges_into = {}
        for site_index, site_nodes in self._site_nodes.items():
            if len(site_nodes):
                ends = torch.searchsorted(receiver, torch.stack([site_nodes.min(), site_nodes.max() + 1]))
                self._edges_into[site_index] = slice(int(ends[0]), int(ends[1]))
        ids = self.node_ids
        self.edge_ids: list[tuple[str, str]] = [
            (ids[s], ids[r] if r >= 0 else LOGITS)
            for s, r in zip(self._edge_sender.tolist(), self._edge_receiver.tolist(), strict=True)]

    # -- running ------------------------------------------------------------------------------

    def edge_metric(self, keep: torch.Tensor) -> torch.Tensor:
        """``keep [copies, n_edges]`` (1 keeps, 0 removes) -> metric ``[copies]`` in the local replacement
        model; one batched forward per prompt per ``max_copies`` patterns."""
        keep = keep.float().cpu()
        return torch.cat([self._edge_metric_chunk(chunk) for chunk in keep.split(self.max_copies)])

    @torch.no_grad()
    def _edge_metric_chunk(self, keep: torch.Tensor) -> torch.Tensor:
        last = [self._last_logits(index, keep) for index in range(len(self.task))]
        return self.metric_fn(self.task, torch.stack(last, dim=1), self.clean_last).cpu()

    def _last_logits(self, index: int, keep: torch.Tensor) -> torch.Tensor:
        """Prompt ``index``'s last logits ``[copies, vocab]`` with the edges ``keep [copies, n_edges]`` marks 0
        removed."""
        clean = self._clean_runs[index]
        copies, n_f, device = keep.shape[0], self.n_feature_edges, clean.final.device
        sender, receiver = self._edge_sender, self._edge_receiver
        ablated = self._node_values(index, 1)
        current = self._node_values(index, 0).repeat(copies, 1)  # every node's value in each pattern

        def change(edges: slice) -> torch.Tensor:
            # per removed edge, the sender's ablated minus current value (an error edge's weight is whole):
            # [copies, edges], built in place on one run of edges (peak: two [copies, edges] tensors)
            s = sender[edges]
            delta = ablated[s] - current[:, s]
            delta.masked_fill_(self._is_error[s], 1.0)
            return delta.mul_(1.0 - keep[:, edges])

        def features(name: str, x: torch.Tensor) -> torch.Tensor:
            site_index = self._site_index[name]
            d = self.rm.site(name).dictionary
            pre = d.pre_acts(x)
            edges = self._edges_into.get(site_index)
            if edges is not None and edges.stop > edges.start:
                amount = change(edges).mul_(self._feature_weights[edges, index])
                r = receiver[edges]
                # a receiver past this prompt's end has weight 0 here; any index inside the prompt holds it
                flat = self._pos[r].clamp(max=clean.n_pos - 1) * pre.shape[-1] + self._feat[r]
                correction = torch.zeros(copies, pre.shape[1] * pre.shape[2]).index_add_(1, flat, amount)
                pre = pre + correction.view_as(pre).to(device, pre.dtype)
            nodes = self._site_nodes[site_index]
            nodes = nodes[self._pos[nodes] < clean.n_pos]
            pos, feat = self._pos[nodes].to(device), self._feat[nodes].to(device)
            acts = clean.feature_acts[name].to(pre.dtype).expand_as(pre).clone()  # features that are not nodes hold
            acts[:, pos, feat] = d.activation(pre)[:, pos, feat]
            current[:, nodes] = acts[:, pos, feat].float().cpu()
            return acts

        out = self.rm.run(clean.tokens, clean=clean, batch_size=copies, features_from_inputs=features,
                          compute_logits=False)
        self.forwards += 1
        final = out.final[:, -1]
        if len(self._logit_weights):
            correction = torch.einsum("ce,ed->cd", change(slice(n_f, len(sender))), self._logit_weights[:, index])
            final = final + correction.to(device, final.dtype)
        return unembed(self.rm.model, final)

    def edge_attribution(self, steps: int = 1, receivers: str = "linear") -> torch.Tensor:
        """AtP (``steps=1``) / AtP-IG edge scores ``[n_edges]``: weight x (ablated - clean sender value) x
        the metric's gradient at the receiver (mean over the IG points)."""
        if receivers != "linear":
            raise ValueError(f"receivers={receivers!r}: feature edges are exact linear maps, so only "
                             "receivers='linear' applies to them.")
        if steps == self._ranking_steps:
            return self._ranking_scores.clone()
        scores = torch.zeros(len(self.edge_ids))
        n_f = self.n_feature_edges
        s, r = self._edge_sender, self._edge_receiver[:n_f]
        for index in range(len(self.task)):
            node_grad, final_grad = self._metric_gradients(index, steps)
            per_unit = self._sender_delta(index)[0] + self._is_error.float()
            scores[:n_f] += self._feature_weights[:, index] * per_unit[s[:n_f]] * node_grad[r]
            scores[n_f:] += (self._logit_weights[:, index] @ final_grad) * per_unit[s[n_f:]]
        return scores

    def _node_mask(self, index: int, name: str) -> torch.Tensor:
        """``[pos, d_sae]``: 1 where prompt ``index``'s site ``name`` has a feature node."""
        cache = self._masks
        if (index, name) not in cache:
            clean = self._clean_runs[index]
            mask = torch.zeros_like(clean.feature_acts[name])
            nodes = self._site_nodes[self._site_index[name]]
            nodes = nodes[self._pos[nodes] < clean.n_pos]
            mask[self._pos[nodes], self._feat[nodes]] = 1.0
            cache[(index, name)] = mask
        return cache[(index, name)]

    def _node_values(self, index: int, which: int) -> torch.Tensor:
        """Clean (``which=0``) or ablated (1) activation of every feature node ``[n_nodes]`` in prompt
        ``index`` (0 for errors and positions past the prompt)."""
        cache = self._values
        if (index, which) not in cache:
            values = torch.zeros(len(self.node_ids))
            n_pos = self._clean_runs[index].n_pos
            for key, _, start, pos, feats in self.nodes._site_units:
                if key.startswith("feat:"):
                    inside = pos < n_pos
                    acts = self.nodes.values[index][key][which]
                    values[start:start + len(feats)][inside.cpu()] = acts[pos[inside], feats[inside]].float().cpu()
            cache[(index, which)] = values
        return cache[(index, which)]
