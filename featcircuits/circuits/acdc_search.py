"""ACDC (Conmy et al. 2023) over any set of patchable units (edges or nodes), batched speculatively.

ACDC walks units in reverse topological order and removes a unit when removing it (on top of everything
removed so far) changes the metric by less than ``tau``. Each decision depends on the previous ones, so
a literal implementation runs one forward per unit. Here one forward evaluates a *chain* of hypotheses:
copy ``j`` of the batch tries removing unit ``j`` of the remaining order on top of the state the
earlier units' guessed decisions lead to (guess: removed, or an attribution-based prediction). Decisions
are read off the chain in order; the chain is exact up to the first wrong guess, and the walk resumes
after it. The result is the one-forward-per-unit walk's circuit, with about
``wrong guesses + units / batch`` forwards. The copies after a wrong guess are not wasted: each measured
its unit's effect in a state one decision away from the true one, and those measurements replace the
guesses for the next chain (attribution scores alone mispredict many units where effects are small and
not additive, e.g. feature nodes at a small tau).

When the units are edges, an edge into a node with no kept outgoing edge is removed without a forward:
everything downstream already reads that node's ablated value, so the edge cannot change the metric
(the literal walk measures a float-rounding change and removes it too). In reverse topological order a
node's outgoing edges are all decided before its incoming ones, so every edge into a node that left the
circuit is decided for free. With ``tau = 0`` the literal walk keeps even a rounding-level change, so the
rule is off there.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

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


class _Downstream:
    """Kept outgoing edges per node, to tell which edges lead into nodes that left the circuit."""

    def __init__(self, edges: Sequence[tuple[Hashable, Hashable]], keep: torch.Tensor) -> None:
        index: dict[Hashable, int] = {}
        for sender, receiver in edges:
            index.setdefault(sender, len(index))
            index.setdefault(receiver, len(index))
        self.sender = [index[sender] for sender, _ in edges]
        self.receiver = [index[receiver] for _, receiver in edges]
        # sinks (the logits, and nodes no candidate edge leaves) feed nothing downstream and never leave
        self.is_sink = [True] * len(index)
        self.kept_out = [0] * len(index)
        for sender, kept in zip(self.sender, keep.tolist(), strict=True):  # lists: no tensor per unit
            self.is_sink[sender] = False
            self.kept_out[sender] += int(kept)

    def leads_nowhere(self, unit: int, kept_out: list[int]) -> bool:
        receiver = self.receiver[unit]
        return not self.is_sink[receiver] and kept_out[receiver] == 0

    def remove(self, unit: int, kept_out: list[int]) -> None:
        kept_out[self.sender[unit]] -= 1


def acdc(
    evaluate: Callable[[torch.Tensor], torch.Tensor],
    order: Sequence[int],
    n_units: int,
    tau: float,
    batch_size: int = 64,
    initial_keep: torch.Tensor | None = None,
    reference_gap: float | None = None,
    predicted_keep: torch.Tensor | None = None,
    edges: Sequence[tuple[Hashable, Hashable]] | None = None,
    progress: bool = False,
    unit_name: str = "unit",
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
        edges: ``(sender, receiver)`` of each unit when the units are edges: edges into nodes without
            kept outgoing edges are then removed without a forward (score 0). Nodes that are never a
            sender (the logits) always stay.
    """
    check_tau(tau)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; the chain needs at least 1 pattern per forward.")
    if edges is not None and len(edges) != n_units:
        raise ValueError(f"edges has {len(edges)} (sender, receiver) pairs for {n_units} units; give one pair "
                         "per unit, in unit order.")
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
    guess = torch.zeros(n_units, dtype=torch.bool) if predicted_keep is None else predicted_keep.bool().cpu().clone()
    # a zero threshold keeps rounding-level changes, which the free rule would remove
    downstream = _Downstream(edges, keep) if edges is not None and threshold > 0 else None
    kept = keep.tolist()  # a list: indexing a tensor per unit costs a tensor per unit
    remaining = [unit for unit in order if kept[unit]]
    start = 0  # remaining[start:] are undecided (an index, not a slice: slicing a long list per chain is quadratic)
    bar = tqdm(total=len(remaining), desc=f"ACDC over {len(remaining)} {unit_name}s, batch {batch_size}",
               unit=unit_name, disable=not progress)
    while start < len(remaining):
        # The chain: up to batch_size units to evaluate, with the free ones (edges leading nowhere under
        # the guessed decisions before them) interleaved; their removal too is conditional on the guesses.
        chain, free, n_tried = [], [], 0
        kept_out = list(downstream.kept_out) if downstream is not None else []
        for unit in itertools.islice(remaining, start, None):
            is_free = downstream is not None and downstream.leads_nowhere(unit, kept_out)
            if not is_free:
                if n_tried == batch_size:
                    break
                n_tried += 1
            chain.append(unit)
            free.append(is_free)
            if downstream is not None and (is_free or not guess[unit]):
                downstream.remove(unit, kept_out)
        chain_t = torch.tensor(chain)
        free_t = torch.tensor(free, dtype=torch.bool)
        tried = (~free_t).nonzero()[:, 0]
        if len(tried):
            # The chain's state before unit j removes every earlier chain unit guessed removed (free units
            # are); copy j tries removing unit j on top of it.
            guessed_removed = (free_t | ~guess[chain_t]).float()
            removed_before = torch.tril(torch.ones(len(chain), len(chain)), diagonal=-1) * guessed_removed
            masks = keep.float().repeat(len(tried), 1)
            masks[:, chain_t] = 1.0 - removed_before[tried] - torch.eye(len(chain))[tried]
            values = evaluate(masks).detach().float().cpu().tolist()
            forwards += 1
        # each copy's change in the guessed chain's state; up to the first wrong guess that state is the true
        # one, so these are also the changes the decisions below read
        guessed_change, base = [], current
        for unit in chain_t[tried].tolist():
            value = values[len(guessed_change)]
            guessed_change.append(abs(value - base))
            if not guess[unit]:
                base = value
        decided, copy = len(chain), 0
        for j, unit in enumerate(chain):
            if free[j]:
                keep[unit] = False
                scores[unit] = 0.0
                assert downstream is not None  # a unit is free only under the downstream rule
                downstream.remove(unit, downstream.kept_out)
                continue
            change = guessed_change[copy]
            copy += 1
            scores[unit] = change
            remove = change < threshold
            if remove:
                keep[unit] = False
                current = values[copy - 1]
                if downstream is not None:
                    downstream.remove(unit, downstream.kept_out)
            if remove == bool(guess[unit]):
                # mispredicted: later copies assumed the other decision, so they are discarded as decisions;
                # but each measured its unit in a state one decision away from the true one, which predicts
                # the next chain far better than attribution scores do
                decided = j + 1
                later = [u for u, is_free in zip(chain[decided:], free[decided:], strict=True) if not is_free]
                for later_unit, measured in zip(later, guessed_change[copy:], strict=True):
                    guess[later_unit] = measured >= threshold
                break
        start += decided
        bar.update(decided)
        bar.set_postfix(forwards=forwards, refresh=False)
    bar.close()
    return AcdcResult(keep=keep, scores=scores, forwards=forwards, threshold=threshold)
