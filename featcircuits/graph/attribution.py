"""build_graph: exact direct-effect attribution graphs from batched backward passes.

In the frozen replacement model (``ReplacementModel.run(..., clean=...)``) every target value (a
feature's encoder pre-activation or a target read-out of the logits) is affine in the sources (feature
activations, error vectors, embeddings). The edge ``source -> target`` is therefore

    A[t, s] = (d target / d site_output) . (a_s * W_dec[s])        features (a_s W_dec is what s writes)
    A[t, e] = (d target / d site_output) . error_vector             error nodes
    A[t, p] = (d target / d resid_pre_0) . embedding                embedding nodes

One forward pass is run on a batch of ``batch_size`` identical copies of the prompt with a zero
"delta" added to every site output; each backward pass seeds a different target in every batch row
(the encoder direction ``W_enc[:, f]`` at the target's input, or the target's read-out vector at the
unembedding input) and one ``autograd.grad`` gives the gradient of all those targets at every site at
once, which is contracted with the active decoder vectors. Feature rows are computed in order of
estimated influence when ``max_feature_nodes`` caps them (as circuit-tracer does).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..patching.linear_backward import unsupported_reason
from ..patching.replacement import ReplacementModel
from .attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET, AttributionGraph
from .influence import normalize_adjacency
from .rows import RowComputer
from .targets import Target, resolve_targets

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..dictionaries import Dictionary

__all__ = ["build_graph", "estimate_graph_memory", "GraphTooLargeError"]



class GraphTooLargeError(ValueError):
    """The requested graph would need more memory than the budget allows."""


def estimate_graph_memory(rm: ReplacementModel, n_pos: int, n_active: int, n_feature_rows: int,
                          n_targets: int, batch_size: int, engine: str = "autograd") -> dict[str, int]:
    """Bytes needed by :func:`build_graph`: the gradients of one batch (with ``engine="autograd"``, the
    batched forward's autograd graph), the row buffer (only when ``n_feature_rows < n_active``: otherwise
    rows are written straight into the adjacency) and the dense adjacency."""
    cfg = rm.cfg
    itemsize = torch.finfo(cfg.dtype).bits // 8
    if engine == "autograd":
        d_mlp = cfg.d_mlp or 0  # None: an attention-only model, no MLP activations
        per_token = cfg.n_layers * (16 * cfg.d_model + 4 * d_mlp + 4 * cfg.n_heads * cfg.d_head + 2 * cfg.n_heads * n_pos)
        per_token += len(rm.sites) * 2 * cfg.d_model  # deltas and their gradients
        forward = 2 * batch_size * n_pos * per_token * itemsize
    else:  # a few [batch, pos, d_model] gradients per site, and the seeds
        forward = (len(rm.sites) + 4) * 2 * batch_size * n_pos * cfg.d_model * itemsize
    n_cols = n_active + (len(rm.sites) + 1) * n_pos
    rows = (n_feature_rows + n_targets) * n_cols * 4 if n_feature_rows < n_active else 0
    n_final = n_feature_rows + (len(rm.sites) + 1) * n_pos + n_targets
    adjacency = n_final * n_final * 4
    total = forward + rows + adjacency
    return {"forward_backward": forward, "row_buffer": rows, "adjacency": adjacency, "total": total}


def _as_replacement(model: HookedTransformer | ReplacementModel,
                    dictionaries: Sequence[Dictionary] | None) -> ReplacementModel:
    if isinstance(model, ReplacementModel):
        if dictionaries is not None:
            raise ValueError(
                "model is already a ReplacementModel, so dictionaries must be None; pass the prompt(s) by "
                "keyword, e.g. build_graph(rm, prompt=...) or build_dataset_graph(rm, prompts=...)."
            )
        return model
    if dictionaries is None:
        raise ValueError("build_graph needs dictionaries (or a ReplacementModel in place of the model).")
    return ReplacementModel(model, dictionaries)


def _partial_influence(rows: torch.Tensor, row_col: torch.Tensor, weights: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Influence on the targets of every column, from the rows computed so far (targets first)."""
    normalized = normalize_adjacency(rows)
    current = torch.zeros(rows.shape[0], device=rows.device)
    current[: weights.numel()] = weights
    influence = torch.zeros(n_cols, device=rows.device)
    has_row = row_col >= 0
    for _ in range(rows.shape[0] + 1):
        column_values = current @ normalized
        if not column_values.any():
            break
        influence += column_values
        current = torch.zeros_like(current)
        current[has_row] = column_values[row_col[has_row]]
    return influence


def build_graph(
    model: HookedTransformer | ReplacementModel,
    dictionaries: Sequence[Dictionary] | None = None,
    prompt: str | torch.Tensor | Sequence[int] = "",
    targets: Sequence[int] | Sequence[Target] | None = None,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 128,
    memory_budget_gb: float = 4.0,
    progress: bool = True,
    engine: str = "auto",
) -> AttributionGraph:
    """Attribution graph of one prompt.

    Args:
        model: a ``HookedTransformer`` (with ``dictionaries``) or a :class:`ReplacementModel`.
        dictionaries: transcoders / SAEs to splice in (ignored when ``model`` is a ReplacementModel).
        prompt: text or token ids ``[pos]``.
        targets: None for the most probable next tokens (up to ``desired_logit_prob`` cumulative
            probability, at most ``max_n_logits``); token ids; or :class:`Target` objects such as
            ``logit_diff_target(model, answer, distractor)``.
        max_feature_nodes: keep at most this many feature nodes, the most influential first.
        batch_size: targets seeded per backward pass.
        memory_budget_gb: refuse (before allocating) graphs whose estimated memory exceeds this.
        progress: show a progress bar over attribution rows.
        engine: how gradients are taken: ``"linear"`` (the frozen model's transpose written out; fast),
            ``"autograd"`` (through the HookedTransformer; any architecture), or ``"auto"``: linear where
            the model allows it (see :func:`featcircuits.patching.linear_backward.unsupported_reason`).
    """
    rm = _as_replacement(model, dictionaries)
    engine = _choose_engine(rm, engine)
    clean = rm.clean_run(prompt)
    n_pos = clean.n_pos
    resolved = resolve_targets(rm.model, clean.logits[-1], targets, max_n_logits, desired_logit_prob)
    for target in resolved:
        if not -n_pos <= target.pos < n_pos:
            raise ValueError(f"Target {target.name!r} is at position {target.pos}, outside the {n_pos}-token prompt.")
    target_pos = torch.tensor([t.pos % n_pos for t in resolved], device=clean.tokens.device)
    n_targets = len(resolved)

    # active features in (site, pos, feature) order
    site_parts, pos_parts, id_parts, act_parts = [], [], [], []
    for index, site in enumerate(rm.sites):
        if site.dictionary is None:
            continue
        acts = clean.feature_acts[site.name]
        pos, feat = acts.nonzero(as_tuple=True)
        site_parts.append(torch.full_like(pos, index))
        pos_parts.append(pos)
        id_parts.append(feat)
        act_parts.append(acts[pos, feat])
    device = clean.tokens.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    feature_site = torch.cat(site_parts) if site_parts else empty
    feature_pos = torch.cat(pos_parts) if pos_parts else empty
    feature_id = torch.cat(id_parts) if id_parts else empty
    feature_act = torch.cat(act_parts) if act_parts else torch.zeros(0, device=device)
    n_active = int(feature_site.numel())
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise ValueError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}.")
    n_keep = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    batch = max(1, min(batch_size, max(n_keep, n_targets)))

    memory = estimate_graph_memory(rm, n_pos, n_active, n_keep, n_targets, batch, engine)
    if memory["total"] > memory_budget_gb * 2**30:
        raise GraphTooLargeError(
            f"This graph needs about {memory['total'] / 2**30:.2f} GiB ({n_active} active features, {n_pos} tokens; "
            f"adjacency {memory['adjacency'] / 2**30:.2f} GiB, row buffer {memory['row_buffer'] / 2**30:.2f} GiB, "
            f"forward/backward {memory['forward_backward'] / 2**30:.2f} GiB) but memory_budget_gb={memory_budget_gb}. "
            + _largest_that_fits(rm, n_pos, n_active, n_targets, batch_size, engine, memory_budget_gb)
            + "Lower max_feature_nodes or batch_size, shorten the prompt, or raise memory_budget_gb."
        )

    computer = RowComputer(rm, clean, batch, feature_site, feature_pos, feature_id, feature_act, engine)
    n_cols = computer.n_cols
    n_sites = len(rm.sites)
    # With every feature kept, rows land straight in the adjacency (features first, targets last);
    # otherwise in a buffer, ranked by influence as they arrive, and the kept ones are gathered after.
    full = n_keep == n_active
    if full:
        adjacency = torch.zeros(n_cols + n_targets, n_cols + n_targets, device=device)
        row_buffer = None
        target_rows, feature_rows_out = adjacency[n_cols:, :n_cols], adjacency[:n_active, :n_cols]
    else:
        row_buffer = torch.zeros(n_targets + n_keep, n_cols, device=device)
        target_rows, feature_rows_out = row_buffer[:n_targets], row_buffer[n_targets:]
    row_col = torch.full((n_targets + n_keep,), -1, dtype=torch.long, device=device)
    bar = tqdm(total=n_targets + n_keep, desc=f"attribution rows (~{memory['total'] / 2**30:.2f} GiB)",
               disable=not progress)

    for start in range(0, n_targets, batch):  # target rows
        chunk = resolved[start:start + batch]
        chunk_pos = target_pos[start:start + len(chunk)]
        seed = torch.zeros(len(chunk), n_pos, rm.cfg.d_model, device=device, dtype=rm.cfg.dtype)
        seed[torch.arange(len(chunk), device=device), chunk_pos] = torch.stack([t.vector for t in chunk]).to(seed.dtype)
        computer.rows({}, seed, int(chunk_pos.max()) + 1, target_rows[start:start + len(chunk)])
        bar.update(len(chunk))

    weights = torch.tensor([t.weight for t in resolved], device=device, dtype=torch.float32)
    visited = torch.zeros(n_active, dtype=torch.bool, device=device)
    filled = n_targets
    while filled < n_targets + n_keep:
        if row_buffer is None:  # full
            order = torch.arange(n_active, device=device)[filled - n_targets:]
        else:  # most influential unvisited features first, re-ranked every few batches
            influence = _partial_influence(row_buffer[:filled], row_col[:filled], weights, n_cols)[:n_active]
            ranked = influence.argsort(descending=True)
            order = ranked[~visited[ranked]][: min(4 * batch, n_targets + n_keep - filled)]
        for lo in range(0, order.numel(), batch):
            features = order[lo:lo + batch]
            k = features.numel()
            seeds, seeded_pos = computer.feature_seeds(features)
            row = filled - n_targets
            computer.rows(seeds, None, seeded_pos, feature_rows_out[row:row + k])
            row_col[filled:filled + k] = features
            visited[features] = True
            filled += k
            bar.update(k)
    bar.close()
    del computer

    selected = visited.nonzero().squeeze(1)  # ascending: keeps (site, pos, feature) order
    n_final = selected.numel() + (n_sites + 1) * n_pos + n_targets
    if row_buffer is not None:  # not full
        keep_cols = torch.cat([selected, torch.arange(n_active, n_cols, device=device)])
        adjacency = torch.zeros(n_final, n_final, device=device)
        feature_rows = torch.full((n_active,), -1, dtype=torch.long, device=device)
        feature_rows[row_col[n_targets:filled]] = torch.arange(n_targets, filled, device=device)
        adjacency[: selected.numel(), : keep_cols.numel()] = row_buffer[feature_rows[selected]][:, keep_cols]
        adjacency[n_final - n_targets:, : keep_cols.numel()] = row_buffer[:n_targets][:, keep_cols]
        del row_buffer

    positions = torch.arange(n_pos, device=device)
    minus = torch.full((n_pos,), -1, dtype=torch.long, device=device)
    node_keys = torch.cat([
        torch.stack([torch.full_like(selected, FEATURE), feature_site[selected], feature_pos[selected],
                     feature_id[selected]], dim=1),
        torch.stack([torch.full((n_sites * n_pos,), ERROR, device=device),
                     torch.arange(n_sites, device=device).repeat_interleave(n_pos), positions.repeat(n_sites),
                     minus.repeat(n_sites)], dim=1),
        torch.stack([torch.full_like(positions, EMBEDDING), minus, positions, minus], dim=1),
        torch.stack([torch.full((n_targets,), TARGET, device=device), torch.full((n_targets,), -1, device=device),
                     target_pos, torch.arange(n_targets, device=device)], dim=1),
    ])
    with torch.no_grad():
        final = clean.final
        target_values = torch.stack([final[p] @ t.vector + t.bias for t, p in zip(resolved, target_pos.tolist(), strict=True)])
    activations = torch.cat([
        feature_act[selected].float(),
        torch.stack([clean.errors[site.name] for site in rm.sites]).norm(dim=-1).reshape(-1).float(),
        clean.embeddings.norm(dim=-1).float(),
        target_values.float(),
    ])
    prompt_text = prompt if isinstance(prompt, str) else ""
    graph = AttributionGraph(
        node_keys=node_keys, adjacency=adjacency, activations=activations, sites=[s.name for s in rm.sites],
        targets=[_with_pos(t, p) for t, p in zip(resolved, target_pos.tolist(), strict=True)], tokens=clean.tokens,
        prompt=prompt_text, n_active_features=n_active, replacement=rm, clean=clean,
    )
    # which gradient engine made the edges, and why not the linear one (saved with the graph)
    graph.provenance["engine"] = {"name": engine, "linear_unsupported": unsupported_reason(rm)}
    graph.provenance["params"] = {"max_feature_nodes": max_feature_nodes, "max_n_logits": max_n_logits,
                                  "desired_logit_prob": desired_logit_prob}
    return graph


def _largest_that_fits(rm: ReplacementModel, n_pos: int, n_active: int, n_targets: int, batch_size: int,
                       engine: str, budget_gb: float) -> str:
    """``"max_feature_nodes=N fits. "`` for the largest N whose estimate is within the budget (bisection: the
    estimate grows with N), or an empty string when not even N=0 fits."""
    def fits(n_keep: int) -> bool:
        batch = max(1, min(batch_size, max(n_keep, n_targets)))  # as build_graph sizes it
        total = estimate_graph_memory(rm, n_pos, n_active, n_keep, n_targets, batch, engine)["total"]
        return total <= budget_gb * 2**30

    if not fits(0):
        return ""
    low, high = 0, n_active  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return f"max_feature_nodes={low} fits. "


def _choose_engine(rm: ReplacementModel, engine: str) -> str:
    if engine not in ("auto", "linear", "autograd"):
        raise ValueError(f"engine must be 'auto', 'linear' or 'autograd', got {engine!r}.")
    reason = unsupported_reason(rm)
    if engine == "linear" and reason is not None:
        raise ValueError(f"engine='linear' cannot run this model ({reason}); use engine='autograd'.")
    if engine == "auto":
        return "linear" if reason is None else "autograd"
    return engine


def _with_pos(target: Target, pos: int) -> Target:
    return Target(target.name, target.vector, target.bias, pos=pos, weight=target.weight,
                  is_logit=target.is_logit, token=target.token)
