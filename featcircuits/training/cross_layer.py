"""Training a cross-layer transcoder with the other kinds' machinery: one model forward (or cache row) feeds every
layer; the same activation buffer, checkpoints and resume, data-parallel ranks, logging and final checks.

``TrainConfig(kind="cross_layer_transcoder", hooks=[blocks.0.ln2.hook_normalized, ..., blocks.{n-1}...],
hooks_out=[blocks.0.hook_mlp_out, ...])`` trains one CLT over all ``n`` layers. The store's per-hook rows are
stacked into ``[batch, n, d]`` under the CLT's hook templates (:class:`StackedLayers`), so the generic
:class:`~.trainer.Trainer` loop drives :class:`CrossLayerTrainer` like any dictionary trainer. Metrics are
logged per output layer (``fvu_layer{M}``) and per source layer (``l0_layer{L}``) beside the totals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, cast

import torch

from ..dictionaries import CrossLayerTranscoder, Dictionary, DictionaryConfig
from ..dictionaries.config import LAYER_FIELD
from . import distributed
from .config import TrainConfig
from .cross_layer_module import TrainableCrossLayer, cross_layer_loss
from .dictionary_trainer import (
    add_extra_gradients,
    learning_rate,
    optimizer_step,
    record_firing,
    sparsity_coefficient,
)
from .trainer import Trainer

__all__ = ["CROSS_LAYER_NAME", "check_cross_layer_config", "cross_layer_dictionary_config", "StackedLayers",
           "CrossLayerTrainer", "CrossLayerRun", "evaluate_cross_layer", "train_cross_layer"]

CROSS_LAYER_NAME = "cross_layer_transcoder"  # the output sub-directory of the one CLT


def _template(hooks: list[str], which: str) -> str:
    """``blocks.{layer}.X`` when ``hooks`` are ``blocks.0.X, blocks.1.X, ...`` in layer order; else an error."""
    suffixes = {hook.split(".", 2)[2] if hook.count(".") >= 2 else "" for hook in hooks}
    expected = [f"blocks.{layer}.{next(iter(suffixes))}" for layer in range(len(hooks))] if len(suffixes) == 1 else []
    if hooks != expected:
        raise ValueError(f"kind=cross_layer_transcoder reads and writes every layer in order: {which} must be "
                         f"blocks.0.<hook>, blocks.1.<hook>, ... with one <hook>; got {hooks[:4]}"
                         f"{' ...' if len(hooks) > 4 else ''}.")
    return f"blocks.{LAYER_FIELD}.{next(iter(suffixes))}"


def check_cross_layer_config(config: TrainConfig, n_layers: int | None = None) -> tuple[str, str]:
    """The CLT's ``(hook_in, hook_out)`` templates, or a ``ValueError`` naming the field to fix."""
    hook_in, hook_out = _template(list(config.hooks), "hooks"), _template(list(config.hooks_out), "hooks_out")
    if n_layers is not None and len(config.hooks) != n_layers:
        raise ValueError(f"kind=cross_layer_transcoder: hooks name {len(config.hooks)} layers but the model has "
                         f"{n_layers}; a CLT spans every layer, so give one hook per layer (blocks.0 .. "
                         f"blocks.{n_layers - 1}).")
    unsupported = [name for name, on in (("matryoshka_prefixes", bool(config.matryoshka_prefixes)),
                                         ("compile", config.compile),
                                         ("distribute_dictionaries", config.distribute_dictionaries)) if on]
    if unsupported:
        raise ValueError(f"kind=cross_layer_transcoder does not take {unsupported}: a CLT is one dictionary (trained "
                         "data-parallel across ranks, uncompiled, without nested prefixes). Drop those settings.")
    return hook_in, hook_out


def cross_layer_dictionary_config(config: TrainConfig, widths: dict[str, int], model_name: str) -> DictionaryConfig:
    hook_in, hook_out = check_cross_layer_config(config)
    d_in, d_out = {widths[h] for h in config.hooks}, {widths[h] for h in config.hooks_out}
    if len(d_in) != 1 or len(d_out) != 1:
        raise ValueError(f"A cross-layer transcoder needs one width at every layer; the hooks have widths "
                         f"{sorted(d_in)} in and {sorted(d_out)} out.")
    (width_in,), (width_out,) = d_in, d_out
    return DictionaryConfig(
        d_in=width_in, d_out=width_out, d_sae=config.d_sae or config.expansion_factor * width_in,
        kind=CROSS_LAYER_NAME, activation=config.architecture,
        k=config.k if config.architecture in ("topk", "batchtopk") else None, hook_in=hook_in, hook_out=hook_out,
        n_layers=len(config.hooks), model_name=model_name, dataset=config.dataset,
        training_tokens=config.n_steps * config.batch_size, dtype=config.dtype)


class StackedLayers:
    """An ``ActivationStore`` whose batches are ``{hook_in template: [batch, n, d_in], hook_out template: [...]}``."""

    def __init__(self, store: Any, cfg: DictionaryConfig) -> None:
        self.store, self.cfg = store, cfg
        self.hooks_in = [cfg.hook_in.replace(LAYER_FIELD, str(layer)) for layer in range(cfg.n_layers or 0)]
        self.hooks_out = [cfg.hook_out.replace(LAYER_FIELD, str(layer)) for layer in range(cfg.n_layers or 0)]

    @property
    def device(self) -> torch.device:
        return self.store.device

    def next_batch(self) -> dict[str, torch.Tensor]:
        batch = self.store.next_batch()
        return {self.cfg.hook_in: torch.stack([batch[hook] for hook in self.hooks_in], 1),
                self.cfg.hook_out: torch.stack([batch[hook] for hook in self.hooks_out], 1)}

    def state_dict(self) -> dict[str, Any]:
        return self.store.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.store.load_state_dict(state)


class CrossLayerTrainer:
    """The CLT's optimiser and running statistics, with the interface ``Trainer`` drives (as DictionaryTrainer)."""

    def __init__(self, config: TrainConfig, dict_cfg: DictionaryConfig, device: torch.device,
                 sync_gradients: bool = False) -> None:
        self.config, self.dict_cfg, self.device, self.sync_gradients = config, dict_cfg, device, sync_gradients
        self.unit_norm_decoder = (config.architecture != "relu" if config.unit_norm_decoder is None
                                  else config.unit_norm_decoder)
        self.module = TrainableCrossLayer(dict_cfg, device=device, init_threshold=config.jumprelu_init_threshold,
                                          init_scale=config.init_scale, unit_norm_decoder=self.unit_norm_decoder)
        params = list(self.module.parameters())
        self.optimizer = torch.optim.Adam(params, lr=config.lr, betas=config.adam_betas,
                                          fused=device.type in ("cpu", "cuda"))
        n, d_sae = self.module.n_layers, dict_cfg.d_sae
        self.tokens_since_fired = torch.zeros(n, d_sae, dtype=torch.long, device=device)
        self.k_aux = config.auxk_k or max(1, dict_cfg.d_in // 2)
        self.extra_gradients: list[torch.Tensor | None] | None = None  # set for one step by kl_objective
        self.reset_running()

    @torch.no_grad()
    def initialise(self, x_in: torch.Tensor, target: torch.Tensor) -> None:
        """Per-layer scales (mean norm sqrt(d)) and the data-dependent start from ``[batch, n, d]`` rows."""
        if self.config.normalize_activations:
            def scale(rows: torch.Tensor) -> list[float]:
                means = rows.float().norm(dim=-1).mean(0).clamp_min(1e-12)
                return (math.sqrt(rows.shape[-1]) / means).tolist()
            self.module.norm_scale, self.module.target_scale = scale(x_in), scale(target)
        in_scale, out_scale = self.module.scales(x_in.device)
        self.module.initialise_from(x_in * in_scale, target * out_scale, self.config.init_b_dec_geometric_median)
        if self.unit_norm_decoder:
            self.module.normalise_decoder()

    def _sparsity(self, step: int) -> float:
        config = self.config
        base = {"relu": config.l1_coefficient, "jumprelu": config.l0_coefficient}.get(config.architecture, 0.0)
        return sparsity_coefficient(base, config, step)

    def train_step(self, x_in: torch.Tensor, target: torch.Tensor, step: int) -> None:
        """One optimiser step on raw ``x_in [batch, n, d_in]`` -> ``target [batch, n, d_out]``."""
        module, config = self.module, self.config
        in_scale, out_scale = module.scales(x_in.device)
        x, target = x_in * in_scale, target * out_scale
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        dead = self.tokens_since_fired > config.dead_after_tokens
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.autocast and self.device.type == "cuda"
                    else nullcontext())
        with autocast:
            out = cross_layer_loss(module, x, target, config.architecture, config.k, self._sparsity(step),
                                   config.jumprelu_bandwidth, dead, self.k_aux, config.auxk_coefficient)
        self.optimizer.zero_grad(set_to_none=not self.sync_gradients)
        out.loss.backward()
        add_extra_gradients(self)
        fire_counts = out.fire_counts
        if self.sync_gradients:
            distributed.average_gradients(module.parameters())
            fire_counts = distributed.sum_(fire_counts.clone())
        if config.architecture == "batchtopk":
            self._update_threshold(out.smallest_kept)
        optimizer_step(self.optimizer, module, self.unit_norm_decoder)
        with torch.no_grad():
            record_firing(self.tokens_since_fired, self._fire_counts, fire_counts, x_in.shape[0], self.sync_gradients)
            error = (out.reconstruction.float() - target.float()).pow(2).sum((0, 2))  # [n] per output layer
            variance = (target.float() - target.float().mean(0)).pow(2).sum((0, 2))
            self._running += torch.cat([error, variance, out.l0 * x_in.shape[0],
                                        torch.stack([out.aux_loss, torch.tensor(float(x_in.shape[0]), device=self.device),
                                                     torch.ones((), device=self.device)])])

    @torch.no_grad()
    def _update_threshold(self, smallest_kept: torch.Tensor) -> None:
        """Running per-layer BatchTopK thresholds (mid-training evaluation); recalibrated at the end."""
        kept = smallest_kept.clone()
        if self.sync_gradients:
            distributed.sum_(kept)
        has = kept[:, 1] > 0
        smallest = kept[:, 0] / kept[:, 1].clamp_min(1)
        momentum, current = self.config.batchtopk_threshold_momentum, self.module.threshold
        updated = torch.where(current == 0, smallest, momentum * current + (1 - momentum) * smallest)
        current.copy_(torch.where(has, updated, current))

    @torch.no_grad()
    def batchtopk_threshold_sample(self, x_in: torch.Tensor) -> torch.Tensor:
        """``[n, 2]`` per-layer (smallest kept activation, kept any) of a BatchTopK selection on ``x_in``."""
        in_scale, _ = self.module.scales(x_in.device)
        x, n = x_in * in_scale, self.module.n_layers
        samples = []
        for layer in range(n):
            pre = torch.addmm(self.module.b_enc[layer], x[:, layer], self.module.W_enc_t[layer].t())
            values, _ = pre.relu().reshape(-1).topk(min(self.config.k * pre.shape[0], pre.numel()), sorted=False)
            positive = values > 0
            low = values.masked_fill(~positive, float("inf")).min()
            samples.append(torch.stack([torch.where(positive.any(), low, torch.zeros_like(low)), positive.any().float()]))
        return torch.stack(samples)

    @torch.no_grad()
    def set_threshold(self, summed_samples: torch.Tensor) -> None:
        """Per-layer inference thresholds = the mean of ``batchtopk_threshold_sample`` over batches (and ranks)."""
        summed = summed_samples.clone()
        if self.sync_gradients:
            distributed.sum_(summed)
        has = summed[:, 1] > 0
        self.module.threshold.copy_(torch.where(has, summed[:, 0] / summed[:, 1].clamp_min(1), self.module.threshold))

    def reset_running(self) -> None:
        n = self.module.n_layers
        self._running = torch.zeros(3 * n + 3, device=self.device)
        self._fire_counts = torch.zeros(n, self.dict_cfg.d_sae, dtype=torch.long, device=self.device)

    def running_metrics(self) -> dict[str, float]:
        """Totals (``fvu``, ``mse``, ``l0`` per layer, dead/dense fractions) and ``fvu_layer{M}``, ``l0_layer{L}``."""
        running = self._running.clone()
        if self.sync_gradients:
            distributed.sum_(running)
        n = self.module.n_layers
        values = running.tolist()
        error, variance, l0_sums = values[:n], values[n: 2 * n], values[2 * n: 3 * n]
        aux_sum, rows, n_steps = values[3 * n:]
        dense = (self._fire_counts.float() / max(rows, 1) > 0.1).float().mean().item()
        self.reset_running()
        dead = (self.tokens_since_fired > self.config.dead_after_tokens).float().mean().item()
        raw_error = sum(e / s**2 for e, s in zip(error, self.module.target_scale, strict=True))
        metrics = {"fvu": sum(error) / max(sum(variance), 1e-12),
                   "mse": raw_error / max(rows, 1) / (n * (self.dict_cfg.d_out or 1)),
                   "l0": sum(l0_sums) / max(rows, 1) / n, "l0_total": sum(l0_sums) / max(rows, 1),
                   "dead_fraction": dead, "dense_fraction": dense, "aux_loss": aux_sum / max(n_steps, 1)}
        metrics.update({f"fvu_layer{m}": error[m] / max(variance[m], 1e-12) for m in range(n)})
        metrics.update({f"l0_layer{m}": l0_sums[m] / max(rows, 1) for m in range(n)})
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "norm_scale": list(self.module.norm_scale),
                "target_scale": list(self.module.target_scale), "optimizer": self.optimizer.state_dict(),
                "tokens_since_fired": self.tokens_since_fired.clone(), "running": self._running.clone(),
                "fire_counts": self._fire_counts.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.module.norm_scale = [float(s) for s in state["norm_scale"]]
        self.module.target_scale = [float(s) for s in state["target_scale"]]
        self.optimizer.load_state_dict(state["optimizer"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])
        self._running.copy_(state["running"])
        self._fire_counts.copy_(state["fire_counts"])


class CrossLayerRun(Trainer):
    """The training loop of :class:`~.trainer.Trainer` for one CLT: per-layer BatchTopK calibration and a
    finiteness check over every layer's weights."""

    def _check_finite(self) -> None:
        for trainer, name in zip(self.trainers, self.names, strict=False):
            if not all(bool(torch.isfinite(p).all()) for p in trainer.module.parameters()):
                raise self._diverged(name, f"has non-finite weights at step {self.step}")

    @torch.no_grad()
    def _calibrate_batchtopk_thresholds(self) -> None:
        if self.config.architecture != "batchtopk" or self.config.batchtopk_calibration_batches <= 0:
            return
        for trainer in cast(list[CrossLayerTrainer], self.trainers):
            summed = torch.zeros(trainer.module.n_layers, 2, device=trainer.device)
            for _ in range(self.config.batchtopk_calibration_batches):
                batch = self._local(self.store.next_batch())
                summed += trainer.batchtopk_threshold_sample(batch[trainer.dict_cfg.hook_in])
            trainer.set_threshold(summed)


@torch.no_grad()
def evaluate_cross_layer(model: Any, clt: CrossLayerTranscoder, tokens: torch.Tensor,
                         special_ids: list[int]) -> dict[str, float]:
    """FVU per output layer and CE, KL, CE recovered with the CLT spliced into ``model`` on ``tokens [n_seq, ctx]``.

    Every MLP output is replaced by the CLT's reconstruction from the layer inputs of the spliced forward (no
    error terms; special-token positions keep their real activations, as metrics.evaluate_spliced does); the
    zero-ablation baseline zeroes every MLP output there.
    """
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    keep = ~torch.isin(tokens, torch.tensor(special_ids, device=device))
    n = clt.n_layers
    acts: list[torch.Tensor] = []
    errors, variances = [0.0] * n, [0.0] * n

    def read(x: torch.Tensor, hook: Any, layer: int) -> None:
        acts.append(clt.encode_layer(x[keep], layer))

    def splice(out: torch.Tensor, hook: Any, layer: int) -> torch.Tensor:
        reconstruction = clt.decode_layer(torch.stack(acts[: layer + 1], -2), layer).to(out.dtype)
        real = out[keep].float()
        errors[layer] += float((reconstruction.float() - real).pow(2).sum())
        variances[layer] += float((real - real.mean(0)).pow(2).sum())
        out = out.clone()
        out[keep] = reconstruction
        return out

    def zero(out: torch.Tensor, hook: Any) -> torch.Tensor:
        out = out.clone()
        out[keep] = 0
        return out

    hooks: list[Any] = []
    for layer, (hook_in, hook_out) in enumerate(zip(clt.hooks_in, clt.hooks_out, strict=True)):
        hooks += [(hook_in, lambda x, hook, layer=layer: read(x, hook, layer)),
                  (hook_out, lambda x, hook, layer=layer: splice(x, hook, layer))]
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=hooks)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(hook, zero) for hook in clt.hooks_out])

    def next_token_loss(logits: torch.Tensor) -> float:
        log_probs = logits[:, :-1].float().log_softmax(-1)
        return float(-log_probs.gather(-1, tokens[:, 1:, None]).mean())

    ce_clean, ce_spliced, ce_zero = next_token_loss(clean), next_token_loss(spliced), next_token_loss(zeroed)
    clean_log_probs, spliced_log_probs = clean.float().log_softmax(-1), spliced.float().log_softmax(-1)
    kl = float((clean_log_probs.exp() * (clean_log_probs - spliced_log_probs)).sum(-1)[keep].mean())
    denominator = ce_zero - ce_clean
    metrics = {"eval_fvu": sum(errors) / max(sum(variances), 1e-12), "ce_clean": ce_clean, "ce_spliced": ce_spliced,
               "ce_zero_ablation": ce_zero, "kl": kl,
               "ce_loss_recovered": (ce_zero - ce_spliced) / denominator if abs(denominator) > 1e-9 else float("nan")}
    metrics.update({f"eval_fvu_layer{m}": errors[m] / max(variances[m], 1e-12) for m in range(n)})
    return metrics


def train_cross_layer(config: TrainConfig, store: Any, widths: dict[str, int], model_name: str, device: torch.device,
                      sync: bool, rank_slice: slice | None, model: Any = None, eval_tokens: torch.Tensor | None = None,
                      special_ids: list[int] | None = None, kl_objective: Any = None) -> dict[str, Any]:
    """Train the one CLT ``config`` describes from ``store`` (an ActivationStore over every layer's hooks); returns
    what ``Trainer.run`` returns, the CLT under :data:`CROSS_LAYER_NAME`. ``kl_objective``: see ``Trainer``."""
    check_cross_layer_config(config, int(model.cfg.n_layers) if model is not None else None)
    dict_cfg = cross_layer_dictionary_config(config, widths, model_name)
    trainer = CrossLayerTrainer(config, dict_cfg, device, sync_gradients=sync)
    eval_fn: Callable[[list[Dictionary]], list[dict[str, float]]] | None = None
    if model is not None and eval_tokens is not None and len(eval_tokens):
        held_out = eval_tokens

        def evaluate(dictionaries: list[Dictionary]) -> list[dict[str, float]]:
            return [evaluate_cross_layer(model, d, held_out, special_ids or []) for d in dictionaries
                    if isinstance(d, CrossLayerTranscoder)]

        eval_fn = evaluate
    # Trainer drives any trainer with DictionaryTrainer's interface, and any store with next_batch/state_dict.
    run = CrossLayerRun(config, cast(list[Any], [trainer]), [CROSS_LAYER_NAME],
                        cast(Any, StackedLayers(store, dict_cfg)), rank_slice=rank_slice, eval_fn=eval_fn,
                        kl_objective=kl_objective)
    return run.run()
