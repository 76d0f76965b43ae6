"""The demo's explanation of its graph: labelled supernodes, each one's measured ablation effect, and one steering
example (the strongest supernode switched off, and what the model then generates)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Explanation", "explain_graph"]


@dataclass
class Unit:
    """A supernode, or a single feature where none groups: its members and their summed ablation effect on the
    graph's main target (each member ablated alone; measured, not estimated)."""

    name: str
    members: list[str]
    effect: float


@dataclass
class Explanation:
    """``units``: the pruned graph's strongest units, most effective first; ``steered``: the unit switched off
    in the steering example, with the continuation before and after."""

    labels: dict[str, str]
    units: list[Unit]
    steered: Unit | None = None
    text_before: str = ""
    text_after: str = ""
    target: str = ""
    supernodes: list[Any] = field(default_factory=list)
    target_prob_before: float = float("nan")
    target_prob_after: float = float("nan")


def explain_graph(graph: Any, dashboards: Any, prompt: Any, n_units: int = 6, max_new_tokens: int = 12) -> Explanation:
    """Label the dashboards, group the pruned graph's features into supernodes, measure each top node's
    ablation effect, and steer with the unit whose members move the main target most."""
    from ..explain import generate, group_supernodes, intervene, label_dashboards, measure_node_effects
    from ..graph import prune_graph

    labels = label_dashboards(dashboards)
    kept = [graph.node_ids[i] for i in prune_graph(graph).node_mask.nonzero()[:, 0].tolist()]
    supernodes = group_supernodes(graph, nodes=kept, labels=labels)
    effects = measure_node_effects(graph, n_nodes=4 * n_units)
    grouped = {member for s in supernodes for member in s.members}
    units = [Unit(s.name, s.members, sum(effects.get(m, [0.0])[0] for m in s.members)) for s in supernodes
             if any(m in effects for m in s.members)]
    units += [Unit(_feature_label(node_id, labels), [node_id], values[0]) for node_id, values in effects.items()
              if node_id not in grouped and ":error" not in node_id]
    units.sort(key=lambda unit: -abs(unit.effect))
    units = units[:n_units]
    target = graph.targets[0]
    from .report import token_strings

    name = token_strings(graph.replacement.model, [target.token])[0] if target.token is not None else target.name
    explanation = Explanation(labels, units, target=str(name), supernodes=supernodes)
    if units:
        rm = graph.replacement
        steered = units[0]
        # the unit off at the positions it was found at (its ids carry them), the rest of the model as it is
        off = {m: "ablate" for m in steered.members}
        result = generate(rm, prompt, off, max_new_tokens=max_new_tokens)
        explanation.steered, explanation.text_before, explanation.text_after = steered, result.text_before, \
            result.text_after
        if target.token is not None:
            logits = intervene(rm, prompt, off)
            explanation.target_prob_before = float(logits.logits_before.softmax(-1)[target.token])
            explanation.target_prob_after = float(logits.logits_after.softmax(-1)[target.token])
    return explanation


def _feature_label(node_id: str, labels: dict[str, str]) -> str:
    site, rest = node_id.split(":", 1)
    key = f"{site.lstrip('abcdefghijklmnopqrstuvwxyz_')}_{rest.split('@')[0]}"
    return f"{node_id} {labels[key]}" if key in labels else node_id
