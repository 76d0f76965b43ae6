"""Total influence of every node on the targets through all paths of an attribution graph.

With ``A`` the adjacency ``[n_nodes, n_nodes]`` (row = target of an edge, column = source), each row
normalised to absolute values summing to one, the influence of the nodes on weighted targets ``w`` is
``w @ (A + A^2 + ...) = w @ ((I - A)^-1 - I)``. The graph is a DAG, so ``A`` is nilpotent and the series
is finite: it is summed by repeated vector-matrix products (no inverse, no dense ``n^2`` temporaries).
"""

from __future__ import annotations

import torch

__all__ = ["normalize_adjacency", "node_influence", "edge_influence"]


def normalize_adjacency(adjacency: torch.Tensor) -> torch.Tensor:
    """``|A|`` with each row summing to one (rows of nodes without inputs stay zero). ``[n, n]``"""
    absolute = adjacency.abs()
    return absolute / absolute.sum(dim=1, keepdim=True).clamp(min=1e-10)


def node_influence(normalized: torch.Tensor, target_weights: torch.Tensor, max_iter: int = 10_000) -> torch.Tensor:
    """``[n]`` influence of every node on the targets: ``w @ (A + A^2 + ...)``.

    Args:
        normalized: row-normalised adjacency ``[n, n]`` (:func:`normalize_adjacency`).
        target_weights: ``[n]`` weight of each node as a target (logit probabilities; zero elsewhere).
    """
    current = target_weights.to(normalized.dtype) @ normalized
    influence = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return influence
        current = current @ normalized
        influence += current
    raise RuntimeError(
        f"Influence did not converge in {max_iter} steps: the adjacency has a cycle, so it is not an "
        "attribution graph (edges must go from earlier to later nodes)."
    )


def edge_influence(normalized: torch.Tensor, target_weights: torch.Tensor) -> torch.Tensor:
    """``[n, n]`` influence of each edge: normalised weight times the influence of its target node."""
    influence = node_influence(normalized, target_weights) + target_weights.to(normalized.dtype)
    return normalized * influence[:, None]
