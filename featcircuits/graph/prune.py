"""Pruning attribution graphs: by influence on the targets (circuit-tracer's method), top-k, or threshold.

Every method returns a :class:`PruneResult` of masks; :func:`apply_prune` cuts the graph to them.
Embedding and target nodes are always kept; feature and error nodes left without an outgoing edge, and
feature nodes left without an incoming edge, are dropped (repeatedly, since each drop can strand others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..circuits.circuit import Circuit
from .attribution import GraphTooLargeError
from .attribution_graph import EMBEDDING, FEATURE, TARGET, AttributionGraph
from .influence import edge_influence, node_influence, normalize_adjacency

__all__ = ["PruneResult", "prune_graph", "prune_topk", "prune_threshold", "apply_prune", "cumulative_threshold",
           "prune_memory"]


@dataclass
class PruneResult:
    """``node_mask [n]`` and ``edge_mask [n, n]`` (row = target) of what is kept; ``influence [n]`` is
    each node's total influence on the targets, ``cumulative [n]`` its rank as the fraction of all
    influence held by nodes at least as influential (what circuit-tracer exports as ``influence``)."""

    node_mask: torch.Tensor
    edge_mask: torch.Tensor
    influence: torch.Tensor
    cumulative: torch.Tensor

    @property
    def n_nodes(self) -> int:
        return int(self.node_mask.sum())

    @property
    def n_edges(self) -> int:
        return int(self.edge_mask.sum())

    def to_circuit(self, graph: AttributionGraph, method: str = "prune") -> Circuit:
        """The kept part of ``graph`` as a :class:`~featcircuits.circuits.Circuit` that ``evaluate`` can score.

        Every node of the graph is a candidate, scored by its influence on the targets; the kept nodes are
        the selection. The candidate edges are the kept ones (the full graph can hold millions), scored by
        their weight. ``measured_in`` is ``"attribution graph"``: nothing was ablated yet; evaluating it
        (``fc.evaluate(circuit, make_graph(replacement, task))``) ablates every feature and error node of the
        task's graph that the circuit leaves out.
        """
        ids = graph.node_ids
        targets, sources = self.edge_mask.nonzero(as_tuple=True)
        weights = graph.adjacency[targets, sources].tolist()
        edge_ids = [(ids[s], ids[t]) for s, t in zip(sources.tolist(), targets.tolist(), strict=True)]
        kept = [ids[i] for i in self.node_mask.nonzero()[:, 0].tolist()]
        return Circuit(method, "nodes", list(ids), [float(v) for v in self.influence.tolist()], edge_ids,
                       [float(w) for w in weights], kept, edge_ids,
                       params={"n_nodes": self.n_nodes, "n_edges": self.n_edges}, measured_in="attribution graph")


def cumulative_threshold(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Smallest score among the top scores that together hold ``fraction`` of the total."""
    ordered = scores.flatten().sort(descending=True).values
    total = ordered.sum()
    if total <= 0:
        return ordered.new_tensor(float("inf"))
    cumulative = ordered.cumsum(0) / total
    index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype, device=cumulative.device)))
    return ordered[min(index, ordered.numel() - 1)]


def _influence(graph: AttributionGraph) -> tuple[torch.Tensor, torch.Tensor]:
    weights = graph.target_weights
    influence = node_influence(normalize_adjacency(graph.adjacency), weights)
    order = influence.argsort(descending=True)
    cumulative = torch.zeros_like(influence)
    total = influence.sum().clamp(min=1e-30)
    cumulative[order] = influence[order].cumsum(0) / total
    return influence, cumulative


def _drop_dangling(graph: AttributionGraph, node_mask: torch.Tensor, edge_mask: torch.Tensor) -> None:
    """In place: remove features/errors with no kept outgoing edge and features with no incoming edge."""
    kind = graph.node_keys[:, 0]
    always = (kind == EMBEDDING) | (kind == TARGET)
    node_mask |= always
    is_feature = kind == FEATURE
    while True:
        edge_mask &= node_mask[:, None] & node_mask[None, :]
        keep = node_mask & (always | edge_mask.any(dim=0))  # outgoing edges (column = source)
        keep &= ~is_feature | edge_mask.any(dim=1)  # incoming edges for features
        if torch.equal(keep, node_mask):
            return
        node_mask.copy_(keep)


# bytes per adjacency entry that influence pruning holds at once: the normalised adjacency, the edge scores,
# their sorted copy with its int64 indices and cumulative sums, and the masks
PRUNE_BYTES_PER_ENTRY = 32


def prune_memory(graph: AttributionGraph) -> int:
    """Bytes :func:`prune_graph` needs for ``graph`` beyond the graph itself."""
    return PRUNE_BYTES_PER_ENTRY * graph.n_nodes * graph.n_nodes


def prune_graph(graph: AttributionGraph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                memory_budget_gb: float | None = None) -> PruneResult:
    """Influence pruning: keep the most influential nodes holding ``node_threshold`` of all influence on
    the targets, then the most influential edges among them holding ``edge_threshold`` of edge influence,
    then drop dangling nodes. With ``memory_budget_gb``, a graph whose pruning would need more is refused
    before anything is allocated."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}.")
    if memory_budget_gb is not None and prune_memory(graph) > memory_budget_gb * 2**30:
        raise GraphTooLargeError(
            f"Pruning this graph ({graph.n_nodes} nodes) needs about {prune_memory(graph) / 2**30:.2f} GiB beside "
            f"it, more than memory_budget_gb={memory_budget_gb}. Build it with a smaller max_feature_nodes (the "
            f"need grows with the square of the node count), or raise the budget.")
    influence, cumulative = _influence(graph)
    node_mask = influence >= cumulative_threshold(influence, node_threshold)
    kind = graph.node_keys[:, 0]
    node_mask |= (kind == EMBEDDING) | (kind == TARGET)
    pruned = graph.adjacency * (node_mask[:, None] & node_mask[None, :])
    scores = edge_influence(normalize_adjacency(pruned), graph.target_weights)
    edge_mask = (scores >= cumulative_threshold(scores, edge_threshold)) & (pruned != 0)
    _drop_dangling(graph, node_mask, edge_mask)
    return PruneResult(node_mask, edge_mask, influence, cumulative)


def prune_topk(graph: AttributionGraph, n_nodes: int | None = None, n_edges: int | None = None) -> PruneResult:
    """Keep the ``n_nodes`` most influential feature/error nodes and the ``n_edges`` largest |weight| edges
    among the kept nodes (None: no limit), then drop dangling nodes."""
    influence, cumulative = _influence(graph)
    kind = graph.node_keys[:, 0]
    prunable = (kind != EMBEDDING) & (kind != TARGET)
    node_mask = ~prunable
    if n_nodes is None:
        node_mask |= prunable
    elif n_nodes > 0:
        scores = torch.where(prunable, influence, torch.full_like(influence, -1.0))
        node_mask[scores.topk(min(n_nodes, int(prunable.sum()))).indices] = True
    weights = (graph.adjacency * (node_mask[:, None] & node_mask[None, :])).abs()
    edge_mask = weights > 0
    if n_edges is not None:
        top = weights.flatten().topk(min(n_edges, weights.numel()))
        edge_mask = torch.zeros_like(edge_mask).flatten()
        edge_mask[top.indices[top.values > 0]] = True
        edge_mask = edge_mask.reshape(weights.shape)
    _drop_dangling(graph, node_mask, edge_mask)
    return PruneResult(node_mask, edge_mask, influence, cumulative)


def prune_threshold(graph: AttributionGraph, min_abs_weight: float) -> PruneResult:
    """Keep edges with ``|weight| >= min_abs_weight``, then drop dangling nodes."""
    influence, cumulative = _influence(graph)
    edge_mask = (graph.adjacency.abs() >= min_abs_weight) & (graph.adjacency != 0)
    node_mask = torch.ones(graph.n_nodes, dtype=torch.bool, device=edge_mask.device)
    _drop_dangling(graph, node_mask, edge_mask)
    return PruneResult(node_mask, edge_mask, influence, cumulative)


def apply_prune(graph: AttributionGraph, result: PruneResult) -> AttributionGraph:
    """The subgraph of kept nodes with only the kept edges (no model attached: its rows are partial)."""
    keep = result.node_mask.nonzero().squeeze(1)
    adjacency = (graph.adjacency * result.edge_mask)[keep][:, keep]
    return AttributionGraph(
        node_keys=graph.node_keys[keep], adjacency=adjacency, activations=graph.activations[keep],
        sites=graph.sites, targets=graph.targets, tokens=graph.tokens, prompt=graph.prompt,
        n_active_features=graph.n_active_features, n_prompts=graph.n_prompts,
    )
