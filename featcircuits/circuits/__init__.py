"""Circuit discovery: contrastive tasks and metrics, component and feature nodes, batched ablations,
attribution patching (AtP, AtP-IG), ACDC, the Circuit type and its evaluation, and the memory plan of
feature-edge searches."""

from .acdc_search import acdc
from .circuit import Circuit
from .components import ComponentGraph
from .discovery import evaluate, find_circuit, make_graph
from .edge_memory import CircuitTooLargeError, check_feature_edge_memory, estimate_feature_edge_memory
from .evaluation import evaluate_circuit, roc_auc
from .feature_edges import FeatureEdgeGraph
from .features import FeatureGraph
from .tasks import METRICS, ContrastiveTask, load_task

__all__ = [
    "Circuit", "CircuitTooLargeError", "ComponentGraph", "ContrastiveTask", "FeatureEdgeGraph", "FeatureGraph",
    "METRICS", "acdc", "check_feature_edge_memory", "estimate_feature_edge_memory", "evaluate", "evaluate_circuit",
    "find_circuit", "load_task", "make_graph", "roc_auc",
]
