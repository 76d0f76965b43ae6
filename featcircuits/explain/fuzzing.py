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
    # eligible: rank random keys, ineligible positions last (keys drawn for every row, so that the batched
    # scorer, which draws them once for all features, picks the same positions)
    keys = random_keys(tokens.shape, seed, tokens.device)[rows].masked_fill(~eligible, 2.0)
    ranks = keys.argsort(1).argsort(1)
    wrong = ranks < n_active[rows].minimum(n_eligible[rows]).unsqueeze(1)
    return FuzzingExamples(rows=rows, correct=correct, wrong=wrong & eligible)


def random_keys(shape: torch.Size, seed: int, device: torch.device | str) -> torch.Tensor:
    """Uniform keys ``[n_seq, seq_len]`` ranking the positions a wrong highlight may take."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)).to(device)


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

    n_rows = len(examples.rows)
    true_positive = int(says_match(examples.correct).sum()) / n_rows
    true_negative = int((~says_match(examples.wrong)).sum()) / n_rows
    return 0.5 * (true_positive + true_negative)


def batched_scores(triggers: Sequence[Sequence[int]], tokens: torch.Tensor, acts: torch.Tensor, vocab_size: int,
                   special: Sequence[int] = (), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Detection (:func:`featcircuits.explain.detection_score`) and fuzzing (:func:`fuzzing_score`) scores of many
    features at once, the same numbers as the one-feature functions give.

    Args:
        triggers: per feature, the token ids its label names.
        tokens: held-out token ids ``[n_seq, seq_len]``.
        acts: the features' activations there ``[n_features, n_seq, seq_len]``.
        vocab_size: one more than the largest token id.

    Returns ``(detection [n_features], fuzzing [n_features])``, NaN where a feature cannot be scored.
    """
    n_features = acts.shape[0]
    named_ids = torch.zeros(n_features, vocab_size, dtype=torch.bool, device=tokens.device)
    feature_of = torch.tensor([f for f, ids in enumerate(triggers) for _ in ids], dtype=torch.long)
    token_of = torch.tensor([t for ids in triggers for t in ids], dtype=torch.long)
    named_ids[feature_of.to(tokens.device), token_of.to(tokens.device)] = True
    named = named_ids[:, tokens]  # [n_features, n_seq, seq_len]: the label names the token there
    allowed = ~_special_mask(tokens, special)
    active = (acts > 0) & allowed

    def balanced(positive_right: torch.Tensor, n_positive: torch.Tensor, negative_right: torch.Tensor,
                 n_negative: torch.Tensor) -> torch.Tensor:
        score = 0.5 * (positive_right / n_positive + negative_right / n_negative)
        return torch.where((n_positive > 0) & (n_negative > 0), score, torch.nan)

    dims = (1, 2)
    detection = balanced((named & active).sum(dims).double(), active.sum(dims).double(),
                         (~named & ~active & allowed).sum(dims).double(), (~active & allowed).sum(dims).double())

    eligible = ~active & allowed
    n_active, n_eligible = active.sum(-1), eligible.sum(-1)  # [n_features, n_seq]
    valid = (n_active > 0) & (n_eligible > 0)
    keys = random_keys(tokens.shape, seed, tokens.device).expand_as(acts).masked_fill(~eligible, 2.0)
    wrong = (keys.argsort(-1).argsort(-1) < n_active.minimum(n_eligible).unsqueeze(-1)) & eligible

    def says_match(highlight: torch.Tensor) -> torch.Tensor:  # [n_features, n_seq]
        return 2 * (highlight & named).sum(-1) >= highlight.sum(-1)

    n_valid = valid.sum(1).double()
    fuzzing = balanced((says_match(active) & valid).sum(1).double(), n_valid,
                       (~says_match(wrong) & valid).sum(1).double(), n_valid)
    return detection, fuzzing
