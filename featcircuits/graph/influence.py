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
                      chunk_entries: int = 1 << 24, row_level: torch.Tensor | None = None) -> torch.Tensor:
    """``[n_cols]`` influence on the targets of every column, from the rows computed so far.

    Args:
        rows: ``[n_rows, n_cols]`` adjacency rows, the target rows first (in ``target_weights`` order).
        row_node: ``[n_rows]`` the column of each row's own node (``-1`` for targets: no column).
        target_weights: ``[n_targets]``.
        row_level: ``[n_rows]`` optional level of each row's node (its site index; targets highest), such that
            a row only has non-zero entries in columns of lower levels (true of features: a site reads only
            earlier sites). The series is then summed in one pass from the top level down, each row read
            once, instead of one pass over all rows per path length.

    The rows are normalised as :func:`normalize_adjacency` does, but chunk by chunk of at most
    ``chunk_entries`` entries, so no copy of the (possibly many-GiB) rows is ever held.
    """
    n_rows, n_cols = rows.shape
    step = max(1, chunk_entries // max(1, n_cols))
    inverse_sums = torch.empty(n_rows, device=rows.device)
    for lo in range(0, n_rows, step):
        inverse_sums[lo:lo + step] = 1.0 / rows[lo:lo + step].abs().sum(dim=1).clamp(min=1e-10)
    n_targets = target_weights.numel()
    influence = torch.zeros(n_cols, device=rows.device)
    if row_level is not None:
        # influence(node) is final once every row of a higher level is in: levels from the top down
        order = torch.argsort(row_level, descending=True, stable=True)
        levels = row_level[order]
        boundaries = torch.nonzero(levels[1:] != levels[:-1]).squeeze(1) + 1
        starts = [0, *boundaries.tolist(), n_rows]
        for begin, end in zip(starts[:-1], starts[1:], strict=True):
            for lo in range(begin, end, step):
                chunk = order[lo:min(lo + step, end)]
                node = row_node[chunk]
                weight = torch.where(node >= 0, influence[node.clamp(min=0)],
                                     target_weights.to(influence.dtype)[chunk.clamp(max=max(0, n_targets - 1))])
                scaled = weight * inverse_sums[chunk]
                if scaled.any():
                    influence += scaled @ rows.index_select(0, chunk).abs()
        return influence
    current = torch.zeros(n_rows, device=rows.device)
    current[:n_targets] = target_weights.to(current.dtype)
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
