"""Look at graphs and circuits: an interactive HTML viewer, feature dashboards, static pictures, curves.

Names resolve lazily so that importing the viewer does not import torch or matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "write_viewer": "featcircuits.viz.viewer",
    "render_viewer_html": "featcircuits.viz.viewer",
    "load_dashboards": "featcircuits.viz.viewer",
    "load_graph_json": "featcircuits.viz.graph_data",
    "circuit_to_graph_json": "featcircuits.viz.adapters",
    "compute_dashboards": "featcircuits.viz.dashboards",
    "FeatureDashboards": "featcircuits.viz.dashboards",
    "render_graph_image": "featcircuits.viz.static",
    "graph_to_dot": "featcircuits.viz.static",
    "plot_faithfulness_curves": "featcircuits.viz.curves",
    "HeadlessChromium": "featcircuits.viz.browser",
    "find_chromium": "featcircuits.viz.browser",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featcircuits.viz' has no attribute {name!r}")
