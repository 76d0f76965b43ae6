"""Training defaults that scale with the run: batch size from the token budget, learning rate from the
dictionary width, warm-up from the number of steps.

``TrainConfig`` marks a value to be chosen here with ``batch_size=0``, ``lr=0`` and ``lr_warmup_steps=-1``
(its defaults); a run records the values it chose in ``config.json``.

- Learning rate: Gao et al. 2024 ("Scaling and evaluating sparse autoencoders") fit the best Adam learning
  rate of TopK autoencoders falling as the inverse square root of the number of latents; sparsify uses
  ``2e-4 / sqrt(num_latents / 2**14)``. Those fits are for runs of billions of tokens; a short run takes
  fewer, noisier steps and is best served by a larger rate. ``default_lr`` keeps the width law and scales
  it by ``LR_SCALE`` at a 256-token batch and by the square root of the batch beyond (Malladi et al. 2022's
  square-root rule for Adam: a batch k times larger averages away k times the gradient variance). On the
  sweeps of ``benchmarks/train_defaults.py`` (stories260k, TopK k 8, 512 latents, lr 5e-4 to 3.2e-2) the best
  rate rose from 1.6e-2 at 300k tokens (batch 256) to 3.2e-2 or more at 2M tokens (batch 2048); without the
  batch factor the 2M default ended 12% above the sweep's best FVU.
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


def default_lr(d_sae: int, batch_size: int = MIN_BATCH) -> float:
    """Adam learning rate for ``d_sae`` latents and ``batch_size`` tokens per step:
    ``LR_SCALE * 2e-4 / sqrt(d_sae / 2**14) * sqrt(batch_size / 256)`` (Adam's square-root batch rule)."""
    return LR_SCALE * LR_REFERENCE / math.sqrt(max(d_sae, 1) / 2**14) * math.sqrt(max(batch_size, 1) / MIN_BATCH)


def default_warmup_steps(n_steps: int) -> int:
    """Linear warm-up steps: ``WARMUP_FRACTION`` of ``n_steps``, at least 1, at most ``MAX_WARMUP_STEPS``."""
    return int(min(MAX_WARMUP_STEPS, max(1, round(WARMUP_FRACTION * n_steps))))
