"""``find_circuit`` and ``evaluate``: the notebook-facing entry points of circuit discovery."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from .acdc_search import acdc, check_tau
from .circuit import ERROR_MODES, Circuit, check_top_fraction
from .components import ComponentGraph
from .edge_memory import check_feature_edge_memory
from .evaluation import evaluate_circuit
from .feature_edges import FeatureEdgeGraph
from .features import FeatureGraph
from .receivers import check_receivers
from .tasks import ContrastiveTask, get_metric, is_distance, load_task

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..dictionaries import Dictionary
    from ..patching.replacement import ReplacementModel

__all__ = ["find_circuit", "evaluate", "make_graph", "METHODS"]

# what a task may be given as: a task, a task JSON file, or its list of pair dicts
TaskSource: TypeAlias = "ContrastiveTask | str | Path | Sequence[dict]"

METHODS = ("atp", "ig", "acdc")


def _as_task(model: Any, task: ContrastiveTask | str | Path | Sequence[dict]) -> ContrastiveTask:
    if isinstance(task, ContrastiveTask):
        return task
    if isinstance(task, (str, Path)):
        return load_task(task, model)
    return ContrastiveTask.from_pairs(model, list(task))


def make_graph(model: HookedTransformer | ReplacementModel, task: TaskSource,
               dictionaries: Sequence[Dictionary] | None = None, ablation: str = "patch",
               metric: str | Callable = "logit_diff", positions: str = "each",
               sites: Sequence[str] | None = None, max_copies: int = 64) -> ComponentGraph | FeatureGraph:
    """The patchable graph a method runs on: feature/error nodes when dictionaries are given (a list of
    ``Dictionary`` or a ``ReplacementModel`` as ``model``), else heads and MLPs."""
    from ..patching.replacement import ReplacementModel

    if isinstance(model, ReplacementModel):
        replacement = model
    elif dictionaries is not None:
        replacement = ReplacementModel(model, list(dictionaries))
    else:
        replacement = None
    base = replacement.model if replacement is not None else model
    task = _as_task(base, task)
    if replacement is None:
        if sites is not None:
            raise ValueError(f"sites={list(sites)} needs dictionaries; without them the nodes are heads and MLPs.")
        return ComponentGraph(model, task, ablation=ablation, metric=metric, max_copies=max_copies)
    return FeatureGraph(replacement, task, ablation=ablation, metric=metric, sites=sites, positions=positions,
                        max_copies=max_copies)


def default_batch_size(source: Any) -> int:
    """Ablation patterns per forward when none is given, for the device ``source`` (a model, replacement model
    or graph) runs on: 32 on CPU, where it was faster than 64 for both component-edge and feature ACDC on
    stories260k and the bundled model (smaller tensors stay in cache, and a shorter speculative chain wastes
    fewer patterns after a wrong guess; benchmarks/RESULTS.md), and 64 on accelerators, where a forward of
    many patterns costs about what one does."""
    module = getattr(source, "model", None) or getattr(getattr(source, "rm", None), "model", None) or source
    parameter = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    return 64 if parameter is not None and parameter.device.type != "cpu" else 32


def find_circuit(
    model: HookedTransformer | ReplacementModel,
    task: TaskSource,
    method: str = "atp",
    *,
    dictionaries: Sequence[Dictionary] | None = None,
    level: str = "nodes",
    ablation: str = "patch",
    metric: str | Callable = "logit_diff",
    tau: float = 0.01,
    steps: int = 8,
    top_k: int | None = None,
    prefilter: int | None = None,
    positions: str = "each",
    sites: Sequence[str] | None = None,
    batch_size: int | None = None,
    graph: ComponentGraph | FeatureGraph | FeatureEdgeGraph | None = None,
    receivers: str = "linear",
    max_edges: int | None = None,
    errors: str = "rank",
    top_fraction: float | None = None,
    memory_budget_gb: float = 4.0,
    progress: bool = False,
) -> Circuit:
    """Find a circuit for ``task`` and return it scored and selected.

    Args:
        model: a HookedTransformer (component nodes, or feature nodes with ``dictionaries``) or a
            ``ReplacementModel`` (feature and error nodes).
        task: a :class:`ContrastiveTask`, a task JSON path, or a list of pair dicts.
        method: ``atp`` (attribution patching), ``ig`` (AtP with integrated gradients, ``steps``
            midpoints) or ``acdc``.
        level: ``nodes`` or ``edges``. Feature edges are the linear graph's edges between feature and
            error nodes (and into the logits), ablated in the local replacement model (see
            :mod:`featcircuits.circuits.feature_edges`); they need ``positions="each"``.
        tau: in [0, 1], a fraction of the gap ``|m(model) - m(all ablated)|``: ACDC removes a unit whose
            removal changes the metric by less than that; AtP/IG keep units whose estimated effect is at
            least that (unless ``top_k`` is given).
        top_k: select the ``k`` best-scored units instead (AtP/IG; with ``errors`` ``keep`` or ``ablate``,
            the ``k`` best feature units).
        metric: ``logit_diff``, ``prob_diff``, or a distance from the clean model, ``kl`` or ``l2`` (ACDC
            and IG only: AtP's gradient of a distance is zero at the clean run), or a function (see
            :mod:`featcircuits.circuits.tasks`).
        prefilter: ACDC only tries the ``prefilter`` units with the largest AtP scores (AtP-IG under a
            distance metric); the rest start removed.
        batch_size: ablation patterns per forward (ACDC's speculative chain length); default 32 on CPU, 64 on
            accelerators (:func:`default_batch_size`).
        graph: reuse a graph from :func:`make_graph` (then model/task/ablation/... are taken from it).
        receivers: edge AtP estimator (``level="edges"``): ``linear`` (plain AtP/EAP), ``exact`` (each
            receiver rerun with the edge removed: AtP*'s QK fix extended to values and MLPs) or ``secant``
            (``exact``, plus the receiver's exact node effect along its own ablation); see
            :mod:`featcircuits.circuits.receivers`. ACDC uses it for its guesses and pre-filter.
        max_edges: feature edges only: keep the ``max_edges`` candidate edges with the largest |AtP|
            (the others stay in the model); default all edges with a non-zero weight.
        errors: how error nodes (what the dictionaries miss) enter the circuit: ``rank`` (scored and
            selected with the features, as Sparse Feature Circuits does), ``keep`` (every one in the
            circuit; only features are selected) or ``ablate`` (none: a feature-only circuit). At
            ``level="edges"`` the error units are the edges out of error nodes. ACDC with ``keep`` never
            tries them; with ``ablate`` they start removed.
        top_fraction: AtP/IG: select the best ``top_fraction`` (in (0, 1]) of the feature units instead of
            a tau threshold (see :meth:`Circuit.top_fraction`).
        memory_budget_gb: feature edges: refuse, before allocating, a search whose estimated peak exceeds
            this, naming the largest ``max_edges`` that fits (:mod:`featcircuits.circuits.edge_memory`).
        progress: show progress bars (the feature edges' weights, ACDC's walk).
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {METHODS}.")
    if level not in ("nodes", "edges"):
        raise ValueError(f"level={level!r}; choose 'nodes' or 'edges'.")
    check_tau(tau)
    if errors not in ERROR_MODES:
        raise ValueError(f"errors={errors!r}; choose one of {ERROR_MODES}.")
    if top_fraction is not None:
        check_top_fraction(top_fraction)
        if top_k is not None:
            raise ValueError("Give top_k or top_fraction, not both.")
        if method == "acdc":
            raise ValueError("top_fraction selects the best AtP/IG scores; ACDC keeps what changes the metric by "
                             "at least tau. Use method='atp' or 'ig' with top_fraction, or tau with ACDC.")
    if check_receivers(receivers) != "linear" and (level != "edges" or method == "ig"):
        raise ValueError(f"receivers={receivers!r} refines edge AtP; use it with level='edges' and method "
                         "'atp' or 'acdc'.")
    if steps < 1:
        raise ValueError(f"steps={steps}; integrated gradients needs at least 1 step.")
    metric_fn = graph.metric_fn if graph is not None else get_metric(metric)
    distance = is_distance(metric_fn)
    if distance:  # refused before any graph is built
        name = repr(getattr(metric_fn, "__name__", metric))
        if method == "atp" or (method == "ig" and steps < 2):
            raise ValueError(
                f"metric {name} is a distance from the clean model: its gradient at the clean run is zero, so "
                f"{'AtP' if method == 'atp' else 'IG with steps=1 (its one point is the clean run)'} would score "
                "every unit 0. Use method='ig' (steps >= 2) or 'acdc' with it, or a signed metric "
                "('logit_diff', 'prob_diff') for AtP."
            )
        if receivers != "linear":
            raise ValueError(f"receivers={receivers!r} refines AtP's first-order edge estimate, which a distance "
                             f"metric ({name}) cannot use; leave receivers='linear'.")
    if batch_size is None:
        batch_size = default_batch_size(graph if graph is not None else model)
    if graph is None:
        graph = make_graph(model, task, dictionaries, ablation, metric, positions, sites, max_copies=batch_size)
    if max_edges is not None and not (level == "edges" and isinstance(graph, FeatureGraph | FeatureEdgeGraph)):
        raise ValueError("max_edges limits feature edges; use it with dictionaries and level='edges'.")
    if max_edges is not None and isinstance(graph, FeatureEdgeGraph):
        raise ValueError("max_edges is applied when the feature edges are built, and this FeatureEdgeGraph is "
                         "built already; build it with FeatureEdgeGraph(nodes, max_edges=...) instead.")
    if errors != "rank" and isinstance(graph, ComponentGraph):
        raise ValueError(f"errors={errors!r} decides what happens to error nodes, which only circuits over "
                         "dictionaries' features have; give dictionaries, or leave errors='rank' for heads and MLPs.")
    # refused before the edges are built (from a FeatureGraph) or searched (a built FeatureEdgeGraph)
    if level == "edges" and isinstance(graph, FeatureGraph):
        check_feature_edge_memory(graph, memory_budget_gb, max_edges, batch_size, method)
    elif level == "edges" and isinstance(graph, FeatureEdgeGraph):
        check_feature_edge_memory(graph.nodes, memory_budget_gb, len(graph.edge_ids), batch_size, method, built=True)
    # each level narrows the graph to the kinds that have its metric and attribution
    if level == "nodes":
        if isinstance(graph, FeatureEdgeGraph):
            graph = graph.nodes
        units, run, attribute = graph.node_ids, graph.node_metric, graph.node_attribution
    else:
        if isinstance(graph, FeatureGraph):
            graph = FeatureEdgeGraph(graph, max_edges=max_edges, progress=progress)
        units, run = graph.edge_ids, graph.edge_metric
        attribute = functools.partial(graph.edge_attribution, receivers=receivers)
    n_units = len(units)
    forwards_before = graph.forwards
    with torch.no_grad():
        ends = run(torch.stack([torch.ones(n_units), torch.zeros(n_units)])).cpu()
    gap = float((ends[0] - ends[1]).abs())
    params: dict[str, Any] = {"ablation": graph.ablation, "tau": tau, "metric": getattr(graph.metric_fn, "__name__", ""),
                              "errors": errors}
    is_error = torch.tensor([":error" in (u if level == "nodes" else u[0]) for u in units], dtype=torch.bool)
    if receivers != "linear":
        params["receivers"] = receivers
    if method in ("atp", "ig"):
        scores = attribute(steps=1 if method == "atp" else steps).detach().cpu()
        if method == "ig":
            params["steps"] = steps
        if top_k is not None:
            params["top_k"] = top_k
        elif top_fraction is not None:
            params["top_fraction"] = top_fraction
        chosen = None
    else:
        # AtP estimates guide the speculative chain (fewer forwards, same circuit) and the pre-filter; under a
        # distance metric AtP's are all 0, so integrated gradients (which leave the clean run) guide instead.
        estimate = attribute(steps=max(steps, 2) if distance else 1).detach().cpu().abs()
        # error units: with "keep" never tried (always in), with "ablate" removed from the start
        initial = ~is_error if errors == "ablate" else torch.ones(n_units, dtype=torch.bool)
        if prefilter is not None:
            tried = torch.zeros(n_units, dtype=torch.bool)
            ranked = estimate.argsort(descending=True)
            tried[(ranked if errors == "rank" else ranked[~is_error[ranked]])[:prefilter]] = True
            initial &= tried | (is_error if errors == "keep" else torch.zeros_like(tried))
            params["prefilter"] = prefilter
        error_list = is_error.tolist()  # (a list: iterating a tensor makes a tensor per unit)
        order = [unit for unit in reversed(range(n_units)) if errors != "keep" or not error_list[unit]]
        result = acdc(run, order, n_units, tau, batch_size=batch_size,
                      initial_keep=initial, reference_gap=gap, predicted_keep=estimate >= tau * gap,
                      # edges into nodes that left the circuit are free only if every edge is a candidate and
                      # no activation couples features (see FeatureEdgeGraph.free_removals)
                      edges=graph.edge_ids if level == "edges" and getattr(graph, "free_removals", True) else None,
                      progress=progress, unit_name=level[:-1])
        scores = result.scores.clone()
        scores[~initial] = 0.0  # never tried: removed from the start (the pre-filter's judgement, or ablated errors)
        chosen = result.keep.nonzero()[:, 0].tolist()
        params["batch_size"] = batch_size
    params["forwards"] = graph.forwards - forwards_before
    score_list = scores.float().tolist()
    circuit = Circuit(method, level, list(graph.node_ids), score_list if level == "nodes" else None,
                      list(graph.edge_ids), score_list if level == "edges" else None, params=params,
                      measured_in=graph.measured_in)
    circuit.params.update(params)
    if chosen is not None:  # ACDC's
        circuit = circuit._with_selection(chosen, {"tau": tau})
    elif top_k is not None:
        circuit = circuit.top_k(top_k)
    elif top_fraction is not None:
        circuit = circuit.top_fraction(top_fraction)
    else:
        circuit = circuit._with_selection(circuit._by_errors([i for i, s in enumerate(score_list) if abs(s) >= tau * gap]),
                                          {"tau": tau})
    circuit.params.update(params)
    circuit.graph = graph  # not saved; lets evaluate() reuse the graph
    return circuit


def evaluate(circuit: Circuit, graph: ComponentGraph | FeatureGraph | FeatureEdgeGraph | None = None,
             sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Faithfulness, completeness, the size sweep curve, CPR and CMD of ``circuit`` (see
    :func:`featcircuits.circuits.evaluation.evaluate_circuit`). ``graph`` defaults to the one the circuit
    was found on."""
    graph = graph if graph is not None else circuit.graph
    if graph is None:
        raise ValueError("This circuit carries no graph (it was loaded from a file); pass graph=make_graph(...).")
    return evaluate_circuit(graph, circuit, sizes)
