"""Pieces every frozen site shares, whatever writes its output: recording its input, and its feature activations."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ..dictionaries import Dictionary
from .records import CleanRun, Patch, ReplacementOutput, apply_patch

__all__ = ["input_recorder", "frozen_feature_acts"]


def input_recorder(out: ReplacementOutput, name: str, dictionary: Dictionary, return_acts: bool) -> Callable:
    """A hook at a site's input: keeps it in ``out.inputs`` (and its pre-activations when asked) unchanged."""
    def read(x, hook):
        out.inputs[name] = x
        if return_acts:
            out.pre_acts[name] = dictionary.pre_acts(x)
        return x

    return read


def frozen_feature_acts(clean: CleanRun, batch: int, name: str, out: ReplacementOutput,
                        feature_patch: Mapping[str, Patch],
                        features_from_inputs: Callable[[str, torch.Tensor], torch.Tensor] | None) -> torch.Tensor | None:
    """A frozen site's feature activations ``[batch, pos, d_sae]``: recomputed from its recorded input, or the clean
    run's patched; None when neither applies (the clean run's hold, ``[pos, d_sae]``)."""
    if features_from_inputs is not None:
        return apply_patch(features_from_inputs(name, out.inputs[name]), feature_patch.get(name))
    if name in feature_patch:
        return apply_patch(clean.feature_acts[name].expand(batch, -1, -1), feature_patch[name])
    return None
