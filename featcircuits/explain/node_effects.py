"""The measured effect of ablating each of a graph's most influential nodes, one at a time, on its targets.

An edge weight is a direct effect in the frozen local model; what a researcher wants on a node's card is what
happens to the output when that node is switched off in the model itself. Each of the ``n_nodes`` most
influential feature and error nodes is zeroed at its position in its own batch row of one live forward of the
replacement model (features downstream recomputed, attention and norms live), and every target's read-out
(its affine function of the unembedding input, as in the graph) is compared with the unablated run.
"""

from __future__ import annotations

import torch

from ..graph.attribution_graph import ERROR, FEATURE, AttributionGraph
from ..graph.influence import node_influence, normalize_adjacency

__all__ = ["measure_node_effects"]


@torch.no_grad()
def measure_node_effects(graph: AttributionGraph, n_nodes: int = 16, batch_size: int = 32) -> dict[str, list[float]]:
    """Ablate each of the ``n_nodes`` most influential feature/error nodes alone; per node id, the change of
    every target ``[n_targets]`` (ablated minus clean). Stored in ``graph.node_effects`` and returned."""
    if graph.replacement is None or graph.clean is None or graph.tokens is None:
        raise ValueError("measure_node_effects needs the graph's ReplacementModel: build the graph, or load it with "
                         "AttributionGraph.load(path, model=replacement).")
    if n_nodes < 1:
        raise ValueError(f"n_nodes={n_nodes}; measure at least one node.")
    rm, keys = graph.replacement, graph.node_keys
    kinds = keys[:, 0]
    candidates = ((kinds == FEATURE) | (kinds == ERROR)).nonzero()[:, 0]
    influence = node_influence(normalize_adjacency(graph.adjacency), graph.target_weights)
    chosen = candidates[influence[candidates].argsort(descending=True)[:n_nodes]]
    target_pos = [t.pos % graph.clean.n_pos for t in graph.targets]
    vectors = torch.stack([t.vector for t in graph.targets])  # [n_targets, d_model]
    biases = torch.tensor([t.bias for t in graph.targets], device=vectors.device, dtype=vectors.dtype)

    def readouts(final: torch.Tensor) -> torch.Tensor:  # [batch, pos, d_model] -> [batch, n_targets]
        at = final[:, target_pos]  # [batch, n_targets, d_model]
        return (at * vectors).sum(-1) + biases

    clean = readouts(rm.run(graph.tokens, compute_logits=False).final)[0]
    ids = graph.node_ids
    effects: dict[str, list[float]] = {}
    for rows in chosen.split(batch_size):
        row_keys = keys[rows]
        batch = len(rows)
        feature_masks: dict[str, torch.Tensor] = {}
        error_masks: dict[str, torch.Tensor] = {}
        for row, (kind, site_index, pos, feature) in enumerate(row_keys.tolist()):
            site = rm.sites[site_index]
            if kind == FEATURE:
                mask = feature_masks.setdefault(site.name, torch.ones(batch, graph.clean.n_pos, site.d_sae,
                                                                      device=keys.device))
                mask[row, pos, feature] = 0.0
            else:
                mask = error_masks.setdefault(site.name, torch.ones(batch, graph.clean.n_pos, 1, device=keys.device))
                mask[row, pos] = 0.0
        out = rm.run(graph.tokens, batch_size=batch, compute_logits=False,
                     feature_acts={name: (lambda acts, m=m: acts * m.to(acts.dtype)) for name, m in feature_masks.items()},
                     errors={name: (lambda error, m=m: error * m.to(error.dtype)) for name, m in error_masks.items()})
        change = readouts(out.final) - clean  # [batch, n_targets]
        for row, index in enumerate(rows.tolist()):
            effects[ids[index]] = [float(v) for v in change[row]]
    graph.node_effects = effects
    return effects
