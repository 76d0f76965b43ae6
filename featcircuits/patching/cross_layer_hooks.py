"""The replacement model's hooks at a cross-layer transcoder's sites (live and frozen runs).

A CLT site ``L`` reads its input like a per-layer transcoder, but what lands in MLP output ``M`` is what the
features of every CLT site ``0..M`` write there (``ReplacementModel.cross_layer_output``), plus ``M``'s error:

    output_M = sum_{L <= M} acts_L @ W_dec_L[:, M - L] + b_dec_M + error_M,    error_M = original_M - that sum (clean)

so each run keeps every CLT site's activations until the last MLP output has been written.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

import torch

from ..dictionaries.cross_layer_slice import CrossLayerSlice
from .edge_hooks import FwdHooks
from .frozen_sites import frozen_feature_acts, input_recorder
from .records import CleanRun, Patch, ReplacementOutput, Site, apply_patch


class ReplacementModel(Protocol):
    """What these hooks use of :class:`featcircuits.patching.replacement.ReplacementModel`."""

    sites: list[Site]

    def sources_into(self, index: int) -> list[int]: ...

    def cross_layer_output(self, index: int, acts_of: Callable[[int], torch.Tensor]) -> torch.Tensor: ...

__all__ = ["cross_layer_sites", "live_cross_layer_hooks", "frozen_cross_layer_hooks"]


def cross_layer_sites(rm: ReplacementModel) -> list[int]:
    """Indices of the sites a cross-layer transcoder's slices hold (empty without a CLT)."""
    return [index for index, site in enumerate(rm.sites) if isinstance(site.dictionary, CrossLayerSlice)]


def live_cross_layer_hooks(rm: ReplacementModel, feature_patch: Mapping[str, Patch], error_patch: Mapping[str, Patch],
                           out: ReplacementOutput, return_acts: bool, state: dict[str, torch.Tensor]) -> FwdHooks:
    """Live run: features from each site's live input; an MLP output is rewritten only when a feature that
    writes it or its error is patched (otherwise the original activation flows on, bit for bit)."""
    indices = cross_layer_sites(rm)
    names = {index: rm.sites[index].name for index in indices}
    patched = [index for index in indices if names[index] in error_patch
               or any(names[source] in feature_patch for source in rm.sources_into(index))]
    if not (patched or return_acts):
        return []
    hooks: FwdHooks = []
    for index in indices:
        site = rm.sites[index]
        name, d = site.name, site.dictionary
        assert d is not None

        def read(x, hook, name=name, d=d):
            pre = d.pre_acts(x)
            acts = d.activation(pre)
            state["clt:" + name] = acts
            state["clt_new:" + name] = apply_patch(acts, feature_patch.get(name))
            if return_acts:
                out.pre_acts[name] = pre
                out.feature_acts[name] = state["clt_new:" + name]
            return x

        hooks.append((site.hook_in, read))
        if index not in patched:
            continue

        def write(value, hook, index=index, name=name):
            unpatched = rm.cross_layer_output(index, lambda i: state["clt:" + names[i]])
            error = apply_patch(value - unpatched, error_patch.get(name))
            return rm.cross_layer_output(index, lambda i: state["clt_new:" + names[i]]) + error

        hooks.append((site.hook_out, write))
    return hooks


def frozen_cross_layer_hooks(rm: ReplacementModel, clean: CleanRun, batch: int, feature_patch: Mapping[str, Patch],
                             error_patch: Mapping[str, Patch], deltas: Mapping[str, torch.Tensor],
                             out: ReplacementOutput, return_acts: bool, state: dict[str, torch.Tensor],
                             features_from_inputs: Callable[[str, torch.Tensor], torch.Tensor] | None) -> FwdHooks:
    """Frozen run: feature activations and errors are inputs (clean unless patched, or recomputed from each
    site's frozen input with ``features_from_inputs``); each MLP output sums the writes of its source sites."""
    hooks: FwdHooks = []
    indices = cross_layer_sites(rm)
    names = {index: rm.sites[index].name for index in indices}
    for index in indices:
        site = rm.sites[index]
        name, d = site.name, site.dictionary
        assert d is not None
        recompute = features_from_inputs is not None or any(
            names[source] in feature_patch for source in rm.sources_into(index))

        def write(value, hook, index=index, name=name, recompute=recompute):
            acts = frozen_feature_acts(clean, batch, name, out, feature_patch, features_from_inputs)
            acts = clean.feature_acts[name] if acts is None else acts
            state["clt:" + name] = acts
            if return_acts:
                out.feature_acts[name] = acts.expand(batch, -1, -1)
            if recompute:
                recon = rm.cross_layer_output(index, lambda i: state["clt:" + names[i]])
            else:
                recon = clean.recon_features[name]
            result = recon.expand(batch, -1, -1) + apply_patch(clean.errors[name].expand(batch, -1, -1),
                                                               error_patch.get(name))
            return result + deltas[name] if name in deltas else result

        hooks.append((site.hook_in, input_recorder(out, name, d, return_acts)))
        hooks.append((site.hook_out, write))
    return hooks
