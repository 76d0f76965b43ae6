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
from .influence import partial_influence
from .memory import INFLUENCE_CHUNK_ENTRIES, estimate_graph_memory, largest_that_fits
from .offload import OFFLOAD_CHOICES, offloaded
from .rows import RowComputer, layout_entries
from .targets import Target, resolve_targets

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from ..dictionaries import Dictionary

__all__ = ["build_graph", "estimate_graph_memory", "GraphTooLargeError"]  # the estimate lives in .memory



class GraphTooLargeError(ValueError):
    """The requested graph would need more memory than the budget allows."""


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
    offload: str | None = None,
    update_interval: int = 4,
) -> AttributionGraph:
    """Attribution graph of one prompt.

    Memory scales with what is kept: with ``max_feature_nodes=N`` only the rows of the targets and of the
    N most influential features are computed (``[n_targets + N, n_columns]`` over every active feature,
    error and embedding), and the adjacency is over the kept nodes alone; the full active set is never
    held as ``[n_active, n_active]``. Features are chosen as circuit-tracer chooses them: target rows
    first, then feature rows in batches, in order of their influence on the targets estimated from the
    rows computed so far (re-ranked every ``update_interval`` batches).

    Args:
        model: a ``HookedTransformer`` (with ``dictionaries``) or a :class:`ReplacementModel`.
        dictionaries: transcoders / SAEs to splice in (ignored when ``model`` is a ReplacementModel).
        prompt: text or token ids ``[pos]``.
        targets: None for the most probable next tokens (up to ``desired_logit_prob`` cumulative
            probability, at most ``max_n_logits``); token ids; or :class:`Target` objects such as
            ``logit_diff_target(model, answer, distractor)``.
        max_feature_nodes: keep at most this many feature nodes (at least 1), the most influential first;
            more than the prompt activates keeps them all; None keeps all.
        batch_size: targets seeded per backward pass.
        memory_budget_gb: refuse (before allocating) graphs whose estimated memory exceeds this, naming the
            largest ``max_feature_nodes`` that fits (:func:`estimate_graph_memory`).
        progress: show a progress bar over attribution rows (rows done, estimated memory).
        engine: how gradients are taken: ``"linear"`` (the frozen model's transpose written out; fast,
            fp32 whatever the model's dtype), ``"autograd"`` (through the HookedTransformer; any
            architecture), or ``"auto"``: linear where the model allows it (see
            :func:`featcircuits.patching.linear_backward.unsupported_reason`).
        offload: ``"cpu"`` (linear engine): while rows are computed the model's and dictionaries' weights and
            the decoder layout stay in CPU memory, and each site's decoder slice is moved to the model's
            device per batch (for an accelerator short of memory); None keeps everything on the device.
        update_interval: batches between re-rankings of the features by estimated influence.
    """
    rm = _as_replacement(model, dictionaries)
    engine = _choose_engine(rm, engine)
    _check_caps(max_feature_nodes, batch_size, update_interval, offload, engine)
    clean = rm.clean_run(prompt)
    n_pos = clean.n_pos
    resolved = resolve_targets(rm.model, clean.logits[-1], targets, max_n_logits, desired_logit_prob)
    for target in resolved:
        if not -n_pos <= target.pos < n_pos:
            raise ValueError(f"Target {target.name!r} is at position {target.pos}, outside the {n_pos}-token prompt.")
    target_pos = torch.tensor([t.pos % n_pos for t in resolved], device=clean.tokens.device)
    n_targets = len(resolved)
    feature_site, feature_pos, feature_id, feature_act = _active_features(rm, clean)
    n_active = int(feature_site.numel())
    if n_active == 0:
        raise ValueError(
            f"The prompt activates no feature of the {len(rm.dictionaries)} dictionaries ({n_pos} tokens), so "
            "there is nothing to attribute: check that the dictionaries belong to this model and hook, or use "
            "a longer prompt.")
    n_keep = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    batch = max(1, min(batch_size, max(n_keep, n_targets)))
    layout = layout_entries(feature_site, feature_pos, len(rm.sites), n_pos,
                            [len(rm.outputs_of(index)) for index in range(len(rm.sites))])
    memory = estimate_graph_memory(rm, n_pos, n_active, n_keep, n_targets, batch, engine, layout_vectors=layout,
                                   offload=offload is not None)
    if memory["total"] > memory_budget_gb * 2**30:
        fits = largest_that_fits(rm, n_pos, n_active, n_targets, batch_size, engine, memory_budget_gb, layout,
                                 offload is not None)
        raise GraphTooLargeError(
            f"This graph needs about {memory['total'] / 2**30:.2f} GiB ({n_active} active features, {n_keep} kept, "
            f"{n_pos} tokens; rows {memory['row_buffer'] / 2**30:.2f} GiB, adjacency "
            f"{memory['adjacency'] / 2**30:.2f} GiB, decoder layout {memory['decoder_layout'] / 2**30:.2f} GiB, "
            f"gradients {memory['forward_backward'] / 2**30:.2f} GiB) but memory_budget_gb={memory_budget_gb}. "
            + (f"max_feature_nodes={fits} fits. " if fits is not None else "Not even one feature node fits. ")
            + "Lower max_feature_nodes or batch_size, shorten the prompt, or raise memory_budget_gb."
        )

    device = clean.tokens.device
    with offloaded(rm, offload):
        computer = RowComputer(rm, clean, batch, feature_site, feature_pos, feature_id, feature_act, engine,
                               offload=offload is not None)
        adjacency, visited, row_node, row_buffer = _compute_rows(
            computer, resolved, target_pos, n_keep, batch, update_interval, memory, progress)
        del computer
    selected = visited.nonzero().squeeze(1)  # ascending: keeps (site, pos, feature) order
    if row_buffer is not None:  # capped: gather the kept columns of the kept rows, chunk by chunk
        adjacency = _gather_kept(row_buffer, row_node, selected, n_targets, n_active)
        del row_buffer
    assert adjacency is not None  # either the rows were the adjacency or it was gathered from them

    n_sites = len(rm.sites)
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
        target_values = torch.stack([final[p].float() @ t.vector.float() + t.bias
                                     for t, p in zip(resolved, target_pos.tolist(), strict=True)])
    activations = torch.cat([
        feature_act[selected].float(),
        torch.stack([clean.errors[site.name] for site in rm.sites]).float().norm(dim=-1).reshape(-1),
        clean.embeddings.float().norm(dim=-1),
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


def _check_caps(max_feature_nodes: int | None, batch_size: int, update_interval: int, offload: str | None,
                engine: str) -> None:
    for name, value in (("max_feature_nodes", max_feature_nodes), ("batch_size", batch_size),
                        ("update_interval", update_interval)):
        if value is None and name == "max_feature_nodes":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            what = " (or None to keep every active feature)" if name == "max_feature_nodes" else ""
            raise ValueError(f"{name} must be a whole number of at least 1{what}, got {value!r}.")
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be None or 'cpu', got {offload!r}.")
    if offload is not None and engine != "linear":
        raise ValueError("offload='cpu' needs the linear engine (the autograd engine runs the model itself on its "
                         "device); use engine='linear' or offload=None.")


def _active_features(rm: ReplacementModel, clean) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active features in (site, pos, feature) order: site index, pos, feature id (each ``[n]``) and activation."""
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
    if not site_parts:
        return empty, empty, empty, torch.zeros(0, device=device)
    return torch.cat(site_parts), torch.cat(pos_parts), torch.cat(id_parts), torch.cat(act_parts)


def _compute_rows(computer: RowComputer, resolved: list[Target], target_pos: torch.Tensor, n_keep: int, batch: int,
                  update_interval: int, memory: dict[str, int], progress: bool):
    """Target rows, then feature rows in order of estimated influence. Returns ``(adjacency, visited [n_active],
    row_node, row_buffer)``: with every feature kept the rows land straight in the adjacency (features first,
    targets last) and ``row_buffer`` is None; otherwise ``adjacency`` is None and ``row_buffer``
    ``[n_targets + n_keep, n_cols]`` holds the rows, ``row_node`` the active feature of each (-1: target)."""
    n_active, n_cols, n_targets = computer.n_active, computer.n_cols, len(resolved)
    device = target_pos.device
    if n_keep == n_active:
        adjacency = torch.zeros(n_cols + n_targets, n_cols + n_targets, device=device)
        row_buffer = None
        target_rows, feature_rows_out = adjacency[n_cols:, :n_cols], adjacency[:n_active, :n_cols]
    else:
        adjacency = None
        row_buffer = torch.zeros(n_targets + n_keep, n_cols, device=device)
        target_rows, feature_rows_out = row_buffer[:n_targets], row_buffer[n_targets:]
    row_node = torch.full((n_targets + n_keep,), -1, dtype=torch.long, device=device)
    bar = tqdm(total=n_targets + n_keep, unit="row", disable=not progress,
               desc=f"attribution rows ({n_keep} of {n_active} features, est. {memory['total'] / 2**30:.2f} GiB)")
    d_model = computer.rm.cfg.d_model
    for start in range(0, n_targets, batch):  # target rows
        chunk = resolved[start:start + batch]
        chunk_pos = target_pos[start:start + len(chunk)]
        seed = torch.zeros(len(chunk), computer.clean.n_pos, d_model, device=device, dtype=computer.dtype)
        seed[torch.arange(len(chunk), device=device), chunk_pos] = torch.stack(
            [t.vector.to(device) for t in chunk]).to(seed.dtype)
        computer.rows({}, seed, int(chunk_pos.max()) + 1, target_rows[start:start + len(chunk)])
        bar.update(len(chunk))

    weights = torch.tensor([t.weight for t in resolved], device=device, dtype=torch.float32)
    visited = torch.zeros(n_active, dtype=torch.bool, device=device)
    filled = n_targets
    while filled < n_targets + n_keep:
        if row_buffer is None:  # every feature is kept: in column order
            order = torch.arange(n_active, device=device)[filled - n_targets:]
        else:  # most influential unvisited features first, re-ranked every few batches
            row_level = torch.where(row_node[:filled] >= 0, computer.feature_site[row_node[:filled].clamp(min=0)],
                                    len(computer.rm.sites))  # targets above every site
            influence = partial_influence(row_buffer[:filled], row_node[:filled], weights,
                                          INFLUENCE_CHUNK_ENTRIES, row_level)[:n_active]
            ranked = influence.argsort(descending=True)
            order = ranked[~visited[ranked]][: min(update_interval * batch, n_targets + n_keep - filled)]
            # Which features a queue holds is the ranking's choice; their order within it is free (rows are
            # put in node order at the end). By position, each batch spans fewer positions: the backward
            # pass only runs up to a batch's last seeded position.
            order = order[torch.argsort(computer.feature_pos[order], stable=True)]
        for lo in range(0, order.numel(), batch):
            features = order[lo:lo + batch]
            if row_buffer is not None:  # (full graphs: rows land in node order, and a batch spans a site or two)
                # highest site first: the backward walk then carries only the rows seeded so far
                features = features[torch.argsort(computer.feature_site[features], descending=True, stable=True)]
            k = features.numel()
            seeds, seeded_pos = computer.feature_seeds(features)
            row = filled - n_targets
            computer.rows(seeds, None, seeded_pos, feature_rows_out[row:row + k])
            row_node[filled:filled + k] = features
            visited[features] = True
            filled += k
            bar.update(k)
    bar.close()
    return adjacency, visited, row_node, row_buffer


def _gather_kept(row_buffer: torch.Tensor, row_node: torch.Tensor, selected: torch.Tensor, n_targets: int,
                 n_active: int) -> torch.Tensor:
    """The adjacency ``[n_final, n_final]`` over the kept features (``selected``, ascending), every error and
    embedding and the targets, from the rows: kept rows in node order, kept columns only, a chunk at a time
    (no second copy of the rows)."""
    device = row_buffer.device
    keep_cols = torch.cat([selected, torch.arange(n_active, row_buffer.shape[1], device=device)])
    n_final = keep_cols.numel() + n_targets
    adjacency = torch.zeros(n_final, n_final, device=device)
    row_of = torch.full((n_active,), -1, dtype=torch.long, device=device)
    row_of[row_node[n_targets:]] = torch.arange(n_targets, row_node.numel(), device=device)
    source_rows = torch.cat([row_of[selected], torch.arange(n_targets, device=device)])
    dest_rows = torch.cat([torch.arange(selected.numel(), device=device),
                           torch.arange(n_final - n_targets, n_final, device=device)])
    step = max(1, INFLUENCE_CHUNK_ENTRIES // max(1, row_buffer.shape[1]))
    for lo in range(0, source_rows.numel(), step):
        chunk = row_buffer.index_select(0, source_rows[lo:lo + step])
        adjacency[dest_rows[lo:lo + step], : keep_cols.numel()] = chunk.index_select(1, keep_cols)
    return adjacency


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
