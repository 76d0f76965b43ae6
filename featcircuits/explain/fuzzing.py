"""Fuzzing scores: does a label say *which tokens* in a context the feature fires on?

EleutherAI's delphi scores an explanation two ways. Detection (:func:`featcircuits.explain.detection_score`)
asks whether a context activates the feature at all. Fuzzing shows the scorer held-out activating contexts
with some tokens highlighted: either the tokens the feature fires on (correctly highlighted) or as many
tokens it does not fire on, drawn at random from the same contexts (wrongly highlighted); given the label,
the scorer says whether the highlighting matches it. The score is the balanced accuracy over the two kinds
(mean of the rates at which each is told right): 1 for a label that pins the tokens down, 0.5 for one that
does not.

The offline scorer reads the label as "the feature fires on these tokens" and says a highlighting matches
when at least half the highlighted tokens are among them; the language-model scorer
(:func:`featcircuits.explain.explainer.llm_fuzzing_score`) is shown the same examples as text.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FuzzingExamples", "fuzzing_examples", "fuzzing_score"]


@dataclass
class FuzzingExamples:
    """Held-out activating contexts with two highlightings each.

    ``rows [m]``: which held-out rows; ``correct [m, seq_len]``: the positions the feature fires on;
    ``wrong [m, seq_len]``: as many positions per row where it does not fire, drawn at random."""

    rows: torch.Tensor
    correct: torch.Tensor
    wrong: torch.Tensor


def _special_mask(tokens: torch.Tensor, special: Sequence[int]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(list(special), dtype=tokens.dtype, device=tokens.device))


def fuzzing_examples(tokens: torch.Tensor, acts: torch.Tensor, special: Sequence[int] = (), seed: int = 0,
                     max_rows: int | None = None) -> FuzzingExamples:
    """The examples of :func:`fuzzing_score` (shared with the language-model scorer, so both see the same).

    Args:
        tokens: held-out token ids ``[n_seq, seq_len]``.
        acts: the feature's activations there, same shape.
        special: token ids never highlighted (BOS and the like: no dictionary was trained on them).
        seed: for the wrong highlights.
        max_rows: keep at most this many activating rows (the first ones).

    Rows where the feature fires everywhere (nothing to highlight wrongly) are left out.
    """
    if tokens.ndim != 2 or tokens.shape != acts.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and acts {tuple(acts.shape)} must both be [n_seq, seq_len].")
    allowed = ~_special_mask(tokens, special)
    active = (acts > 0) & allowed
    eligible = ~active & allowed
    n_active, n_eligible = active.sum(1), eligible.sum(1)
    rows = ((n_active > 0) & (n_eligible > 0)).nonzero().squeeze(1)
    if max_rows is not None:
        rows = rows[:max_rows]
    correct, eligible = active[rows], eligible[rows]
    # as many wrong positions as right ones (fewer where the row has fewer to spare), uniformly among the
    # eligible: rank random keys, ineligible positions last
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(correct.shape, generator=generator).to(correct.device).masked_fill(~eligible, 2.0)
    ranks = keys.argsort(1).argsort(1)
    wrong = ranks < n_active[rows].minimum(n_eligible[rows]).unsqueeze(1)
    return FuzzingExamples(rows=rows, correct=correct, wrong=wrong & eligible)


def fuzzing_score(triggers: Sequence[int], tokens: torch.Tensor, acts: torch.Tensor, special: Sequence[int] = (),
                  seed: int = 0) -> float:
    """Balanced accuracy of the offline scorer on :func:`fuzzing_examples`: a highlighting matches the label when
    at least half its tokens are among ``triggers`` (the label's token ids). NaN when the held-out text has no
    activating row to make examples from."""
    examples = fuzzing_examples(tokens, acts, special, seed)
    if len(examples.rows) == 0:
        return float("nan")
    named = torch.isin(tokens[examples.rows], torch.tensor(list(triggers), dtype=tokens.dtype, device=tokens.device))

    def says_match(highlight: torch.Tensor) -> torch.Tensor:  # [m] bool
        return 2 * (highlight & named).sum(1) >= highlight.sum(1)

    true_positive = float(says_match(examples.correct).float().mean())
    true_negative = float((~says_match(examples.wrong)).float().mean())
    score = 0.5 * (true_positive + true_negative)
    return score if math.isfinite(score) else float("nan")
