"""Exact linear attribution graphs over sparse dictionary features.

``ReplacementModel`` splices dictionaries into a model with explicit error terms; ``build_graph`` (and
``build_dataset_graph``) compute every direct linear effect between features, errors, embeddings and
targets; ``verify`` checks edges by intervention; ``prune_graph`` / ``prune_topk`` / ``prune_threshold``
cut graphs down; ``graph_scores`` measures them; ``write_circuit_tracer_json`` / ``to_networkx`` export.
Node ids are described in ``featcircuits.nodes``.
"""

from ..nodes import Node, parse_node_id
from ..patching.replacement import CleanRun, ReplacementModel, ReplacementOutput, Site
from .attribution import GraphTooLargeError, build_graph, estimate_graph_memory
from .attribution_graph import AttributionGraph
from .dataset import build_dataset_graph
from .export import to_circuit_tracer_json, to_networkx, write_circuit_tracer_json
from .prune import PruneResult, apply_prune, prune_graph, prune_threshold, prune_topk
from .scores import GraphScores, graph_scores
from .targets import Target, logit_diff_target, logit_target
from .verification import VerifyResult, verify

__all__ = [
    "AttributionGraph", "CleanRun", "GraphScores", "GraphTooLargeError", "Node", "PruneResult",
    "ReplacementModel", "ReplacementOutput", "Site", "Target", "VerifyResult", "apply_prune", "build_dataset_graph",
    "build_graph", "estimate_graph_memory", "graph_scores", "logit_diff_target", "logit_target", "parse_node_id",
    "prune_graph", "prune_threshold", "prune_topk", "to_circuit_tracer_json", "to_networkx", "verify",
    "write_circuit_tracer_json",
]
