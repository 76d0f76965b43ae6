"""Training defaults that scale with the run: batch size from the token budget, learning rate from the
dictionary width, warm-up from the number of steps.

``TrainConfig`` marks a value to be chosen here with ``batch_size=0``, ``lr=0`` and ``lr_warmup_steps=-1``
(its defaults); a run records the values it chose in ``config.json``.

- Learning rate: Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") fit the best Adam learning
  rate of TopK autoencoders falling as the inverse square root of the number of latents; sparsify uses
  ``2e-4 / sqrt(num_latents / 2**14)``. Those fits are for runs of billions of tokens; a short run takes
  fewer, noisier steps and is best served by a larger rate. ``default_lr`` keeps the width law and scales
  it by ``LR_SCALE``. The sweeps of ``benchmarks/train_defaults.py`` (stories260k, TopK k 8, 512 latents,
  300k and 2M tokens, lr 5e-4 to 8e-3) put the default run's held-out FVU within 6% of the sweep's best at
  both budgets (0.0805 vs 0.0764, 0.0757 vs 0.0714); the best rate was the sweep's largest at both.
- Batch size: a fixed 4096-token batch gives a 300k-token run 73 steps, too few to converge. The default
  aims at ``TARGET_STEPS`` optimiser steps, as a power of two between ``MIN_BATCH`` and ``MAX_BATCH``.
- Warm-up: ``WARMUP_FRACTION`` of the steps, at most ``MAX_WARMUP_STEPS`` (sparsify warms up over 1000).
"""

from __future__ import annotations

import math

__all__ = ["default_batch_size", "default_lr", "default_warmup_steps", "LR_SCALE", "TARGET_STEPS"]

LR_REFERENCE = 2e-4  # sparsify's rate at 2**14 latents
LR_SCALE = 4.0  # short runs: see the module docstring
TARGET_STEPS = 1024
MIN_BATCH, MAX_BATCH = 256, 4096
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 1000


def default_batch_size(total_tokens: int) -> int:
    """Tokens per step: the power of two nearest ``total_tokens / TARGET_STEPS`` within [256, 4096]."""
    if total_tokens <= 0:
        return MAX_BATCH
    exponent = round(math.log2(max(total_tokens / TARGET_STEPS, 1)))
    return int(min(MAX_BATCH, max(MIN_BATCH, 2**exponent)))


def default_lr(d_sae: int) -> float:
    """Adam learning rate for a dictionary of ``d_sae`` latents: ``LR_SCALE * 2e-4 / sqrt(d_sae / 2**14)``."""
    return LR_SCALE * LR_REFERENCE / math.sqrt(max(d_sae, 1) / 2**14)


def default_warmup_steps(n_steps: int) -> int:
    """Linear warm-up steps: ``WARMUP_FRACTION`` of ``n_steps``, at least 1, at most ``MAX_WARMUP_STEPS``."""
    return int(min(MAX_WARMUP_STEPS, max(1, round(WARMUP_FRACTION * n_steps))))
