"""The interactive graph viewer: one self-contained HTML file for an attribution graph or a circuit.

Nodes sit in rows by layer (token embeddings at the bottom, logits on top) and columns by token
position; edge width and colour follow the signed weight; hovering or clicking a node shows its card
(activation on this prompt and, from an optional dashboard file, its feature's top activating contexts
and the tokens its decoder promotes and suppresses); a slider hides edges below a relative threshold;
the prompt's tokens run along the bottom.

    write_viewer("graph.json", "graph.html", dashboards="dashboards.json")
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .graph_data import graph_payload, load_graph_json
from .page import build_page, write_page

__all__ = ["write_viewer", "render_viewer_html", "viewer_payload", "load_dashboards"]


def load_dashboards(dashboards: Any) -> dict[str, Any]:
    """Dashboard data as a dict: from a ``FeatureDashboards``, a dict, or a path to its JSON file."""
    if dashboards is None:
        return {}
    if hasattr(dashboards, "to_json_dict"):
        return dashboards.to_json_dict()
    if isinstance(dashboards, (str, os.PathLike)):
        path = Path(dashboards)
        if not path.exists():
            raise FileNotFoundError(f"No dashboard file at {path}; build one with compute_dashboards().save().")
        try:
            dashboards = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); rebuild the dashboards.") from None
    if not isinstance(dashboards, dict) or not isinstance(dashboards.get("features"), dict):
        raise ValueError("Dashboard data needs a 'features' mapping of '<layer>_<feature>' keys to entries "
                         "(the file written by FeatureDashboards.save).")
    return dashboards


def viewer_payload(graph: Any, dashboards: Any = None, title: str | None = None,
                   prompt_tokens: list[str] | None = None) -> dict[str, Any]:
    """The data embedded in the page: the graph payload plus the dashboard entries of its feature nodes."""
    payload = graph_payload(load_graph_json(graph), title=title, prompt_tokens=prompt_tokens)
    dashboard_data = load_dashboards(dashboards)
    features = dashboard_data.get("features", {})
    # Only the entries this graph shows travel with the page, so its size follows the graph, not the dictionary.
    payload["dashboards"] = {node["dash_key"]: features[node["dash_key"]] for node in payload["nodes"]
                             if node["dash_key"] is not None and node["dash_key"] in features}
    for node in payload["nodes"]:  # a dashboard's label (featcircuits.explain.label_dashboards) names the node
        entry = payload["dashboards"].get(node["dash_key"]) if node["dash_key"] is not None else None
        if entry and entry.get("label") and node["label"] == f"L{node['layer']} #{node['feature']}":
            node["label"] = f"L{node['layer']} #{node['feature']} {entry['label']}"
    payload["dashboard_info"] = {key: dashboard_data[key] for key in ("n_tokens", "model", "histogram_edges")
                                 if key in dashboard_data}
    return payload


def render_viewer_html(graph: Any, dashboards: Any = None, title: str | None = None,
                       prompt_tokens: list[str] | None = None) -> str:
    """The viewer page as a string (see :func:`write_viewer`)."""
    payload = viewer_payload(graph, dashboards, title, prompt_tokens)
    return build_page(payload, payload["title"])


def write_viewer(graph: Any, path: str | os.PathLike, dashboards: Any = None, title: str | None = None,
                 prompt_tokens: list[str] | None = None) -> Path:
    """Write the viewer for ``graph`` to ``path`` (one HTML file, no network needed) and return the path.

    ``graph``: a circuit-tracer / Neuronpedia graph JSON dict, a path to one, a ``Circuit`` (or its saved
    JSON), or an object exporting graph JSON (``to_graph_json()``). ``dashboards``: optional ``FeatureDashboards``, dict or JSON path whose entries
    fill the node cards. ``prompt_tokens`` labels the positions when the graph has none (circuits).
    """
    payload = viewer_payload(graph, dashboards, title, prompt_tokens)
    return write_page(payload, path, payload["title"])
