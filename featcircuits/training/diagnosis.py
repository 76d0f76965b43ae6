"""The end of a run tells the truth: every dictionary whose quality is poor is named with what to change.

A dictionary is poor when, on the held-out rows (the training FVU where the run had no model to evaluate
with):

- its FVU (fraction of variance unexplained) is above ``POOR_FVU``: it explains less than 70% of its target;
- its CE loss recovered is below ``POOR_CE_RECOVERED``: spliced in, it costs the model more than a fifth of
  what zero-ablating the site costs (circuits built on it are then mostly error nodes);
- its dead fraction (latents silent for ``dead_after_tokens``) is above ``POOR_DEAD_FRACTION``.

What to change follows from the run itself: a training FVU still falling by more than ``STILL_IMPROVING``
(relative) over the second half of the run, or fewer than ``MIN_STEPS`` steps, asks for more tokens; a
learning rate more than ``LR_FACTOR`` away from the width default (``defaults.default_lr``) asks for that
one; dead latents ask for a lower rate or more auxiliary loss; a run that had converged asks for more
latents or a larger k (a weaker sparsity penalty for ReLU / JumpReLU).
"""

from __future__ import annotations

import math
from typing import Any

from .defaults import default_lr

__all__ = ["diagnose", "format_diagnosis", "fvu_drop", "THRESHOLDS"]

POOR_FVU = 0.3
POOR_CE_RECOVERED = 0.8
POOR_DEAD_FRACTION = 0.1
STILL_IMPROVING = 0.05
MIN_STEPS = 200
LR_FACTOR = 3.0
THRESHOLDS = {"fvu_above": POOR_FVU, "ce_loss_recovered_below": POOR_CE_RECOVERED,
              "dead_fraction_above": POOR_DEAD_FRACTION, "still_improving_fvu_drop": STILL_IMPROVING,
              "min_steps": MIN_STEPS, "lr_factor": LR_FACTOR}


def fvu_drop(history: list[dict[str, Any]], name: str, n_steps: int) -> float | None:
    """Relative fall of the training FVU of ``name`` over the second half of the run (None: too few logs).

    A record's FVU is the mean over the steps since the previous record, so only records whose whole
    interval lies in the second half count.
    """
    points, previous = [], 0
    for record in history:
        if f"{name}/fvu" in record and previous >= n_steps / 2:
            points.append((record["step"], record[f"{name}/fvu"]))
        previous = record["step"]
    if len(points) < 2 or not points[0][1] > 0:
        return None
    return (points[0][1] - points[-1][1]) / points[0][1]


def _value(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def diagnose(metrics: dict[str, Any], *, lr: float, d_sae: int, k: int, architecture: str, steps: int,
             total_tokens: int, drop: float | None, batch_size: int = 256) -> dict[str, list[str]] | None:
    """``{"problems": [...], "advice": [...]}`` for a poor dictionary, None for one that is not.

    ``metrics``: its final metrics (``fvu``, ``ce_loss_recovered``, ``dead_fraction``); ``drop``: ``fvu_drop``.
    """
    fvu, ce, dead = (_value(metrics, key) for key in ("fvu", "ce_loss_recovered", "dead_fraction"))
    problems = []
    if fvu is not None and fvu > POOR_FVU:
        problems.append(f"FVU {fvu:.3f} > {POOR_FVU}")
    if ce is not None and ce < POOR_CE_RECOVERED:
        problems.append(f"CE loss recovered {ce:.3f} < {POOR_CE_RECOVERED}")
    if dead is not None and dead > POOR_DEAD_FRACTION:
        problems.append(f"dead fraction {dead:.3f} > {POOR_DEAD_FRACTION}")
    if not problems:
        return None
    advice = []
    improving = drop is not None and drop > STILL_IMPROVING
    if improving or steps < MIN_STEPS:
        why = (f"its training FVU fell {100 * drop:.0f}% over the second half of the run" if improving
               else f"{steps} steps are too few to converge")
        advice.append(f"train on more tokens (e.g. --tokens {4 * total_tokens}): {why}")
    reference = default_lr(d_sae, batch_size)
    if dead is not None and dead > POOR_DEAD_FRACTION:
        advice.append(f"revive dead latents: a lower learning rate (e.g. --lr {lr / 2:.2g}), a larger "
                      "auxk_coefficient, or fewer latents")
    elif lr > LR_FACTOR * reference or lr < reference / LR_FACTOR:
        advice.append(f"try the width default learning rate {reference:.2g} (leave lr unset) instead of {lr:.2g}")
    if not improving and steps >= MIN_STEPS and not (dead is not None and dead > POOR_DEAD_FRACTION):
        if architecture in ("topk", "batchtopk"):
            advice.append(f"the run has converged at this size: more latents (e.g. --d-sae {2 * d_sae}) or a larger "
                          f"k (e.g. --k {2 * k})")
        else:
            advice.append(f"the run has converged at this size: more latents (e.g. --d-sae {2 * d_sae}) or a weaker "
                          "sparsity coefficient")
    return {"problems": problems, "advice": advice}


def format_diagnosis(diagnosis: dict[str, dict[str, list[str]]]) -> str:
    """One line per poor dictionary: its name, what is poor, what to change."""
    return "\n".join(f"featcircuits train: dictionary {name} is poor ({', '.join(d['problems'])}): "
                     f"{'; '.join(d['advice'])}." for name, d in diagnosis.items())
