"""Training losses, one function per architecture, all returning a ``StepOutput``.

Inputs are norm-scaled: ``x [batch, d_in]`` the encoder input (SAEs: ``x - b_dec`` already applied
by the caller when configured), ``x_raw`` the scaled input before that (for the skip path) and
``target [batch, d_out]``. The reconstruction error term is the squared error summed over features and
averaged over rows; sparsity terms are averaged over rows likewise, so coefficients do not depend on
the batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .module import TrainableDictionary
from .sparse_ops import gathered_pre_acts, sparse_decode

__all__ = ["StepOutput", "topk_loss", "batchtopk_loss", "batchtopk_smallest_kept", "relu_loss", "jumprelu_loss"]


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    recon_loss: torch.Tensor  # scalar: mean over rows of the summed squared error
    reconstruction: torch.Tensor  # [batch, d_out]
    fire_counts: torch.Tensor  # [d_sae] int64: rows on which each latent is active
    l0: torch.Tensor  # scalar: mean active latents per row
    aux_loss: torch.Tensor  # scalar (0 when no dead latents)


def _squared_error(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (reconstruction.float() - target.float()).pow(2).sum(-1).mean()


def _auxk(
    module: TrainableDictionary, x: torch.Tensor, pre: torch.Tensor, residual: torch.Tensor,
    dead: torch.Tensor, k_aux: int,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top ``k_aux`` dead latents reconstruct the residual error, which
    gives dead latents a gradient towards directions the live ones miss."""
    n_dead = int(dead.sum())
    k_aux = min(k_aux, n_dead)
    masked = pre.masked_fill(~dead, float("-inf"))
    _, indices = masked.topk(k_aux, dim=-1, sorted=False)
    values = gathered_pre_acts(x, module.W_enc_t, module.b_enc, indices, pre).relu()
    aux_reconstruction = sparse_decode(indices, values, module.W_dec)
    scale = residual.float().pow(2).sum(-1).mean().clamp_min(1e-8)
    return _squared_error(aux_reconstruction, residual) / scale


def _nested_fit(recon_loss: torch.Tensor, target: torch.Tensor, prefix_reconstruction: Callable[[int], torch.Tensor],
                prefixes: tuple[int, ...]) -> torch.Tensor:
    """The reconstruction term with Matryoshka prefixes: the mean of the full dictionary's error
    ``recon_loss`` and, for each ``m`` in ``prefixes``, the error of ``prefix_reconstruction(m)``
    (``[batch, d_out]``: latents ``0..m`` decoding alone). Without prefixes, ``recon_loss``."""
    if not prefixes:
        return recon_loss
    errors = [_squared_error(prefix_reconstruction(m), target) for m in prefixes]
    return torch.stack([*errors, recon_loss]).mean()


def _dense_prefix(feature_acts: torch.Tensor, module: TrainableDictionary,
                  base: torch.Tensor | float) -> Callable[[int], torch.Tensor]:
    """Prefix reconstructions from dense ``feature_acts [batch, d_sae]`` (``base`` = ``b_dec`` plus the skip)."""
    return lambda m: feature_acts[:, :m] @ module.W_dec[:m] + base


def _skip(module: TrainableDictionary, x_raw: torch.Tensor) -> torch.Tensor | float:
    return x_raw @ module.W_skip if module.W_skip is not None else 0.0


def _encoder_pre_acts_no_grad(module: TrainableDictionary, x: torch.Tensor) -> torch.Tensor:
    """``x @ W_enc + b_enc`` ``[batch, d_sae]`` into a buffer kept on the module and reused every step:
    a fresh [batch, d_sae] allocation per step costs page faults worth ~10% of a CPU TopK step."""
    shape = (x.shape[0], module.W_enc_t.shape[0])
    buffer = getattr(module, "_pre_acts_buffer", None)
    if buffer is None or buffer.shape != shape or buffer.dtype != x.dtype or buffer.device != x.device:
        buffer = torch.empty(shape, dtype=x.dtype, device=x.device)
        module._pre_acts_buffer = buffer
    return torch.addmm(module.b_enc.detach(), x.detach(), module.W_enc_t.detach().t(), out=buffer)


def topk_loss(module, x, x_raw, target, k, dead, k_aux, aux_coefficient, prefixes=()) -> StepOutput:
    with torch.no_grad():
        pre = _encoder_pre_acts_no_grad(module, x)
        _, indices = pre.topk(k, dim=-1, sorted=False)
    values = gathered_pre_acts(x, module.W_enc_t, module.b_enc, indices, pre).relu()
    base = module.b_dec + _skip(module, x_raw)
    reconstruction = sparse_decode(indices, values, module.W_dec) + base
    recon_loss = _squared_error(reconstruction, target)
    # each prefix decodes the kept latents below its size
    fit = _nested_fit(recon_loss, target,
                      lambda m: sparse_decode(indices, values * (indices < m), module.W_dec) + base, prefixes)
    active = values > 0
    fire_counts = torch.bincount(indices[active], minlength=module.W_dec.shape[0])
    aux = torch.zeros((), device=pre.device)
    if aux_coefficient > 0 and dead is not None and bool(dead.any()):
        aux = _auxk(module, x, pre, (target - reconstruction).detach(), dead, k_aux)
    loss = fit + aux_coefficient * aux
    return StepOutput(loss, recon_loss.detach(), reconstruction, fire_counts, active.sum(-1).float().mean(), aux.detach())


def _batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k * batch`` largest rectified pre-activations of ``pre [batch, d_sae]``: ``(values, flat_indices)``."""
    flat = pre.relu().reshape(-1)
    return flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)


def _smallest_kept(values: torch.Tensor) -> torch.Tensor:
    """``[2]``: the smallest positive kept value and 1, or ``[0, 0]`` when the batch kept nothing positive.

    The count lets callers average over batches (and ranks) that kept something without a host sync.
    """
    positive = values > 0
    smallest = values.masked_fill(~positive, float("inf")).min().float()
    has_any = positive.any()
    return torch.stack([torch.where(has_any, smallest, torch.zeros_like(smallest)), has_any.float()])


@torch.no_grad()
def batchtopk_smallest_kept(module: TrainableDictionary, x: torch.Tensor, k: int) -> torch.Tensor:
    """``[2]`` (smallest kept activation, 1) of a BatchTopK selection over ``x [batch, d_in]`` with the
    current weights (see ``_smallest_kept``): one sample for calibrating the inference threshold."""
    values, _ = _batch_topk(torch.addmm(module.b_enc, x, module.W_enc_t.t()), k)
    return _smallest_kept(values)


def batchtopk_loss(module, x, x_raw, target, k, dead, k_aux, aux_coefficient, momentum, prefixes=()) -> StepOutput:
    pre = torch.addmm(module.b_enc, x, module.W_enc_t.t())
    values, flat_indices = _batch_topk(pre, k)
    feature_acts = torch.zeros_like(pre).reshape(-1).scatter(0, flat_indices, values).reshape(pre.shape)
    base = module.b_dec + _skip(module, x_raw)
    reconstruction = feature_acts @ module.W_dec + base
    recon_loss = _squared_error(reconstruction, target)
    fit = _nested_fit(recon_loss, target, _dense_prefix(feature_acts, module, base), prefixes)
    active = feature_acts > 0
    with torch.no_grad():
        # Running estimate of the inference threshold: an exponential average of the smallest activation
        # each batch kept (Bussmann et al. 2024). It lags the weights by ~1/(1-momentum) steps, so it only
        # serves mid-training evaluation; the Trainer recalibrates it with the final weights at the end.
        smallest, kept_any = _smallest_kept(values)
        # The first batch sets the estimate; an average that started at 0 would stay biased low for ~1/(1-m) steps.
        estimate = momentum * module.threshold + (1 - momentum) * smallest
        updated = torch.where(module.threshold == 0, smallest, estimate)
        module.threshold.copy_(torch.where(kept_any > 0, updated, module.threshold))
    aux = torch.zeros((), device=pre.device)
    if aux_coefficient > 0 and dead is not None and bool(dead.any()):
        aux = _auxk(module, x, pre.detach(), (target - reconstruction).detach(), dead, k_aux)
    loss = fit + aux_coefficient * aux
    return StepOutput(loss, recon_loss.detach(), reconstruction, active.sum(0), active.sum(-1).float().mean(),
                      aux.detach())


def relu_loss(module, x, x_raw, target, l1_coefficient, prefixes=()) -> StepOutput:
    feature_acts = torch.addmm(module.b_enc, x, module.W_enc_t.t()).relu()
    base = module.b_dec + _skip(module, x_raw)
    reconstruction = feature_acts @ module.W_dec + base
    recon_loss = _squared_error(reconstruction, target)
    # Weighting by decoder norms stops the optimiser from shrinking activations and growing decoders.
    # Summing over the batch first avoids a [batch, d_sae] product (and its backward); same value.
    l1 = (feature_acts.sum(0) * module.W_dec.norm(dim=-1)).sum() / feature_acts.shape[0]
    fire_counts = (feature_acts > 0).sum(0)
    loss = _nested_fit(recon_loss, target, _dense_prefix(feature_acts, module, base), prefixes) + l1_coefficient * l1
    return StepOutput(loss, recon_loss.detach(), reconstruction, fire_counts,
                      fire_counts.sum().float() / feature_acts.shape[0], torch.zeros((), device=x.device))


class _JumpReLU(torch.autograd.Function):
    """``pre * [pre > theta]`` with a rectangle-kernel straight-through gradient for ``theta``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        in_window = ((pre - threshold).abs() < bandwidth / 2).to(grad.dtype)
        grad_threshold = (-(threshold / bandwidth) * in_window * grad).sum(0)
        return grad * (pre > threshold), grad_threshold, None


class _Step(torch.autograd.Function):
    """Heaviside ``[pre > theta]`` whose threshold gradient is the same straight-through estimate."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):  # type: ignore[override]
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        in_window = ((pre - threshold).abs() < bandwidth / 2).to(grad.dtype)
        return None, (-(1.0 / bandwidth) * in_window * grad).sum(0), None


def jumprelu_loss(module, x, x_raw, target, l0_coefficient, bandwidth, prefixes=()) -> StepOutput:
    pre = torch.addmm(module.b_enc, x, module.W_enc_t.t())
    threshold = module.log_threshold.exp()
    feature_acts = _JumpReLU.apply(pre, threshold, bandwidth)
    base = module.b_dec + _skip(module, x_raw)
    reconstruction = feature_acts @ module.W_dec + base
    recon_loss = _squared_error(reconstruction, target)
    l0 = _Step.apply(pre, threshold, bandwidth).sum(-1).mean()
    active = feature_acts > 0
    loss = _nested_fit(recon_loss, target, _dense_prefix(feature_acts, module, base), prefixes) + l0_coefficient * l0
    return StepOutput(loss, recon_loss.detach(), reconstruction, active.sum(0), active.sum(-1).float().mean(),
                      torch.zeros((), device=x.device))
