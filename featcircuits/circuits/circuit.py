"""The one ``Circuit`` type every discovery method returns, with selection and JSON save/load."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..dictionaries.io.common import atomic_path
from ..nodes import parse_node_id

if TYPE_CHECKING:  # the graph modules import this one
    from .components import ComponentGraph
    from .feature_edges import FeatureEdgeGraph
    from .features import FeatureGraph

__all__ = ["Circuit", "ERROR_MODES", "check_top_fraction"]

FORMAT_VERSION = 1
MEASURED_IN = ("model", "live replacement", "frozen local replacement", "attribution graph")
# How a circuit treats the error nodes (what the dictionaries miss): ranked with the features on the same
# scores (Sparse Feature Circuits), every one kept, or every one ablated (a feature-only circuit).
ERROR_MODES = ("rank", "keep", "ablate")
INDENTED_UNITS = 20_000
# error nodes carry most of a circuit's effect when its features, with every error node ablated, recover
# less than this share of what they recover with every error node kept
MOST = 0.5


def is_error_id(node_id: str) -> bool:
    """An error node's id (``"mlp3:error@5"``, ``"mlp3:error"``)."""
    return ":error" in node_id


def check_top_fraction(top_fraction: float) -> float:
    top_fraction = float(top_fraction)
    if not 0.0 < top_fraction <= 1.0:  # NaN fails too
        raise ValueError(f"top_fraction={top_fraction} is outside (0, 1]; it is the fraction of the feature nodes "
                         "(of every unit, for a circuit without error nodes) the circuit keeps, e.g. 0.05.")
    return top_fraction


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
        if self.errors not in ERROR_MODES:
            raise ValueError(f"params['errors']={self.errors!r}; choose one of {ERROR_MODES}.")

    @property
    def errors(self) -> str:
        """How the circuit treats error nodes (:data:`ERROR_MODES`): ``rank`` (with the features; the default),
        ``keep`` (every one in the circuit) or ``ablate`` (none: a feature-only circuit)."""
        return self.params.get("errors", "rank")

    def error_units(self) -> list[bool]:
        """Per unit: an error node (nodes), or an edge out of one (edges)."""
        if self.level == "nodes":
            return [is_error_id(node) for node in self.node_ids]
        return [is_error_id(sender) for sender, _ in self.edge_ids]

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
        magnitude = torch.tensor(self.scores, dtype=torch.float64).abs().nan_to_num(nan=0.0)  # NaN ranks as 0
        return torch.argsort(magnitude, descending=True, stable=True).tolist()

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

    def _by_errors(self, candidates: list[int]) -> list[int]:
        """``candidates`` (unit indices) as the error mode has them: ``rank`` as they are, ``keep`` their
        feature units and every error unit, ``ablate`` their feature units alone."""
        if self.errors == "rank":
            return candidates
        is_error = self.error_units()
        chosen = [i for i in candidates if not is_error[i]]
        return chosen + [i for i, error in enumerate(is_error) if error] if self.errors == "keep" else chosen

    def top_k(self, k: int) -> Circuit:
        """The ``k`` units with the largest |score| (with ``errors`` ``keep`` or ``ablate``: the ``k`` best
        feature units, and every error unit or none)."""
        if k < 0:
            raise ValueError(f"top_k needs k >= 0, got {k}.")
        ranking = self.ranking()
        if self.errors != "rank":
            is_error = self.error_units()
            ranking = [i for i in ranking if not is_error[i]]
        return self._with_selection(self._by_errors(ranking[:k]), {"top_k": k})

    def threshold(self, value: float) -> Circuit:
        """The units with |score| >= ``value`` (their feature units only, and every error unit or none, with
        ``errors`` ``keep`` or ``ablate``)."""
        chosen = [i for i, s in enumerate(self.scores) if abs(s) >= value]
        return self._with_selection(self._by_errors(chosen), {"threshold": value})

    def top_fraction(self, fraction: float) -> Circuit:
        """The best-scored ``fraction`` (in (0, 1]) of the feature units: ``max(1, int(fraction * n))`` of
        the ``n`` feature units (of every unit when there are no error units). With ``errors="rank"`` the
        error units ranked above the last of them join it (Sparse Feature Circuits' selection); ``keep``
        adds every error unit, ``ablate`` none."""
        check_top_fraction(fraction)
        is_error = self.error_units()
        n_features = len(is_error) - sum(is_error)
        k = max(1, int(fraction * n_features)) if n_features else 0
        chosen, found = [], 0
        for unit in self.ranking():
            if found == k:
                break
            if not is_error[unit]:
                found += 1
                chosen.append(unit)
            elif self.errors == "rank":
                chosen.append(unit)
        return self._with_selection(self._by_errors(chosen), {"top_fraction": fraction})

    # -- what it is made of -----------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Nodes in the circuit and among the candidates, by kind: ``features``/``n_features``,
        ``errors``/``n_errors`` and ``components``/``n_components`` (heads, MLPs, or beside features the
        embeddings and targets of a pruned attribution graph); with
        ``edges``/``n_edges`` for an edge circuit."""
        def kinds(ids: list[str]) -> tuple[int, int, int]:
            parsed = [parse_node_id(node).kind for node in ids]
            features, errors = parsed.count("feature"), parsed.count("error")
            return features, errors, len(ids) - features - errors

        (features, errors, others), (n_f, n_e, n_o) = kinds(self.nodes), kinds(self.node_ids)
        counts = {"features": features, "n_features": n_f, "errors": errors, "n_errors": n_e,
                  "components": others, "n_components": n_o}
        if self.level == "edges":
            counts |= {"edges": len(self.edges), "n_edges": len(self.edge_ids)}
        return counts

    def summary_line(self) -> str:
        """``features=<k>/<n> errors=<e>/<m> faithfulness=<f> completeness=<c>`` (``components=<k>/<n> ...``
        for a circuit of heads and MLPs); the figures once :func:`featcircuits.evaluate` has run."""
        c = self.counts()
        if c["n_features"] + c["n_errors"]:
            line = f"features={c['features']}/{c['n_features']} errors={c['errors']}/{c['n_errors']}"
        else:
            line = f"components={c['components']}/{c['n_components']}"
        if "faithfulness" in self.evaluation:
            line += (f" faithfulness={self.evaluation['faithfulness']:.4f} "
                     f"completeness={self.evaluation['completeness']:.4f}")
        return line

    def summary(self) -> str:
        """What the circuit is made of and how well it does, in a few lines; the last is :meth:`summary_line`.
        Says so when error nodes carry most of the effect (see :func:`featcircuits.circuits.evaluation.
        evaluate_circuit`: its features recover less than half with every error node ablated than kept)."""
        c, ev = self.counts(), self.evaluation
        if c["n_features"] + c["n_errors"]:
            what = f"{c['features']} of {c['n_features']} feature nodes, {c['errors']} of {c['n_errors']} error nodes"
            what += f", {c['components']} other nodes (embeddings, targets)" if c["components"] else ""
        else:
            what = f"{c['components']} of {c['n_components']} components"
        if self.level == "edges":
            what += f"; {c['edges']} of {c['n_edges']} edges"
        lines = [f"{self.method} circuit over {self.level} (error nodes: {self.errors}; measured in the "
                 f"{self.measured_in}): {len(self.nodes)} nodes: {what}"]
        if "faithfulness" in ev:
            lines.append(f"faithfulness {ev['faithfulness']:.3f}, completeness {ev['completeness']:.3f} (metric: "
                         f"full model {ev['m_full']:.4g}, everything ablated {ev['m_empty']:.4g}; CPR {ev['cpr']:.3f}, "
                         f"CMD {ev['cmd']:.3f})")
        if ev.get("error_share") is not None:
            lines.append(f"its features with every error node ablated: faithfulness "
                         f"{ev['faithfulness_errors_ablated']:.3f}; with every error node kept: "
                         f"{ev['faithfulness_errors_kept']:.3f} (error nodes carry {ev['error_share']:.0%} of that)")
            if ev["error_share"] > MOST:
                lines.append("WARNING: error nodes carry most of this circuit's effect: what it does is mostly "
                             "what the dictionaries miss, not their features.")
        lines.append(self.summary_line())
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    # -- files --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self._as_dict(pairs_as_lists=True)

    def _as_dict(self, pairs_as_lists: bool) -> dict[str, Any]:
        """The saved fields; edges as ``[sender, receiver]`` lists, or left as tuples (JSON writes a tuple
        as the same array, with no list made per edge)."""
        def clean(values):  # JSON has no inf/nan
            return None if values is None else [v if math.isfinite(v) else None for v in values]

        def pairs(edges):
            return [list(e) for e in edges] if pairs_as_lists else edges

        return {
            "format_version": FORMAT_VERSION, "method": self.method, "level": self.level,
            "node_ids": self.node_ids, "node_scores": clean(self.node_scores),
            "edge_ids": pairs(self.edge_ids), "edge_scores": clean(self.edge_scores),
            "nodes": self.nodes, "edges": pairs(self.edges),
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
        """Write JSON atomically (temporary file, then rename); indented up to ``INDENTED_UNITS`` units, compact
        above (an indent takes Python's pure-Python encoder: 25 s for a million and a half edges)."""
        indent = 1 if len(self.units) <= INDENTED_UNITS else None
        text = json.dumps(self._as_dict(pairs_as_lists=False), indent=indent)
        with atomic_path(path) as temporary, open(temporary, "w") as file:
            file.write(text)

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
