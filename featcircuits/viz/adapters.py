"""Turn featcircuits objects into the graph JSON the viewer and the static renderer read.

* ``Circuit`` (``featcircuits.circuits.Circuit``, or its saved JSON dict): its selected nodes and edges;
  an edge's weight is its score and a node's influence its score. Node ids may be the library's
  feature-level scheme (``"mlp3:1207@5"``, ``"attn1:error@5"``, ``"embed@5"``, ``"logit:42@-1"``) or
  component ids (``"L3.H2"``, ``"L3.MLP"``, ``"embed"``, ``"logits"``).
* ``AttributionGraph`` (``featcircuits.graph``): through the graph module's own circuit-tracer export,
  ``featcircuits.graph.to_circuit_tracer_json`` (influence-pruned with its default thresholds).
* Objects that export graph JSON themselves (``to_graph_json()``) are read through that.
"""

from __future__ import annotations

import math
from typing import Any

from ..nodes import parse_node_id

__all__ = ["is_circuit_dict", "circuit_to_graph_json", "is_attribution_graph", "attribution_graph_to_graph_json"]



def is_circuit_dict(data: Any) -> bool:
    """True for the dict a ``Circuit`` saves (``Circuit.to_dict``)."""
    return isinstance(data, dict) and {"method", "level", "node_ids", "nodes"} <= set(data)


def is_attribution_graph(graph: Any) -> bool:
    """True for a ``featcircuits.graph.AttributionGraph`` (checked without importing the graph module)."""
    return type(graph).__name__ == "AttributionGraph" and hasattr(graph, "node_keys") and hasattr(graph, "adjacency")


def attribution_graph_to_graph_json(graph: Any, **export_options: Any) -> dict[str, Any]:
    """Graph JSON of an ``AttributionGraph`` via ``featcircuits.graph.to_circuit_tracer_json``.

    ``export_options`` go to that function (``node_threshold``, ``edge_threshold``, ``pruned``, ``slug``).
    """
    from featcircuits.graph.export import to_circuit_tracer_json

    return to_circuit_tracer_json(graph, **export_options)


def _graph_node(node_id: str, influence: float | None, n_layers: int, positional: bool = False) -> dict[str, Any]:
    """One circuit-tracer style node for a featcircuits node id (:mod:`featcircuits.nodes`). ``positional``:
    the circuit's other nodes sit at positions, so ``logits`` (feature edges' receiver) goes to the last one."""
    base: dict[str, Any] = {"node_id": node_id, "jsNodeId": node_id, "influence": influence}
    try:
        node = parse_node_id(node_id)
    except ValueError as err:
        raise ValueError(f"Circuit node {node_id!r} cannot be drawn: {err}") from None
    pos = 0 if node.pos is None else node.pos  # nodes summed over positions are drawn in the first column
    where = " (all positions)" if node.pos is None else f" @{node.pos}"
    if node.kind in ("head", "mlp"):
        what = f"head {node.head}" if node.kind == "head" else "MLP"
        return {**base, "feature": -1, "layer": str(node.layer), "ctx_idx": 0,
                "feature_type": "component", "clerp": f"L{node.layer} {what}"}
    if node.kind == "embedding":
        if node.pos is None:
            return {**base, "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
                    "clerp": "embeddings"}
        return {**base, "feature": pos, "layer": "E", "ctx_idx": pos, "feature_type": "embedding"}
    if node.kind == "logits":
        return {**base, "feature": -1, "layer": str(n_layers + 1), "ctx_idx": -1 if positional else 0,
                "feature_type": "logit", "clerp": "logits", "is_target_logit": True}
    if node.kind == "target":
        kind = "logit" if node.is_logit else "target"
        name = str(node.name)
        return {**base, "feature": int(name) if name.isdigit() else -1, "layer": str(n_layers + 1), "ctx_idx": pos,
                "feature_type": "logit", "is_target_logit": True, "clerp": f"{kind} {name}"}
    layer = str(node.block)
    site_kind = str(node.site).rstrip("0123456789")
    if node.kind == "error":
        return {**base, "feature": -1, "layer": layer, "ctx_idx": pos, "feature_type": "mlp reconstruction error",
                "clerp": f"{node.site} error{where}"}
    return {**base, "feature": node.feature, "layer": layer, "ctx_idx": pos, "feature_type": f"{site_kind} feature",
            "clerp": f"{node.site} #{node.feature}" + ("" if node.pos is not None else where)}


def _block_of(node_id: str) -> int | None:
    try:
        return parse_node_id(node_id).block
    except ValueError:
        return None  # reported when the node is drawn


def _finite(value: Any) -> float | None:
    return float(value) if value is not None and math.isfinite(float(value)) else None


def circuit_to_graph_json(circuit: Any, prompt_tokens: list[str] | None = None) -> dict[str, Any]:
    """Graph JSON of a circuit's selection: ``{"metadata", "qParams", "nodes", "links"}``.

    ``circuit``: a ``Circuit`` or its ``to_dict()``. Edges between selected nodes carry their score as
    weight (0 where the method scored nodes only). ``prompt_tokens`` labels the positions.
    """
    data = circuit.to_dict() if hasattr(circuit, "to_dict") and not isinstance(circuit, dict) else circuit
    if not is_circuit_dict(data):
        raise ValueError("Not a circuit: expected a Circuit or the dict Circuit.to_dict() writes.")
    node_ids_all, edge_ids_all = list(data["node_ids"]), [tuple(edge) for edge in data.get("edge_ids") or []]
    node_score = dict(zip(node_ids_all, data.get("node_scores") or [None] * len(node_ids_all), strict=True))
    edge_score = dict(zip(edge_ids_all, data.get("edge_scores") or [None] * len(edge_ids_all), strict=True))
    selected_edges = [tuple(edge) for edge in data.get("edges") or []]
    node_ids = list(dict.fromkeys([*data["nodes"], *(end for edge in selected_edges for end in edge)]))
    layers = [block for node_id in node_ids if (block := _block_of(node_id)) is not None]
    n_layers = max(layers, default=-1) + 1
    positional = any("@" in node_id for node_id in node_ids)
    nodes = [_graph_node(node_id, _finite(node_score.get(node_id)), n_layers, positional) for node_id in node_ids]
    links = [{"source": source, "target": target, "weight": _finite(edge_score.get((source, target))) or 0.0}
             for source, target in selected_edges]
    return {
        "metadata": {"slug": f"{data['method']} circuit ({len(nodes)} nodes, {len(links)} edges)",
                     "prompt_tokens": list(prompt_tokens or []), "prompt": "", "scan": "featcircuits",
                     "transcoder_list": []},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
