"""Optimisation of one dictionary: loss by architecture, Adam with schedules, constraints, dead latents."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import torch

from ..dictionaries import DictionaryConfig
from . import distributed
from .compiled import COMPILED_ARCHITECTURES, compile_loss, explain_compile_failure
from .config import TrainConfig
from .module import TrainableDictionary
from .objectives import (
    StepOutput,
    batchtopk_loss,
    batchtopk_smallest_kept,
    jumprelu_loss,
    relu_loss,
    topk_loss,
)

__all__ = ["DictionaryTrainer", "learning_rate", "sparsity_coefficient", "add_extra_gradients"]


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warmup over ``lr_warmup_steps``, constant, linear decay to 0 over the last ``lr_decay_fraction``."""
    n_steps = config.n_steps
    factor = 1.0
    if config.lr_warmup_steps > 0:
        factor = min(factor, (step + 1) / config.lr_warmup_steps)
    decay_steps = int(n_steps * config.lr_decay_fraction)
    if decay_steps > 0 and step >= n_steps - decay_steps:
        factor = min(factor, (n_steps - step) / decay_steps)
    return config.lr * factor


def sparsity_coefficient(base: float, config: TrainConfig, step: int) -> float:
    if config.sparsity_warmup_steps <= 0:
        return base
    return base * min(1.0, (step + 1) / config.sparsity_warmup_steps)


def optimizer_step(optimizer: torch.optim.Optimizer, module: Any, unit_norm_decoder: bool) -> None:
    """One optimizer step; a unit-norm decoder loses the gradient along each of its rows first and is
    renormalised after, so that its rows stay on the sphere."""
    if unit_norm_decoder:
        module.remove_parallel_decoder_grad()
    optimizer.step()
    if unit_norm_decoder:
        module.normalise_decoder()


@torch.no_grad()
def add_extra_gradients(trainer: Any) -> None:
    """Add (then drop) ``trainer.extra_gradients``, one per parameter in ``module.parameters()`` order (the
    end-to-end KL term, see ``kl_objective``), to the gradients of the step's own loss."""
    extra, trainer.extra_gradients = trainer.extra_gradients, None
    if extra is None:
        return
    for parameter, grad in zip(trainer.module.parameters(), extra, strict=True):
        if grad is None:
            continue
        if parameter.grad is None:
            parameter.grad = grad.clone()
        else:
            parameter.grad += grad


@torch.no_grad()
def record_firing(tokens_since_fired: torch.Tensor, fire_totals: torch.Tensor, fire_counts: torch.Tensor,
                  local_rows: int, synced: bool) -> None:
    """Count a step's rows (every rank's when ``synced``) towards each latent's time since it last fired,
    reset where it fired, and add its ``fire_counts`` (the shape of ``tokens_since_fired``) to the totals."""
    rows = local_rows * (distributed.world_size() if synced else 1)
    tokens_since_fired.add_(rows).masked_fill_(fire_counts > 0, 0)
    fire_totals += fire_counts


class DictionaryTrainer:
    """Owns one ``TrainableDictionary``, its optimiser and its running statistics.

    ``sync_gradients``: average gradients over data-parallel ranks (off when dictionaries are
    distributed across ranks, each then seeing whole batches).
    """

    def __init__(self, config: TrainConfig, dict_cfg: DictionaryConfig, device: torch.device,
                 sync_gradients: bool = False) -> None:
        self.config, self.dict_cfg, self.device = config, dict_cfg, device
        self.sync_gradients = sync_gradients
        self.unit_norm_decoder = (
            config.architecture != "relu" if config.unit_norm_decoder is None else config.unit_norm_decoder
        )
        self.module = TrainableDictionary(dict_cfg, device=device, init_threshold=config.jumprelu_init_threshold,
                                          init_scale=config.init_scale, unit_norm_decoder=self.unit_norm_decoder)
        if self.unit_norm_decoder:
            self.module.normalise_decoder()
        params = [p for p in self.module.parameters()]
        fused = device.type in ("cpu", "cuda") and all(p.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                                       for p in params)
        # The fused Adam is ~7x faster than the per-tensor loop on CPU for 10M+ parameters.
        self.optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas, fused=fused)
        d_sae = dict_cfg.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.k_aux = config.auxk_k or max(1, dict_cfg.d_in // 2)
        self._loss_fn = self._make_loss()
        self.extra_gradients: list[torch.Tensor | None] | None = None  # set for one step by kl_objective
        self.reset_running()

    def _make_loss(self):
        c, arch = self.config, self.config.architecture
        prefixes = tuple(c.matryoshka_prefixes)  # ints: TrainConfig coerces them
        if prefixes and prefixes[-1] >= self.module.W_dec.shape[0]:
            raise ValueError(f"matryoshka_prefixes={list(prefixes)} must stay below d_sae={self.module.W_dec.shape[0]} "
                             "(the full dictionary is always fitted too).")
        if arch == "topk":
            fn = lambda m, x, xr, t, dead, step: topk_loss(  # noqa: E731
                m, x, xr, t, c.k, dead, self.k_aux, c.auxk_coefficient, prefixes)
        elif arch == "batchtopk":
            fn = lambda m, x, xr, t, dead, step: batchtopk_loss(  # noqa: E731
                m, x, xr, t, c.k, dead, self.k_aux, c.auxk_coefficient, c.batchtopk_threshold_momentum, prefixes)
        else:
            # The coefficient goes in as a 0-d tensor refilled each step: a compiled loss would otherwise
            # recompile for every value it takes during the sparsity warmup.
            base = c.l1_coefficient if arch == "relu" else c.l0_coefficient
            coefficient = torch.zeros((), device=self.device)
            loss = relu_loss if arch == "relu" else jumprelu_loss
            extra = () if arch == "relu" else (c.jumprelu_bandwidth,)
            if c.compile:
                loss = compile_loss(loss, c.compile_backend)

            def fn(m, x, xr, t, dead, step):
                return loss(m, x, xr, t, coefficient.fill_(sparsity_coefficient(base, c, step)), *extra, prefixes)
        return fn

    def _compile_guard(self):
        if self.config.compile and self.config.architecture in COMPILED_ARCHITECTURES:
            return explain_compile_failure(self.config.compile_backend, self.config.architecture)
        return nullcontext()

    # -- initialisation --------------------------------------------------------------------------

    @torch.no_grad()
    def initialise(self, x_in: torch.Tensor, target: torch.Tensor) -> None:
        """Norm scale and ``b_dec`` from the first (global) batch ``x_in [batch, d_in]``, ``target [batch, d_out]``."""
        if self.config.normalize_activations:
            mean_norm = x_in.float().norm(dim=-1).mean().item()
            # Inputs scaled to mean norm sqrt(d_in): coefficients then transfer across models and hooks.
            self.module.norm_scale = math.sqrt(x_in.shape[-1]) / max(mean_norm, 1e-12)
            target_norm = target.float().norm(dim=-1).mean().item()
            self.module.target_scale = math.sqrt(target.shape[-1]) / max(target_norm, 1e-12)
        module = self.module
        module.initialise_from(x_in * module.norm_scale, target * module.target_scale,
                               self.config.init_b_dec_geometric_median)

    # -- one step --------------------------------------------------------------------------------

    def train_step(self, x_in: torch.Tensor, target: torch.Tensor, step: int) -> StepOutput:
        """One optimiser step on ``x_in [batch, d_in]`` -> ``target [batch, d_out]`` (raw activations)."""
        module, config = self.module, self.config
        scale = module.norm_scale
        x_raw = x_in * scale
        target = target * module.target_scale
        x = x_raw - module.b_dec if self.dict_cfg.apply_b_dec_to_input else x_raw
        dead = self.tokens_since_fired > config.dead_after_tokens
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if config.autocast and self.device.type == "cuda" else nullcontext()
        )
        with self._compile_guard():
            with autocast:
                out = self._loss_fn(module, x, x_raw, target, dead, step)
            # Dropping the gradients lets backward assign its fresh ones instead of zero-filling and adding
            # into them; the data-parallel all-reduce needs every rank to hold the same gradient tensors.
            self.optimizer.zero_grad(set_to_none=not self.sync_gradients)
            out.loss.backward()
        add_extra_gradients(self)
        fire_counts = out.fire_counts
        if self.sync_gradients:
            distributed.average_gradients(module.parameters())
            fire_counts = distributed.sum_(fire_counts.clone())
            if self.config.architecture == "batchtopk":
                distributed.average_(module.threshold)
        optimizer_step(self.optimizer, module, self.unit_norm_decoder)
        with torch.no_grad():
            record_firing(self.tokens_since_fired, self._fire_counts, fire_counts, x_in.shape[0], self.sync_gradients)
            error = (out.reconstruction.float() - target.float()).pow(2).sum()
            variance = (target.float() - target.float().mean(0)).pow(2).sum()
            self._running += torch.stack([error, variance, out.l0 * x_in.shape[0], out.aux_loss,
                                          torch.tensor(float(x_in.shape[0]), device=self.device),
                                          torch.ones((), device=self.device)])
        return out

    # -- BatchTopK inference threshold ----------------------------------------------------------

    def batchtopk_threshold_sample(self, x_in: torch.Tensor) -> torch.Tensor:
        """``[2]``: (smallest activation a BatchTopK selection keeps on ``x_in [batch, d_in]`` with the current
        weights, 1), or zeros when it keeps nothing positive; sum these over batches for ``set_threshold``."""
        module = self.module
        x_raw = x_in * module.norm_scale
        x = x_raw - module.b_dec if self.dict_cfg.apply_b_dec_to_input else x_raw
        return batchtopk_smallest_kept(module, x, self.config.k)

    @torch.no_grad()
    def set_threshold(self, summed_samples: torch.Tensor) -> None:
        """Inference threshold = mean of ``batchtopk_threshold_sample`` over batches (and ranks).

        A threshold at the average smallest kept activation keeps ~``k`` latents per token on data like the
        batches', i.e. it is the JumpReLU that best imitates the batch selection of the final weights.
        """
        summed = summed_samples.clone()
        if self.sync_gradients:
            distributed.sum_(summed)
        if summed[1] > 0:
            self.module.threshold.copy_(summed[0] / summed[1])

    def reset_running(self) -> None:
        self._running = torch.zeros(6, device=self.device)
        self._fire_counts = torch.zeros(self.dict_cfg.d_sae, dtype=torch.long, device=self.device)

    def running_metrics(self) -> dict[str, float]:
        """Training metrics since the last call (FVU, L0, dead/dense fractions), reduced over ranks."""
        running = self._running.clone()
        if self.sync_gradients:
            distributed.sum_(running)
        error, variance, l0_sum, aux_sum, rows, n_steps = running.tolist()
        # Fire counts are summed over ranks every step and rows over ranks just above: both global.
        dense = (self._fire_counts.float() / max(rows, 1) > 0.1).float().mean().item()
        self.reset_running()
        dead = (self.tokens_since_fired > self.config.dead_after_tokens).float().mean().item()
        return {
            "fvu": error / max(variance, 1e-12),
            "mse": error / max(rows, 1) / self.dict_cfg.d_out / self.module.target_scale**2,
            "l0": l0_sum / max(rows, 1),
            "dead_fraction": dead,
            "dense_fraction": dense,
            "aux_loss": aux_sum / max(n_steps, 1),
        }

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "norm_scale": self.module.norm_scale,
            "target_scale": self.module.target_scale,
            "optimizer": self.optimizer.state_dict(),
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "running": self._running.clone(),
            "fire_counts": self._fire_counts.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.module.norm_scale = float(state["norm_scale"])
        self.module.target_scale = float(state["target_scale"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self._running.copy_(state["running"])
        self._fire_counts.copy_(state["fire_counts"])
