"""The one ``Circuit`` type every discovery method returns, with selection and JSON save/load."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dictionaries.io.common import atomic_path

if TYPE_CHECKING:  # the graph modules import this one
    from .components import ComponentGraph
    from .feature_edges import FeatureEdgeGraph
    from .features import FeatureGraph

__all__ = ["Circuit"]

FORMAT_VERSION = 1
MEASURED_IN = ("model", "live replacement", "frozen local replacement", "attribution graph")


def _measured_in_of_old_file(data: dict[str, Any]) -> str:
    """Files written before ``measured_in`` existed: feature ids (``site:...``) were measured in the live
    replacement model (nodes) or the frozen local one (edges), component ids in the model."""
    if not any(":" in node for node in data["node_ids"]):
        return "model"
    return "live replacement" if data["level"] == "nodes" else "frozen local replacement"


@dataclass
class Circuit:
    """Scored candidate nodes and edges plus the selected subset.

    ``node_scores[i]`` scores ``node_ids[i]`` (larger magnitude = more important); likewise for edges,
    which are ``(sender, receiver)`` id pairs. ``nodes``/``edges`` are the selected circuit. ``level`` is
    ``"nodes"`` or ``"edges"``: which set the method scored and ablates. ``evaluation`` holds the
    faithfulness curve once :func:`featcircuits.evaluate` has run. ``measured_in`` names the model the
    scores and ablations ran in (:data:`MEASURED_IN`): ``"model"`` (heads and MLPs of the model itself),
    ``"live replacement"`` (feature nodes: features downstream of an ablation recomputed from their
    changed inputs), ``"frozen local replacement"`` (feature edges: the clean run's attention patterns and
    norm scales, the linear graph's edges), or ``"attribution graph"`` (a pruned graph, not yet measured).
    ``graph`` is the graph :func:`featcircuits.find_circuit` measured it on (not saved).
    """

    method: str
    level: str
    node_ids: list[str]
    node_scores: list[float] | None = None
    edge_ids: list[tuple[str, str]] = field(default_factory=list)
    edge_scores: list[float] | None = None
    nodes: list[str] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    measured_in: str = "model"
    # The graph find_circuit ran on, so that evaluate() can reuse it; live objects only: never saved
    # (to_dict), compared or shown, and None for loaded or re-selected circuits.
    graph: ComponentGraph | FeatureGraph | FeatureEdgeGraph | None = field(
        default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.measured_in not in MEASURED_IN:
            raise ValueError(f"measured_in={self.measured_in!r}; choose one of {MEASURED_IN}.")
        if self.level not in ("nodes", "edges"):
            raise ValueError(f"level={self.level!r}; a circuit is scored at 'nodes' or 'edges'.")

    # -- selection ----------------------------------------------------------------------------

    @property
    def units(self) -> list:
        return self.node_ids if self.level == "nodes" else self.edge_ids

    @property
    def scores(self) -> list[float]:
        scores = self.node_scores if self.level == "nodes" else self.edge_scores
        if scores is None:
            raise ValueError(f"This {self.method} circuit has no {self.level[:-1]} scores to select by.")
        return scores

    @property
    def selected(self) -> list:
        return self.nodes if self.level == "nodes" else self.edges

    def ranking(self) -> list[int]:
        """Unit indices, most important (largest |score|) first."""
        scores = self.scores
        return sorted(range(len(scores)), key=lambda i: -abs(scores[i]) if not math.isnan(scores[i]) else 0.0)

    def _with_selection(self, chosen: list[int], how: dict[str, Any]) -> Circuit:
        units = [self.units[i] for i in sorted(chosen)]
        if self.level == "nodes":
            chosen_nodes = set(units)
            nodes, edges = units, [e for e in self.edge_ids if e[0] in chosen_nodes and e[1] in chosen_nodes]
        else:
            edges = units
            touched = {node for edge in edges for node in edge}
            nodes = [n for n in self.node_ids if n in touched]
        return Circuit(self.method, self.level, self.node_ids, self.node_scores, self.edge_ids, self.edge_scores,
                       nodes, edges, {**self.params, "selection": how}, {}, self.measured_in)

    def top_k(self, k: int) -> Circuit:
        """The ``k`` units with the largest |score|."""
        if k < 0:
            raise ValueError(f"top_k needs k >= 0, got {k}.")
        return self._with_selection(self.ranking()[:k], {"top_k": k})

    def threshold(self, value: float) -> Circuit:
        """The units with |score| >= ``value``."""
        return self._with_selection([i for i, s in enumerate(self.scores) if abs(s) >= value], {"threshold": value})

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        def clean(values):  # JSON has no inf/nan
            return None if values is None else [v if math.isfinite(v) else None for v in values]

        return {
            "format_version": FORMAT_VERSION, "method": self.method, "level": self.level,
            "node_ids": self.node_ids, "node_scores": clean(self.node_scores),
            "edge_ids": [list(e) for e in self.edge_ids], "edge_scores": clean(self.edge_scores),
            "nodes": self.nodes, "edges": [list(e) for e in self.edges],
            "params": self.params, "evaluation": self.evaluation, "measured_in": self.measured_in,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Circuit:
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"Circuit file format_version {data.get('format_version')!r}; this version reads "
                             f"{FORMAT_VERSION}.")

        def scores(values):
            return None if values is None else [math.inf if v is None else float(v) for v in values]

        return cls(data["method"], data["level"], list(data["node_ids"]), scores(data["node_scores"]),
                   [tuple(e) for e in data["edge_ids"]], scores(data["edge_scores"]), list(data["nodes"]),
                   [tuple(e) for e in data["edges"]], dict(data["params"]), dict(data["evaluation"]),
                   data.get("measured_in") or _measured_in_of_old_file(data))

    def save(self, path: str | Path) -> None:
        """Write JSON atomically (temporary file, then rename)."""
        with atomic_path(path) as temporary, open(temporary, "w") as file:
            json.dump(self.to_dict(), file, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> Circuit:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{path} is not a featcircuits circuit file ({err}).") from err

    def __repr__(self) -> str:
        return (f"Circuit(method={self.method!r}, level={self.level!r}, nodes={len(self.nodes)}/"
                f"{len(self.node_ids)}, edges={len(self.edges)}/{len(self.edge_ids)}, "
                f"measured_in={self.measured_in!r})")
