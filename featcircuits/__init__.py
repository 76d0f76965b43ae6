"""featcircuits: sparse-feature circuit discovery in transformers.

Public names are re-exported here. Those whose modules import TransformerLens are resolved lazily
(``_LAZY``) so that ``import featcircuits`` and the command line start fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .dictionaries import (  # noqa: E402
    SAE,
    Dictionary,
    DictionaryConfig,
    SkipTranscoder,
    Transcoder,
    load_dictionaries,
    load_dictionary,
    save_dictionary,
)

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "load_model": "featcircuits.models",
    "ReplacementModel": "featcircuits.graph",
    "CleanRun": "featcircuits.graph",
    "Node": "featcircuits.graph",
    "parse_node_id": "featcircuits.graph",
    "AttributionGraph": "featcircuits.graph",
    "build_graph": "featcircuits.graph",
    "build_dataset_graph": "featcircuits.graph",
    "verify": "featcircuits.graph",
    "prune_graph": "featcircuits.graph",
    "prune_topk": "featcircuits.graph",
    "prune_threshold": "featcircuits.graph",
    "graph_scores": "featcircuits.graph",
    "logit_diff_target": "featcircuits.graph",
    "write_circuit_tracer_json": "featcircuits.graph",
    "to_networkx": "featcircuits.graph",
    "push_to_hub": "featcircuits.hub.publish",
    "check_dictionaries_match_model": "featcircuits.hub.checks",
    "list_releases": "featcircuits.hub.registry",
    "write_viewer": "featcircuits.viz.viewer",
    "compute_dashboards": "featcircuits.viz.dashboards",
    "FeatureDashboards": "featcircuits.viz.dashboards",
    "render_graph_image": "featcircuits.viz.static",
    "plot_faithfulness_curves": "featcircuits.viz.curves",
    "find_circuit": "featcircuits.circuits",
    "evaluate": "featcircuits.circuits",
    "Circuit": "featcircuits.circuits",
    "ContrastiveTask": "featcircuits.circuits",
    "train": "featcircuits.training",
    "TrainConfig": "featcircuits.training",
    "run_demo": "featcircuits.demo",
    "DemoResult": "featcircuits.demo",
}

__all__ = [
    "__version__",
    "SAE",
    "Dictionary",
    "DictionaryConfig",
    "SkipTranscoder",
    "Transcoder",
    "load_dictionaries",
    "load_dictionary",
    "save_dictionary",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featcircuits' has no attribute {name!r}")
