"""Training losses, one function per architecture, all returning a ``StepOutput``.

Inputs are norm-scaled: ``x [batch, d_in]`` the encoder input (SAEs: ``x - b_dec`` already applied
by the caller when configured), ``x_raw`` the scaled input before that (for the skip path) and
``target [batch, d_out]``. The reconstruction error term is the squared error summed over features and
averaged over rows; sparsity terms are averaged over rows likewise, so coefficients do not depend on
the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .module import TrainableDictionary
from .sparse_ops import gathered_pre_acts, sparse_decode

__all__ = ["StepOutput", "topk_loss", "batchtopk_loss", "relu_loss", "jumprelu_loss"]


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


def topk_loss(module, x, x_raw, target, k, dead, k_aux, aux_coefficient) -> StepOutput:
    with torch.no_grad():
        pre = _encoder_pre_acts_no_grad(module, x)
        _, indices = pre.topk(k, dim=-1, sorted=False)
    values = gathered_pre_acts(x, module.W_enc_t, module.b_enc, indices, pre).relu()
    reconstruction = sparse_decode(indices, values, module.W_dec) + module.b_dec + _skip(module, x_raw)
    recon_loss = _squared_error(reconstruction, target)
    active = values > 0
    fire_counts = torch.bincount(indices[active], minlength=module.W_dec.shape[0])
    aux = torch.zeros((), device=pre.device)
    if aux_coefficient > 0 and dead is not None and bool(dead.any()):
        aux = _auxk(module, x, pre, (target - reconstruction).detach(), dead, k_aux)
    loss = recon_loss + aux_coefficient * aux
    return StepOutput(loss, recon_loss.detach(), reconstruction, fire_counts, active.sum(-1).float().mean(), aux.detach())


def batchtopk_loss(module, x, x_raw, target, k, dead, k_aux, aux_coefficient, momentum) -> StepOutput:
    pre = torch.addmm(module.b_enc, x, module.W_enc_t.t())
    flat = pre.relu().reshape(-1)
    n_keep = min(k * pre.shape[0], flat.numel())
    values, flat_indices = flat.topk(n_keep, sorted=False)
    feature_acts = torch.zeros_like(flat).scatter(0, flat_indices, values).reshape(pre.shape)
    reconstruction = feature_acts @ module.W_dec + module.b_dec + _skip(module, x_raw)
    recon_loss = _squared_error(reconstruction, target)
    active = feature_acts > 0
    with torch.no_grad():
        # Inference threshold: running mean of the smallest activation the batch kept (Bussmann et al.).
        kept = values[values > 0]
        if kept.numel():
            smallest = kept.min().float()
            # The first batch sets the estimate; an average that started at 0 would stay biased low for ~1/(1-m) steps.
            estimate = momentum * module.threshold + (1 - momentum) * smallest
            module.threshold.copy_(torch.where(module.threshold == 0, smallest, estimate))
    aux = torch.zeros((), device=pre.device)
    if aux_coefficient > 0 and dead is not None and bool(dead.any()):
        aux = _auxk(module, x, pre.detach(), (target - reconstruction).detach(), dead, k_aux)
    loss = recon_loss + aux_coefficient * aux
    return StepOutput(loss, recon_loss.detach(), reconstruction, active.sum(0), active.sum(-1).float().mean(),
                      aux.detach())


def relu_loss(module, x, x_raw, target, l1_coefficient) -> StepOutput:
    feature_acts = torch.addmm(module.b_enc, x, module.W_enc_t.t()).relu()
    reconstruction = feature_acts @ module.W_dec + module.b_dec + _skip(module, x_raw)
    recon_loss = _squared_error(reconstruction, target)
    # Weighting by decoder norms stops the optimiser from shrinking activations and growing decoders.
    # Summing over the batch first avoids a [batch, d_sae] product (and its backward); same value.
    l1 = (feature_acts.sum(0) * module.W_dec.norm(dim=-1)).sum() / feature_acts.shape[0]
    fire_counts = (feature_acts > 0).sum(0)
    loss = recon_loss + l1_coefficient * l1
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


def jumprelu_loss(module, x, x_raw, target, l0_coefficient, bandwidth) -> StepOutput:
    pre = torch.addmm(module.b_enc, x, module.W_enc_t.t())
    threshold = module.log_threshold.exp()
    feature_acts = _JumpReLU.apply(pre, threshold, bandwidth)
    reconstruction = feature_acts @ module.W_dec + module.b_dec + _skip(module, x_raw)
    recon_loss = _squared_error(reconstruction, target)
    l0 = _Step.apply(pre, threshold, bandwidth).sum(-1).mean()
    active = feature_acts > 0
    loss = recon_loss + l0_coefficient * l0
    return StepOutput(loss, recon_loss.detach(), reconstruction, active.sum(0), active.sum(-1).float().mean(),
                      torch.zeros((), device=x.device))
