"""From a graph to an explanation: interventions by node id, generation with features clamped, the measured
effect of ablating a graph's top nodes, feature labels and their scores, and supernodes."""

from .fuzzing import fuzzing_score
from .interventions import GenerationResult, InterventionResult, Scale, generate, intervene
from .labels import detection_score, label_dashboards, label_entry, score_labels
from .node_effects import measure_node_effects
from .supernodes import Supernode, group_supernodes

__all__ = ["intervene", "generate", "Scale", "InterventionResult", "GenerationResult", "measure_node_effects",
           "label_entry", "label_dashboards", "detection_score", "fuzzing_score", "score_labels", "Supernode",
           "group_supernodes"]
