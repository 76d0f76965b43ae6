"""Total influence of every node on the targets through all paths of an attribution graph.

With ``A`` the adjacency ``[n_nodes, n_nodes]`` (row = target of an edge, column = source), each row
normalised to absolute values summing to one, the influence of the nodes on weighted targets ``w`` is
``w @ (A + A^2 + ...) = w @ ((I - A)^-1 - I)``. The graph is a DAG, so ``A`` is nilpotent and the series
is finite: it is summed by repeated vector-matrix products (no inverse, no dense ``n^2`` temporaries).
"""

from __future__ import annotations

import torch

__all__ = ["normalize_adjacency", "node_influence", "edge_influence", "partial_influence"]


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


def partial_influence(rows: torch.Tensor, row_node: torch.Tensor, target_weights: torch.Tensor,
                      chunk_entries: int = 1 << 24) -> torch.Tensor:
    """``[n_cols]`` influence on the targets of every column, from the rows computed so far.

    Args:
        rows: ``[n_rows, n_cols]`` adjacency rows, the target rows first (in ``target_weights`` order).
        row_node: ``[n_rows]`` the column of each row's own node (``-1`` for targets: no column).
        target_weights: ``[n_targets]``.

    The rows are normalised as :func:`normalize_adjacency` does, but chunk by chunk of at most
    ``chunk_entries`` entries, so no copy of the (possibly many-GiB) rows is ever held.
    """
    n_rows, n_cols = rows.shape
    step = max(1, chunk_entries // max(1, n_cols))
    inverse_sums = torch.empty(n_rows, device=rows.device)
    for lo in range(0, n_rows, step):
        inverse_sums[lo:lo + step] = 1.0 / rows[lo:lo + step].abs().sum(dim=1).clamp(min=1e-10)
    current = torch.zeros(n_rows, device=rows.device)
    current[: target_weights.numel()] = target_weights.to(current.dtype)
    influence = torch.zeros(n_cols, device=rows.device)
    has_row = row_node >= 0
    for _ in range(n_rows + 1):  # a DAG: at most one step per row before the series ends
        scaled = current * inverse_sums
        column_values = torch.zeros(n_cols, device=rows.device)
        for lo in (scaled.nonzero().squeeze(1) // step).unique().tolist():  # chunks with a non-zero weight
            chunk = slice(lo * step, (lo + 1) * step)
            column_values += scaled[chunk] @ rows[chunk].abs()
        if not column_values.any():
            break
        influence += column_values
        current = torch.zeros_like(current)
        current[has_row] = column_values[row_node[has_row]]
    return influence
