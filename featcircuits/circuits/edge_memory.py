"""How much memory feature-edge circuits need, estimated before anything is allocated, against a budget.

Feature edges are many: every feature or error node feeds every feature node at a later site and a later
or equal position, so a graph of ``n`` nodes has up to about ``n^2 / 2`` candidate edges (1.5 million for
2,800 nodes), and the linear map is dense, so nearly all of them have a non-zero weight. The bound is
counted exactly from the nodes (a histogram over sites and positions), and each stage's bytes follow from
what the code allocates per edge:

* ``weights`` (building :class:`FeatureEdgeGraph`): the receiver chunks' weights ``[prompts, chunk, nodes]``,
  the pooled edges (sender and receiver indices, a score and a weight per prompt: ``20 + 4 * prompts``
  bytes each), their concatenation, and the ``(sender, receiver)`` id list (a Python tuple each: 64 bytes,
  plus the two index lists it is read from);
* ``search``: what stays (the edge tensors and ids), ACDC's bookkeeping (the walk order as a Python list,
  keep/guess masks, the downstream counts: about 80 bytes an edge) and one chain of ``batch_size`` keep
  masks over every edge (``4 * batch_size`` bytes an edge) with the forward's per-site temporaries (two
  ``[copies, edges into one site]`` tensors); AtP and AtP-IG need only a few score vectors;
* ``evaluate``: the circuit's score and id lists, the sweep's masks (one forward's worth at a time) and
  the saved JSON's text.

The peak is the largest stage. :func:`check_feature_edge_memory` refuses a plan over the budget and names
the largest ``max_edges`` (and, when every edge could fit at a smaller one, the largest ``batch_size``) that
fits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .features import FeatureGraph

__all__ = ["CircuitTooLargeError", "EdgeMemoryPlan", "candidate_edges", "estimate_feature_edge_memory",
           "check_feature_edge_memory"]

GIB = 2**30
TUPLE_BYTES = 64  # one (sender id, receiver id) tuple and its list slot (the ids are shared strings)
INDEX_LIST_BYTES = 37  # one Python int in a tolist() list, with its slot
FLOAT_LIST_BYTES = 40  # one Python float in a list, with its slot
JSON_TEXT_BYTES = 72  # one edge in the saved circuit's text (its ids and score) and its score's list slot


class CircuitTooLargeError(ValueError):
    """The requested circuit search would need more memory than the budget allows."""


@dataclass
class EdgeMemoryPlan:
    """Bytes per stage of a feature-edge circuit search, and the work it implies.

    ``n_candidates`` bounds the candidate edges (every sender upstream of its receiver), ``n_edges`` is
    what the search walks (``max_edges`` when smaller); ``weight_passes`` is the number of batched backward
    passes that build the edge weights; ``search_forwards`` the forwards ACDC needs at the least (one per
    ``batch_size`` edges; wrong guesses add some, free removals save some; 0 for AtP and AtP-IG).
    """

    n_candidates: int
    n_edges: int
    batch_size: int
    stages: dict[str, int] = field(default_factory=dict)
    weight_passes: int = 0
    search_forwards: int = 0

    @property
    def peak(self) -> int:
        return max(self.stages.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in self.stages.items())
        return (f"{self.n_edges} feature edges (of at most {self.n_candidates} candidates): about "
                f"{self.peak / GIB:.2f} GiB at the peak ({parts} GiB)")


def candidate_edges(nodes: FeatureGraph) -> tuple[int, int, int]:
    """Upper bounds on the candidate edges of ``nodes`` (per-position feature/error nodes): edges into
    features, edges into the logits, and edges into the features of any one site, counted from a histogram
    of nodes over ``[sites, positions]`` without building an edge."""
    sites = {site.name: i for i, site in enumerate(nodes.rm.sites)}
    width = nodes._width
    senders = torch.zeros(len(sites), width)
    receivers = torch.zeros(len(sites), width)
    for key, site, _, pos, _ in nodes._site_units:
        counts = torch.bincount(pos.cpu().clamp(min=0), minlength=width)[:width].float()
        senders[sites[site]] += counts
        if key.startswith("feat:"):
            receivers[sites[site]] += counts
    # senders at earlier sites and at the same or earlier positions reach a receiver
    upstream = torch.cat([torch.zeros(1, width), senders.cumsum(0)[:-1]]).cumsum(1)
    per_site = (receivers * upstream).sum(1)
    n_nodes = len(nodes.node_ids)
    return int(per_site.sum()), n_nodes, int(per_site.max()) if len(per_site) else 0


def _model_forward_bytes(nodes: FeatureGraph, copies: int) -> int:
    """One batched replacement forward of ``copies`` patterns over the longest prompt: the residual stream
    and block activations, and per site the features four times over (pre-activations, activations, the held
    copy, the correction)."""
    cfg = nodes.rm.cfg
    d_sae = sum(site.dictionary.cfg.d_sae for site in nodes.rm.sites if site.dictionary is not None)
    per_position = cfg.n_layers * (12 * cfg.d_model + 3 * (cfg.d_mlp or 0)) + 4 * d_sae
    return 4 * copies * nodes._width * per_position


def estimate_feature_edge_memory(nodes: FeatureGraph, max_edges: int | None = None, batch_size: int = 32,
                                 method: str = "acdc", chunk: int = 64) -> EdgeMemoryPlan:
    """The memory plan of a feature-edge search over ``nodes`` (see the module docstring): bytes per stage.

    Args:
        nodes: per-position feature/error nodes (a :class:`FeatureGraph`).
        max_edges: the candidate edges kept (None: every one).
        batch_size: ablation patterns per ACDC chain (and per forward, with the graph's ``max_copies``).
        method: ``acdc``, ``atp`` or ``ig``.
        chunk: receivers per backward pass while the weights are built.
    """
    into_features, into_logits, into_one_site = candidate_edges(nodes)
    n_candidates = into_features + into_logits
    n_edges = n_candidates if max_edges is None else min(max_edges, n_candidates)
    # edges into features and into the logits among the kept ones, at most what each kind can hold
    feature_edges = min(n_edges, into_features)
    logit_edges = min(n_edges, into_logits)
    site_edges = min(n_edges, into_one_site)
    n_prompts, n_nodes = len(nodes.task), len(nodes.node_ids)
    cfg, width = nodes.rm.cfg, nodes._width
    d_model, n_sites = cfg.d_model, len(nodes.rm.sites)
    d_sae = sum(site.dictionary.cfg.d_sae for site in nodes.rm.sites if site.dictionary is not None)
    copies = min(batch_size, nodes.max_copies)
    per_edge = 20 + 4 * n_prompts  # sender, receiver (int64), score, one weight per prompt (float32)
    # what the graph keeps: the edge tensors, the logit edges' [prompts, d_model] weights, the id list
    stored = (per_edge + 4) * feature_edges + (per_edge + 4 * n_prompts * d_model) * logit_edges
    stored += TUPLE_BYTES * n_edges

    # building: a chunk's weights with their stacked pieces and masks, the pools (trimmed to 2 * max_edges
    # and re-joined when a limit is set), then the joined edge tensors and the id list read from them
    chunk_bytes = 9 * n_prompts * chunk * n_nodes + 8 * chunk * width * (d_sae + n_sites * d_model)
    pooled = into_features if max_edges is None else min(into_features, 2 * max_edges + chunk * n_nodes)
    pool_bytes = per_edge * (pooled if max_edges is None else 2 * pooled + max_edges)
    joining = (per_edge + 4 * n_prompts) * feature_edges + 5 * n_prompts * d_model * n_nodes
    ids = stored + 2 * INDEX_LIST_BYTES * n_edges
    clean_runs = 4 * n_prompts * width * (3 * d_sae + 4 * n_sites * d_model)
    weights = clean_runs + max(pool_bytes + chunk_bytes, joining, ids)

    # one forward of `copies` patterns: the mask chunk's per-site temporaries and the model's activations
    forward = 8 * copies * site_edges + 32 * site_edges + 4 * copies * n_edges + _model_forward_bytes(nodes, copies)
    if method == "acdc":
        # estimate, guesses, keep/scores, the walk order and what remains of it (Python lists), downstream
        # sender/receiver lists, and the chain's [batch_size, edges] masks
        search = stored + 80 * n_edges + 4 * batch_size * n_edges + forward
    else:  # scores, their magnitudes, a ranking
        search = stored + 24 * n_edges + forward
    # the circuit's score and id lists, the sweep's rankings, one forward of masks; then the saved lists
    circuit_lists = (FLOAT_LIST_BYTES + 16) * n_edges
    evaluate = stored + circuit_lists + max(48 * n_edges + forward, JSON_TEXT_BYTES * n_edges)
    n_receivers = sum(len(feats) for key, _, _, _, feats in nodes._site_units if key.startswith("feat:"))
    passes = n_prompts * (1 + -(-n_receivers // chunk) + -(-d_model // chunk))
    return EdgeMemoryPlan(n_candidates, n_edges, batch_size, {"weights": weights, "search": search,
                                                               "evaluate": evaluate},
                          weight_passes=passes, search_forwards=-(-n_edges // batch_size) if method == "acdc" else 0)


def check_feature_edge_memory(nodes: FeatureGraph, memory_budget_gb: float, max_edges: int | None = None,
                              batch_size: int = 32, method: str = "acdc", chunk: int = 64,
                              built: bool = False) -> EdgeMemoryPlan:
    """The plan of :func:`estimate_feature_edge_memory`, or :class:`CircuitTooLargeError` (before anything
    is allocated) when its peak exceeds ``memory_budget_gb``, naming the largest ``max_edges`` that fits.
    ``built``: the edges exist already (``max_edges`` is their number), so only the search and the
    evaluation are still to come."""
    if not memory_budget_gb > 0:
        raise ValueError(f"memory_budget_gb={memory_budget_gb}; give a positive number of GiB.")
    budget = memory_budget_gb * GIB

    def peak(edges: int | None, batch: int = batch_size) -> EdgeMemoryPlan:
        plan = estimate_feature_edge_memory(nodes, edges, batch, method, chunk)
        if built:
            del plan.stages["weights"]
        return plan

    plan = peak(max_edges)
    if plan.peak <= budget:
        return plan

    def fits(edges: int, batch: int = batch_size) -> bool:
        return peak(edges, batch).peak <= budget

    advice = []
    if fits(1):
        low, high = 1, plan.n_edges  # fits(low), not fits(high)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        advice.append(f"max_edges={low} fits (--max-edges {low})")
    if method == "acdc" and batch_size > 1 and fits(plan.n_edges, 1):
        low, high = 1, batch_size
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(plan.n_edges, middle) else (low, middle)
        advice.append(f"batch_size={low} fits with these {plan.n_edges} edges (--batch-size {low})")
    if not advice:
        advice.append("not even one edge fits: use fewer task pairs, shorter prompts or narrower dictionaries")
    raise CircuitTooLargeError(
        f"This feature-edge circuit needs {plan.describe()}, more than memory_budget_gb={memory_budget_gb}. "
        f"{'; '.join(advice)}; or raise memory_budget_gb (--memory-budget-gb).")
