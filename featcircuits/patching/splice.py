"""One dictionary spliced into the model's own forward, as training's CE/KL metrics measure it.

The replacement model adds each site's error term, so by construction it reproduces the model; a
dictionary's quality is measured without it: the dictionary's reconstruction replaces the activation at
``hook_out`` (special-token positions keep their real activation: no dictionary was trained on them), and
the model runs on from there with its own head (soft caps included).
"""

from __future__ import annotations

from typing import Any

import torch

from ..dictionaries import Dictionary
from .edge_hooks import FwdHooks

__all__ = ["spliced_forward", "zero_ablated_forward"]


def spliced_forward(model: Any, dictionary: Dictionary, tokens: torch.Tensor,
                    keep: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits ``[n_seq, ctx, d_vocab]`` with ``dictionary``'s reconstruction in place of its ``hook_out`` at the
    positions where ``keep [n_seq, ctx]`` is True, and what it saw: ``in_rows [kept, d_in]`` and the original
    ``out [n_seq, ctx, d_out]``."""
    cfg = dictionary.cfg
    captured: dict[str, torch.Tensor] = {}

    def read_input(acts: torch.Tensor, hook: Any) -> None:
        captured["in"] = acts

    def splice(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        x_in = acts if cfg.hook_in == cfg.hook_out else captured["in"]
        captured["out"] = acts.clone()
        captured["in_rows"] = x_in[keep]
        reconstruction = dictionary(x_in[keep])[0].to(acts.dtype)
        acts = acts.clone()
        acts[keep] = reconstruction
        return acts

    hooks: FwdHooks = [(cfg.hook_out, splice)]
    if cfg.hook_in != cfg.hook_out:
        hooks.insert(0, (cfg.hook_in, read_input))
    return model.run_with_hooks(tokens, fwd_hooks=hooks), captured


def zero_ablated_forward(model: Any, hook_out: str, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Logits with the activation at ``hook_out`` zeroed where ``keep [n_seq, ctx]`` is True."""

    def zero(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        acts = acts.clone()
        acts[keep] = 0
        return acts

    return model.run_with_hooks(tokens, fwd_hooks=[(hook_out, zero)])
