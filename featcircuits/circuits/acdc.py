"""ACDC (Conmy et al. 2023) over any set of patchable units (edges or nodes), batched speculatively.

ACDC walks units in reverse topological order and removes a unit when removing it (on top of everything
removed so far) changes the metric by less than ``tau``. Each decision depends on the previous ones, so
a literal implementation runs one forward per unit. Here one forward evaluates a *chain* of hypotheses:
copy ``j`` of the batch tries removing unit ``j`` of the remaining order on top of the state the
earlier units' guessed decisions lead to (guess: removed, or an attribution-based prediction). Decisions
are read off the chain in order; the chain is exact up to the first wrong guess, and the walk resumes
after it. The result is the one-forward-per-unit walk's circuit, with about
``wrong guesses + units / batch`` forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["acdc", "AcdcResult", "check_tau"]


@dataclass
class AcdcResult:
    keep: torch.Tensor  # [units] bool
    scores: torch.Tensor  # [units] |metric change| measured when the unit was tried (inf if never tried)
    forwards: int
    threshold: float  # tau in metric units


def check_tau(tau: float) -> float:
    tau = float(tau)
    if not 0.0 <= tau <= 1.0 or tau != tau:
        raise ValueError(
            f"tau={tau} is outside [0, 1]; tau is a fraction of the full model's metric gap "
            "|m(model) - m(everything ablated)| (typical values 0.001 to 0.1)."
        )
    return tau


def acdc(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    order: Sequence[int],
    n_units: int,
    tau: float,
    batch_size: int = 64,
    initial_keep: torch.Tensor | None = None,
    reference_gap: float | None = None,
    predicted_keep: torch.Tensor | None = None,
) -> AcdcResult:
    """Run ACDC and return which units survive.

    Args:
        evaluate: ``keep [copies, n_units]`` (1 keeps, 0 ablates) -> metric ``[copies]``; one call is one
            batched forward of ``copies`` ablation patterns.
        order: unit indices in the order to try them (reverse topological).
        n_units: number of units.
        tau: threshold as a fraction of ``reference_gap`` (``|m(all kept) - m(none kept)|``; measured
            here when not given), in ``[0, 1]``.
        batch_size: chain length per forward; ``1`` is the literal one-forward-per-unit ACDC.
        initial_keep: ``[n_units]`` starting mask (units an attribution pre-filter already removed are 0).
        predicted_keep: ``[n_units]`` guesses of the decisions (e.g. from attribution scores); the chain
            follows them, so a forward decides units up to the first wrong guess. Default: all removed.
            Guesses change only the number of forwards, never the result.
    """
    check_tau(tau)
    forwards = 0
    keep = torch.ones(n_units, dtype=torch.bool) if initial_keep is None else initial_keep.clone().bool().cpu()
    if reference_gap is None:
        both = evaluate(torch.stack([torch.ones(n_units), torch.zeros(n_units)]))
        forwards += 1
        reference_gap = float((both[0] - both[1]).abs())
    threshold = tau * reference_gap
    current = float(evaluate(keep.float()[None])[0])
    forwards += 1
    scores = torch.full((n_units,), float("inf"))
    guess = torch.zeros(n_units, dtype=torch.bool) if predicted_keep is None else predicted_keep.bool().cpu()
    remaining = [unit for unit in order if keep[unit]]
    while remaining:
        chain = torch.tensor(remaining[:batch_size])
        # The chain's state before unit j removes every earlier chain unit predicted removed; copy j tries
        # removing unit j on top of it.
        removed_before = torch.tril(torch.ones(len(chain), len(chain)), diagonal=-1) * (~guess[chain]).float()
        masks = keep.float().repeat(len(chain), 1)
        masks[:, chain] = 1.0 - removed_before - torch.eye(len(chain))
        values = evaluate(masks).detach().float().cpu()
        forwards += 1
        decided = len(chain)
        for j in range(len(chain)):
            change = abs(float(values[j]) - current)
            scores[chain[j]] = change
            remove = change < threshold
            if remove:
                keep[chain[j]] = False
                current = float(values[j])
            if remove == bool(guess[chain[j]]):
                # mispredicted: later copies assumed the other decision, so they are discarded
                decided = j + 1
                break
        remaining = remaining[decided:]
    return AcdcResult(keep=keep, scores=scores, forwards=forwards, threshold=threshold)
