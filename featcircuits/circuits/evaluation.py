"""Faithfulness and completeness curves, their areas (CPR, CMD), and ROC AUC against ground truth.

    faithfulness f(C)  = (m(C) - m(empty)) / (m(model) - m(empty))       1 = the circuit alone does the task
    completeness c(C)  = f(complement of C)                                0 = nothing outside C matters

where m(C) runs the model with every unit outside C ablated. A sweep over circuit sizes (top-k units by
|score|) runs every circuit and every complement of the sweep in batched forwards. CPR is the area
under f against the fraction of units kept (higher is better); CMD the area under |1 - f| (lower is
better; Miller et al. 2024).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .circuit import MOST, Circuit, is_error_id

__all__ = ["evaluate_circuit", "roc_auc", "area_under"]


def area_under(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoidal area under ``y(x)``."""
    x_t, y_t = torch.tensor(list(x), dtype=torch.float64), torch.tensor(list(y), dtype=torch.float64)
    return float(torch.trapezoid(y_t, x_t)) if len(x_t) > 1 else 0.0


def roc_auc(scores: Sequence[float] | torch.Tensor, positives: Sequence[bool] | torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` ranking ``positives`` first (ties count one half).

    Computed as the Mann-Whitney statistic: the probability that a random positive outscores a random
    negative.
    """
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    positives = torch.as_tensor(positives, dtype=torch.bool).flatten()
    if scores.shape != positives.shape:
        raise ValueError(f"{scores.numel()} scores but {positives.numel()} ground-truth labels.")
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative ground-truth unit.")
    pos, neg = scores[positives], scores[~positives]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def _default_sizes(n_units: int) -> list[int]:
    steps = torch.unique(torch.round(torch.logspace(0, torch.log10(torch.tensor(float(n_units))), 16)).long())
    return sorted({0, n_units, *steps.tolist()})


def _on_graph_units(graph: Any, circuit: Circuit, units: list) -> tuple[list[float], list]:
    """The circuit's scores and selection laid on ``graph``'s units.

    A circuit found on this graph has its units. Another circuit of the same level is mapped by id: a
    pruned attribution graph, say, whose nodes include embeddings and targets (never ablated) and
    features whose ablation changes nothing on the task (equal to their ablated value, so always kept).
    Graph units the circuit does not name score 0 and lie outside it.
    """
    if list(circuit.units) == units:
        return list(circuit.scores), list(circuit.selected)
    if circuit.level == "edges":
        raise ValueError(
            f"The circuit's edges ({len(circuit.units)}) are not this graph's ({len(units)}): evaluate an edge "
            "circuit on a graph built with the same model, dictionaries, task, ablation and max_edges."
        )
    index = {unit: i for i, unit in enumerate(units)}
    circuit_scores = circuit.node_scores or [0.0] * len(circuit.node_ids)
    scores = [0.0] * len(units)
    for node, score in zip(circuit.node_ids, circuit_scores, strict=True):
        if node in index:
            scores[index[node]] = score
    selected = [node for node in circuit.selected if node in index]
    known = sum(node in index for node in circuit.node_ids)
    if known == 0:
        raise ValueError(
            f"None of the circuit's {len(circuit.node_ids)} nodes is a node of this graph ({len(units)}, e.g. "
            f"{units[:3]}): evaluate a circuit on a graph built with the same model, dictionaries and "
            "positions ('each' for per-position ids such as 'mlp3:12@5')."
        )
    return scores, selected


def evaluate_circuit(graph: Any, circuit: Circuit, sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Measure ``circuit`` (its selection) and the top-k curve of its scores on ``graph``.

    Args:
        graph: a :class:`ComponentGraph`, :class:`FeatureGraph` or :class:`FeatureEdgeGraph` built for the
            task and ablation.
        circuit: scored units; its ``selected`` set is the circuit reported on the last line. Its error mode
            (``circuit.errors``) holds in the sweep too: with ``keep`` every error unit is in every swept
            circuit, with ``ablate`` in none, and the sizes count feature units.
        sizes: circuit sizes (numbers of units) for the sweep; default 0, n and a log grid between.

    Returns a dict: ``faithfulness``, ``completeness``, ``size`` for the selected circuit; ``curve``
    (``sizes``, ``fractions``, ``faithfulness``, ``completeness``), ``cpr``, ``cmd``, ``m_full``,
    ``m_empty``. For a circuit with error units, also how much of its effect they carry: the faithfulness
    of its feature units with every error unit kept (``faithfulness_errors_kept``) and with every one
    ablated (``faithfulness_errors_ablated``), and ``error_share`` = (kept - ablated) / kept (None when
    kept <= 0); a share above one half (error nodes carry most of the effect) is warned about. The dict is
    also stored in ``circuit.evaluation``.
    """
    graph_units = graph.node_ids if circuit.level == "nodes" else graph.edge_ids
    run = graph.node_metric if circuit.level == "nodes" else graph.edge_metric
    scores, selected = _on_graph_units(graph, circuit, list(graph_units))
    units = list(graph_units)
    n_units = len(units)
    is_error = torch.tensor([is_error_id(u if circuit.level == "nodes" else u[0]) for u in units], dtype=torch.bool)
    candidates = ~is_error if circuit.errors != "rank" else torch.ones(n_units, dtype=torch.bool)
    n_candidates = int(candidates.sum())
    sizes = sorted({int(s) for s in (sizes if sizes is not None else _default_sizes(n_candidates))})
    bad = [s for s in sizes if not 0 <= s <= n_candidates]
    if bad:
        what = circuit.level if circuit.errors == "rank" else f"feature {circuit.level} (errors={circuit.errors!r})"
        raise ValueError(f"Circuit sizes {bad} are outside [0, {n_candidates}] (the number of {what}).")
    magnitude = torch.tensor(scores, dtype=torch.float64).abs().nan_to_num(nan=0.0)  # inf (never tried) first
    order = torch.argsort(magnitude, descending=True, stable=True)
    order = order[candidates[order]]  # the sweep ranks the candidates only
    chosen = _membership(units, selected)
    forced = is_error.float() if circuit.errors == "keep" else torch.zeros(n_units)
    features_in = chosen * (~is_error).float()
    masks: list[Callable[[], torch.Tensor]] = [
        lambda: torch.ones(n_units), lambda: torch.zeros(n_units), lambda: chosen, lambda: 1.0 - chosen]
    if bool(is_error.any()):  # the circuit's features with every error unit kept, and with none
        masks += [lambda: torch.maximum(features_in, is_error.float()), lambda: features_in]
    for size in sizes:
        def swept(size: int = size) -> torch.Tensor:
            mask = forced.clone()
            mask[order[:size]] = 1.0
            return mask
        masks += [swept, lambda swept=swept: 1.0 - swept()]
    values = _run_masks(run, masks, n_units, getattr(graph, "max_copies", 64))
    m_full, m_empty = float(values[0]), float(values[1])
    gap = m_full - m_empty
    if abs(gap) < 1e-9:
        raise ValueError(
            f"The full model and the fully ablated model score the same on this task (m={m_full:.4g}); "
            "faithfulness is undefined. Use a task/ablation where ablating everything changes the metric."
        )
    faith = ((values - m_empty) / gap).tolist()
    first = 6 if bool(is_error.any()) else 4
    curve_f, curve_c = faith[first::2], faith[first + 1::2]
    fractions = [s / max(n_candidates, 1) for s in sizes]
    result = {
        "faithfulness": faith[2], "completeness": faith[3], "size": len(selected), "errors": circuit.errors,
        "measured_in": graph.measured_in,
        "n_units": n_units, "m_full": m_full, "m_empty": m_empty,
        "curve": {"sizes": sizes, "fractions": fractions, "faithfulness": curve_f, "completeness": curve_c},
        "cpr": area_under(fractions, curve_f),
        "cmd": area_under(fractions, [abs(1 - f) for f in curve_f]),
    }
    if first == 6:
        kept, ablated = faith[4], faith[5]
        share = (kept - ablated) / kept if kept > 0 and math.isfinite(kept) else None
        result |= {"faithfulness_errors_kept": kept, "faithfulness_errors_ablated": ablated, "error_share": share}
        if share is not None and share > MOST:
            warnings.warn(f"Error nodes carry most of this {circuit.method} circuit's effect: its features recover "
                          f"faithfulness {ablated:.3f} with every error node ablated and {kept:.3f} with every one "
                          f"kept ({share:.0%} is the error nodes'). Its behaviour is mostly what the dictionaries "
                          "miss; see Circuit.summary().", stacklevel=2)
    circuit.evaluation = result
    return result


def _membership(units: list, selected: list) -> torch.Tensor:
    """``[n_units]`` 1.0 where the unit is selected (a set lookup per unit: no index over every unit)."""
    chosen = set(selected)
    return torch.tensor([unit in chosen for unit in units], dtype=torch.float32)


def _run_masks(run: Callable[[torch.Tensor], torch.Tensor], masks: list[Callable[[], torch.Tensor]],
               n_units: int, chunk: int) -> torch.Tensor:
    """The metric of each mask ``[len(masks)]``, built ``chunk`` at a time: never every mask at once."""
    values = []
    with torch.no_grad():
        for start in range(0, len(masks), chunk):
            part = masks[start:start + chunk]
            batch = torch.empty(len(part), n_units)
            for row, make in enumerate(part):
                batch[row] = make()
            values.append(run(batch).double().cpu())
            del batch
    return torch.cat(values)
