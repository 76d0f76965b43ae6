"""featcircuits: sparse-feature circuit discovery in transformers.

The public API, from a model to a verified circuit::

    model = fc.load_model("path/to/hf-checkpoint")              # a HookedTransformer
    dictionaries = fc.load_dictionaries("tc/")                   # local files or a release name
    graph = fc.build_graph(model, dictionaries, prompt="...")    # exact linear attribution graph
    fc.verify(graph)                                             # edges checked by intervention
    circuit = fc.find_circuit(model, task, "acdc", dictionaries=dictionaries)
    fc.evaluate(circuit)                                         # faithfulness, completeness, CPR/CMD
    fc.intervene(model, "...", {"mlp2:113": "ablate"}, dictionaries=dictionaries)  # the model without a feature

Names whose modules import TransformerLens are resolved on first use, so that ``import featcircuits`` and
the command line start fast; the ``TYPE_CHECKING`` block below shows them to type checkers and IDEs. Older
top-level names still resolve, with a ``DeprecationWarning`` naming where they live now.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .dictionaries import Dictionary, DictionaryConfig

if TYPE_CHECKING:
    from .circuits import Circuit, ContrastiveTask, evaluate, find_circuit
    from .explain import generate, intervene
    from .graph import AttributionGraph, build_dataset_graph, build_graph, prune_graph, verify
    from .hub.loading import load_dictionaries
    from .hub.publish import push_to_hub
    from .models import load_model
    from .nodes import Node, parse_node_id
    from .patching.replacement import ReplacementModel
    from .pipeline import run_demo
    from .training import TrainConfig, train
    from .viz.viewer import write_viewer

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "load_model": "featcircuits.models",
    "load_dictionaries": "featcircuits.hub.loading",
    "ReplacementModel": "featcircuits.patching.replacement",
    "Node": "featcircuits.nodes",
    "parse_node_id": "featcircuits.nodes",
    "ContrastiveTask": "featcircuits.circuits",
    "build_graph": "featcircuits.graph",
    "build_dataset_graph": "featcircuits.graph",
    "AttributionGraph": "featcircuits.graph",
    "verify": "featcircuits.graph",
    "prune_graph": "featcircuits.graph",
    "find_circuit": "featcircuits.circuits",
    "evaluate": "featcircuits.circuits",
    "Circuit": "featcircuits.circuits",
    "train": "featcircuits.training",
    "TrainConfig": "featcircuits.training",
    "push_to_hub": "featcircuits.hub.publish",
    "write_viewer": "featcircuits.viz.viewer",
    "run_demo": "featcircuits.pipeline",
    "intervene": "featcircuits.explain",
    "generate": "featcircuits.explain",
}

# earlier top-level names -> where they live now (still importable from there without a warning)
_DEPRECATED: dict[str, str] = {
    "SAE": "featcircuits.dictionaries",
    "Transcoder": "featcircuits.dictionaries",
    "SkipTranscoder": "featcircuits.dictionaries",
    "load_dictionary": "featcircuits.dictionaries",
    "save_dictionary": "featcircuits.dictionaries",
    "CleanRun": "featcircuits.patching.records",
    "prune_topk": "featcircuits.graph",
    "prune_threshold": "featcircuits.graph",
    "graph_scores": "featcircuits.graph",
    "logit_diff_target": "featcircuits.graph",
    "write_circuit_tracer_json": "featcircuits.graph",
    "to_networkx": "featcircuits.graph",
    "check_dictionaries_match_model": "featcircuits.hub.checks",
    "list_releases": "featcircuits.hub.registry",
    "compute_dashboards": "featcircuits.viz.dashboards",
    "FeatureDashboards": "featcircuits.viz.dashboards",
    "render_graph_image": "featcircuits.viz.static",
    "plot_faithfulness_curves": "featcircuits.viz.curves",
    "DemoResult": "featcircuits.pipeline",
}

__all__ = [
    "__version__", "Dictionary", "DictionaryConfig", "load_model", "load_dictionaries", "ReplacementModel", "Node",
    "parse_node_id", "ContrastiveTask", "build_graph", "build_dataset_graph", "AttributionGraph", "verify",
    "prune_graph", "find_circuit", "evaluate", "Circuit", "train", "TrainConfig", "push_to_hub", "write_viewer",
    "run_demo", "intervene", "generate",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _DEPRECATED:
        warnings.warn(f"featcircuits.{name} is deprecated at the top level; import it from {_DEPRECATED[name]}.",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_DEPRECATED[name]), name)
    raise AttributeError(f"module 'featcircuits' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
