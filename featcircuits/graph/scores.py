"""Replacement and completeness scores of an attribution graph, as circuit-tracer defines them.

Definitions follow ``compute_graph_scores`` in circuit-tracer's ``circuit_tracer/graph.py``
(safety-research/circuit-tracer), written afresh here:

* replacement score: of the influence that the embeddings and the error nodes have on the targets,
  the fraction held by the embeddings, i.e. how much of the path from tokens to targets runs through
  features rather than through unexplained error terms;
* completeness score: for every node, the fraction of its (absolute, normalised) input that does not
  come from error nodes, averaged with weights ``influence on the targets + own target weight``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .attribution_graph import EMBEDDING, ERROR, AttributionGraph
from .influence import node_influence, normalize_adjacency

__all__ = ["GraphScores", "graph_scores"]


@dataclass
class GraphScores:
    replacement_score: float
    completeness_score: float

    def __str__(self) -> str:
        return f"replacement_score={self.replacement_score:.4f} completeness_score={self.completeness_score:.4f}"


def graph_scores(graph: AttributionGraph) -> GraphScores:
    """Both scores, each in [0, 1] (1: everything explained by features)."""
    weights = graph.target_weights
    normalized = normalize_adjacency(graph.adjacency)
    influence = node_influence(normalized, weights)
    is_error, is_embedding = graph.mask(ERROR), graph.mask(EMBEDDING)
    embedding_influence = influence[is_embedding].sum()
    error_influence = influence[is_error].sum()
    replacement = embedding_influence / (embedding_influence + error_influence).clamp(min=1e-30)
    non_error_fraction = 1 - normalized[:, is_error].sum(dim=1)
    output_influence = influence + weights
    completeness = (non_error_fraction * output_influence).sum() / output_influence.sum().clamp(min=1e-30)
    return GraphScores(float(replacement), float(completeness))
