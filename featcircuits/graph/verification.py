"""verify: check edge weights by intervention in the frozen replacement model.

Each sampled source node is doubled (feature activation, error vector or embedding times two) in its
own row of one batched frozen forward pass; since the frozen model is affine in its sources, every
target (feature pre-activation or target read-out) must move by exactly the source's edge weight. This
is an independent check of the backward-pass attribution: it uses only forward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET, AttributionGraph

__all__ = ["verify", "VerifyResult"]


@dataclass
class VerifyResult:
    """``max_rel_error``: the largest, over sampled sources, of ``max |observed - edge| / max |edge|`` over
    that source's targets. ``observed`` / ``predicted``: ``[n_sources, n_target_rows]``."""

    max_rel_error: float
    max_abs_error: float
    n_sources: int
    n_targets: int
    sources: list[str]
    observed: torch.Tensor
    predicted: torch.Tensor

    def __str__(self) -> str:
        return (f"verified {self.n_sources} sources x {self.n_targets} targets: "
                f"max_rel_error={self.max_rel_error:.3g} max_abs_error={self.max_abs_error:.3g}")


@torch.no_grad()
def verify(graph: AttributionGraph, n_sources: int = 16, seed: int = 0,
           sources: torch.Tensor | None = None, scale: float | None = None) -> VerifyResult:
    """Perturb ``n_sources`` sampled source nodes (or the node indices ``sources``), one per batch row
    of a frozen forward, and compare every target's change with its edge weight.

    Each source is multiplied by ``1 + scale`` (``scale=1`` doubles it; by default a per-source scale
    making its largest predicted change as large as the targets' clean values). Relative errors are
    reported per unit of edge weight, so they do not depend on the scale.
    """
    if graph.replacement is None or graph.clean is None:
        raise ValueError(
            "verify needs the graph's ReplacementModel and clean run; dataset-level (mean) graphs and graphs "
            "loaded from files have none. Verify the single-prompt graphs instead."
        )
    rm, clean, keys = graph.replacement, graph.clean, graph.node_keys
    is_source = keys[:, 0] != TARGET
    if sources is None:
        candidates = is_source.nonzero().squeeze(1)
        generator = torch.Generator().manual_seed(seed)
        pick = torch.randperm(candidates.numel(), generator=generator)[: max(1, n_sources)]
        sources = candidates[pick.to(candidates.device)].sort().values
    sources = torch.as_tensor(sources, device=keys.device)
    if not is_source[sources].all():
        raise ValueError("verify sources must be feature, error or embedding nodes, not targets.")
    n_src = sources.numel()
    target_index = ((keys[:, 0] == FEATURE) | (keys[:, 0] == TARGET)).nonzero().squeeze(1)
    t_keys = keys[target_index]
    predicted = graph.adjacency[target_index][:, sources].T.float()  # [n_src, n_targets] for doubling
    # The frozen model is affine in each source, so a source scaled by (1 + lam) moves each target by
    # lam * edge for any lam. lam = 1 doubles the source; by default lam is raised so that the largest
    # predicted change is as large as the targets themselves, lifting it well above fp32 rounding of
    # the targets (whose absolute noise is ~1e-7 of their magnitude).
    clean_scale = _clean_target_scale(graph, t_keys)
    if scale is None:
        lam = (clean_scale / predicted.abs().amax(dim=1).clamp(min=1e-30)).clamp(min=1.0, max=1e6)
    else:
        lam = torch.full((n_src,), float(scale), device=predicted.device)
    predicted = predicted * lam[:, None]
    factor = (1 + lam).to(keys.device)
    batch = n_src + 1  # row 0 is the unperturbed frozen model
    rows = torch.arange(1, batch, device=keys.device)
    src_keys = keys[sources]

    feature_patch: dict[str, torch.Tensor] = {}
    error_patch: dict[str, torch.Tensor] = {}
    embed_patch = None
    for site_index in src_keys[:, 1].unique().tolist():
        if site_index < 0:
            continue
        name = graph.sites[site_index]
        at_site = src_keys[:, 1] == site_index
        feats = at_site & (src_keys[:, 0] == FEATURE)
        if feats.any():
            acts = clean.feature_acts[name].expand(batch, -1, -1).clone()
            acts[rows[feats], src_keys[feats, 2], src_keys[feats, 3]] *= factor[feats].to(acts.dtype)
            feature_patch[name] = acts
        errs = at_site & (src_keys[:, 0] == ERROR)
        if errs.any():
            errors = clean.errors[name].expand(batch, -1, -1).clone()
            errors[rows[errs], src_keys[errs, 2]] *= factor[errs, None].to(errors.dtype)
            error_patch[name] = errors
    embeds = src_keys[:, 0] == EMBEDDING
    if embeds.any():
        embed_patch = clean.embeddings.expand(batch, -1, -1).clone()
        embed_patch[rows[embeds], src_keys[embeds, 2]] *= factor[embeds, None].to(embed_patch.dtype)

    out = rm.run(clean.tokens, clean=clean, feature_acts=feature_patch, errors=error_patch,
                 embeddings=embed_patch, batch_size=batch, return_acts=True, compute_logits=False)

    values = torch.zeros(batch, target_index.numel(), device=keys.device, dtype=out.final.dtype)
    for site_index in t_keys[:, 1].unique().tolist():
        if site_index < 0:
            continue
        cols = (t_keys[:, 1] == site_index) & (t_keys[:, 0] == FEATURE)
        pre = out.pre_acts[graph.sites[site_index]]
        values[:, cols] = pre[:, t_keys[cols, 2], t_keys[cols, 3]]
    tcols = (t_keys[:, 0] == TARGET).nonzero().squeeze(1)
    for col in tcols.tolist():
        target = graph.targets[int(t_keys[col, 3])]
        values[:, col] = out.final[:, int(t_keys[col, 2])] @ target.vector.to(values.dtype) + target.bias

    observed = (values[1:] - values[:1]).float()  # [n_src, n_targets]
    abs_error = (observed - predicted).abs() / lam[:, None]  # per unit of edge weight
    biggest = predicted.abs().amax(dim=1) / lam
    has_effect = biggest > 0
    # a source without edges must leave every target unchanged: it counts through max_abs_error
    rel = abs_error.amax(dim=1)[has_effect] / biggest[has_effect]
    ids = graph.node_ids
    return VerifyResult(
        max_rel_error=float(rel.max()) if rel.numel() else 0.0,
        max_abs_error=float(abs_error.max()) if abs_error.numel() else 0.0,
        n_sources=n_src, n_targets=int(target_index.numel()),
        sources=[ids[i] for i in sources.tolist()], observed=observed / lam[:, None],
        predicted=predicted / lam[:, None],
    )


def _clean_target_scale(graph: AttributionGraph, t_keys: torch.Tensor) -> torch.Tensor:
    """Largest absolute clean value among the targets (feature pre-activations and target read-outs)."""
    biggest = torch.zeros((), device=t_keys.device)
    for site_index in t_keys[:, 1].unique().tolist():
        if site_index >= 0:
            cols = (t_keys[:, 1] == site_index) & (t_keys[:, 0] == FEATURE)
            pre = graph.clean.pre_acts[graph.sites[site_index]][t_keys[cols, 2], t_keys[cols, 3]]
            biggest = torch.maximum(biggest, pre.abs().max().float())
    target_values = graph.activations[graph.node_keys[:, 0] == TARGET]
    if target_values.numel():
        biggest = torch.maximum(biggest, target_values.abs().max().float())
    return biggest.clamp(min=1.0)
