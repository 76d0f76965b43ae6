"""Read an attribution graph in the circuit-tracer / Neuronpedia JSON format and shape it for drawing.

That format is the viewer's input, so graphs exported by this library and by circuit-tracer alike can be
viewed::

    {"metadata": {"prompt_tokens": [...], "prompt": ..., ...}, "qParams": {...},
     "nodes": [{"node_id": "layer_feature_position", "feature", "layer", "ctx_idx", "feature_type",
                "clerp", "influence", "activation", "is_target_logit", "token_prob", ...}],
     "links": [{"source": node_id, "target": node_id, "weight": float}]}

``feature_type`` is "cross layer transcoder" (or any name containing transcoder/sae/feature), "mlp
reconstruction error", "embedding" or "logit". :func:`graph_payload` turns it into the compact structure
the page's script reads: node kinds, rows (embeddings at the bottom, one row per layer, logits on top),
columns (token positions) and links as index triples.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["load_graph_json", "graph_payload", "node_kind", "dashboard_key", "layout_positions"]

KINDS = ("feature", "error", "embedding", "logit", "component")


def load_graph_json(graph: Any) -> dict[str, Any]:
    """The graph as a JSON dict, from a dict, a path to a ``.json`` file, or an object exporting one.

    Accepted: graph JSON (dict or file); an ``AttributionGraph`` (exported by the graph module,
    influence-pruned with its default thresholds); a ``Circuit`` or its saved JSON (converted by
    :func:`featcircuits.viz.adapters.circuit_to_graph_json`); any object with ``to_graph_json()``.
    """
    from .adapters import (
        attribution_graph_to_graph_json,
        circuit_to_graph_json,
        is_attribution_graph,
        is_circuit_dict,
    )

    if isinstance(graph, dict):
        return circuit_to_graph_json(graph) if is_circuit_dict(graph) else graph
    if isinstance(graph, (str, os.PathLike)):
        path = Path(graph)
        if not path.exists():
            raise FileNotFoundError(f"No graph file at {path}; pass a graph JSON path, dict or graph object.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); re-export the graph.") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a graph object with nodes/links.")
        return load_graph_json(data)
    if is_attribution_graph(graph):
        return attribution_graph_to_graph_json(graph)
    if callable(getattr(graph, "to_graph_json", None)):
        return load_graph_json(graph.to_graph_json())
    if callable(getattr(graph, "to_dict", None)):
        data = graph.to_dict()
        if is_circuit_dict(data):
            return circuit_to_graph_json(data)
    raise TypeError(
        f"Cannot view a {type(graph).__name__}: pass a graph JSON dict, a path to one, an AttributionGraph, a "
        "Circuit, or an object with to_graph_json()."
    )


def node_kind(feature_type: str, node_id: str = "?") -> str:
    """One of ``KINDS`` for a node's ``feature_type`` string."""
    text = str(feature_type).lower()
    if "error" in text:
        return "error"
    if "embed" in text:
        return "embedding"
    if "logit" in text:
        return "logit"
    if "component" in text:
        return "component"  # a whole attention head or MLP (component-level circuits)
    if any(word in text for word in ("transcoder", "sae", "feature", "dictionary", "latent")):
        return "feature"
    raise ValueError(
        f"Node {node_id!r} has feature_type {feature_type!r}; expected a feature type (cross layer "
        "transcoder, transcoder, sae), 'mlp reconstruction error', 'embedding' or 'logit'."
    )


def dashboard_key(layer: Any, feature: int) -> str:
    """Key of a feature in dashboard files: ``"<layer>_<feature index within its dictionary>"``."""
    return f"{layer}_{int(feature)}"


def _feature_index(node: dict[str, Any]) -> int:
    # node_id is "layer_feature_position": its middle part is the index within the layer's dictionary,
    # whereas circuit-tracer's "feature" field may add a per-layer offset.
    parts = str(node["node_id"]).split("_")
    if len(parts) == 3 and parts[1].lstrip("-").isdigit():
        return int(parts[1])
    return int(node.get("feature", -1))


def _finite_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def graph_payload(graph_json: dict[str, Any], title: str | None = None,
                  prompt_tokens: list[str] | None = None) -> dict[str, Any]:
    """The page's data: ``{"tokens", "rows", "nodes", "links", ...}`` with links as ``[src, dst, weight]``.

    Raises ``ValueError`` naming the node or link for a missing field, a duplicate node id, a link to an
    unknown node or a non-finite weight.
    """
    if not isinstance(graph_json, dict) or "nodes" not in graph_json:
        raise ValueError("A graph JSON needs a 'nodes' list (and 'links'); got keys "
                         f"{sorted(graph_json) if isinstance(graph_json, dict) else type(graph_json).__name__}.")
    metadata = graph_json.get("metadata") or {}
    tokens = [str(token) for token in (prompt_tokens if prompt_tokens is not None
                                       else metadata.get("prompt_tokens") or [])]
    raw_nodes, raw_links = graph_json.get("nodes") or [], graph_json.get("links") or []
    escaped = bool(metadata.get("clerp_html_escaped"))

    nodes, index_of = [], {}
    for position, node in enumerate(raw_nodes):
        missing = [key for key in ("node_id", "layer", "ctx_idx", "feature_type") if key not in node]
        if missing:
            raise ValueError(f"Node #{position} ({node.get('node_id', 'no id')}) lacks {missing}.")
        node_id = str(node["node_id"])
        if node_id in index_of:
            raise ValueError(
                f"Node id {node_id!r} appears twice, so links to it are ambiguous. (circuit-tracer names error nodes "
                "'0_{layer}_{pos}', which can equal a layer-0 feature's id; featcircuits' export writes "
                "'err_{layer}_{pos}'.) Give every node a unique node_id."
            )
        kind = node_kind(node["feature_type"], node_id)
        layer, ctx_idx = str(node["layer"]), int(node["ctx_idx"])
        feature = _feature_index(node) if kind == "feature" else None
        # Negative positions (dataset-level graphs) count from the end of the prompt.
        token = tokens[ctx_idx] if -len(tokens) <= ctx_idx < len(tokens) else ""
        clerp = str(node.get("clerp") or "")
        if escaped:  # featcircuits' export writes labels HTML-escaped, for frontends that insert them as HTML
            clerp = html.unescape(clerp)
        if kind == "feature":
            label = clerp or f"L{layer} #{feature}"
        elif kind == "error":
            label = clerp or f"error L{layer} @{ctx_idx}"
        elif kind == "embedding":
            label = clerp or token
        else:
            label = clerp or f"logit {node.get('feature', '')}"
        index_of[node_id] = len(nodes)
        nodes.append({
            "id": node_id, "kind": kind, "layer": layer, "pos": ctx_idx, "feature": feature,
            "label": label, "token": token,
            "activation": _finite_or_none(node.get("activation")),
            "influence": _finite_or_none(node.get("influence")),
            "token_prob": _finite_or_none(node.get("token_prob")),
            "is_target": bool(node.get("is_target_logit", False)),
            "dash_key": dashboard_key(layer, feature) if kind == "feature" else None,
            "ablation_effect": _finite_or_none(node.get("ablation_effect")),
        })

    links = []
    for position, link in enumerate(raw_links):
        try:
            source, target, weight = str(link["source"]), str(link["target"]), float(link["weight"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"Link #{position} needs 'source', 'target' and a numeric 'weight'; got {link!r}.") from None
        for end in (source, target):
            if end not in index_of:
                raise ValueError(f"Link #{position} ({source} -> {target}) refers to unknown node {end!r}.")
        if not math.isfinite(weight):
            raise ValueError(f"Link #{position} ({source} -> {target}) has non-finite weight {weight}.")
        links.append([index_of[source], index_of[target], weight])

    supernodes = []
    for group in (graph_json.get("qParams") or {}).get("supernodes") or []:
        members = [index_of[str(m)] for m in group[1:] if str(m) in index_of]
        if len(group) >= 3 and len(members) >= 2:
            name = html.unescape(str(group[0])) if escaped else str(group[0])
            supernodes.append({"name": name, "members": members})
    rows = _assign_rows(nodes)
    n_columns = _assign_columns(nodes, len(tokens))
    return {
        "mode": "graph",
        "title": title or str(metadata.get("slug") or metadata.get("prompt") or "attribution graph"),
        "prompt": str(metadata.get("prompt") or ""),
        # Columns past the prompt (or all, when there is none) are labelled by their position.
        "tokens": tokens + [f"@{_column_position(nodes, column)}" for column in range(len(tokens), n_columns)],
        "rows": rows,
        "nodes": nodes,
        "links": links,
        "n_feature_nodes": sum(node["kind"] == "feature" for node in nodes),
        "supernodes": supernodes,
    }


def _column_position(nodes: list[dict[str, Any]], column: int) -> int:
    return next((node["pos"] for node in nodes if node["col"] == column), column)


def _layer_order(layer: str) -> float:
    try:
        return float(layer)
    except ValueError:
        return -1.0  # "E" and other non-numeric layers go below the numbered ones


def _assign_rows(nodes: list[dict[str, Any]]) -> list[str]:
    """Set ``node["row"]`` (0 = bottom) and return the row labels, bottom first."""
    middle_layers = sorted({node["layer"] for node in nodes if node["kind"] in ("feature", "error", "component")},
                           key=_layer_order)
    labels = ["tokens"] + [f"L{layer}" for layer in middle_layers] + ["logits"]
    row_of_layer = {layer: row + 1 for row, layer in enumerate(middle_layers)}
    for node in nodes:
        if node["kind"] == "embedding":
            node["row"] = 0
        elif node["kind"] == "logit":
            node["row"] = len(labels) - 1
        else:
            node["row"] = row_of_layer[node["layer"]]
    return labels


def _assign_columns(nodes: list[dict[str, Any]], n_tokens: int) -> int:
    """Set ``node["col"]`` and return the column count.

    Dataset-level graphs align prompts at their last token and number positions from the end (-1 is the
    last): those count back from the last prompt token, or from the largest position when there are none.
    """
    positions = [node["pos"] for node in nodes]
    shift = 0
    if positions and min(positions) < 0:
        shift = n_tokens if n_tokens + min(positions) >= 0 else -min(positions)
    for node in nodes:
        node["col"] = node["pos"] + shift if node["pos"] < 0 else node["pos"]
    return max([n_tokens] + [node["col"] + 1 for node in nodes])


def layout_positions(payload: dict[str, Any]) -> tuple[list[tuple[float, float]], list[float], float]:
    """Node centres ``(x, y)`` in column/row units (y = row, 0 at the bottom), column centres, total width.

    Columns widen to fit their most crowded cell, so nodes sharing a layer and position sit side by side:
    the same rule the page's script uses.
    """
    n_columns = len(payload["tokens"])
    cells: dict[tuple[int, int], list[int]] = {}
    for index, node in enumerate(payload["nodes"]):
        cells.setdefault((node["row"], node["col"]), []).append(index)
    widths = [1.0] * n_columns
    for (_, column), members in cells.items():
        widths[column] = max(widths[column], 0.35 * len(members) + 0.3)
    starts = [sum(widths[:column]) for column in range(n_columns)]
    positions: list[tuple[float, float]] = [(0.0, 0.0)] * len(payload["nodes"])
    for (row, column), members in cells.items():
        spacing = widths[column] / len(members)
        for slot, index in enumerate(members):
            positions[index] = (starts[column] + spacing * (slot + 0.5), float(row))
    centres = [start + width / 2 for start, width in zip(starts, widths, strict=True)]
    return positions, centres, sum(widths)
