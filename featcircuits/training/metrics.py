"""Evaluation with the dictionaries spliced into the model, and metric logging (tqdm, optional wandb).

``ce_loss_recovered = (CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean)``: 1 means the
dictionary's output is as good as the real activation for the model's next-token loss, 0 as bad as
zeroing it. Special-token positions (BOS, pad) keep their real activations: no dictionary was trained
on them.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..dictionaries import Dictionary
from ..patching.splice import spliced_forward, zero_ablated_forward

__all__ = ["evaluate_spliced", "reconstruction_metrics", "MetricLogger"]


@torch.no_grad()
def reconstruction_metrics(dictionary: Dictionary, x_in: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """FVU, MSE and L0 of ``dictionary`` on ``x_in [rows, d_in]`` -> ``target [rows, d_out]`` (raw units)."""
    reconstruction, feature_acts = dictionary(x_in)
    error = (reconstruction.float() - target.float()).pow(2)
    variance = (target.float() - target.float().mean(0)).pow(2).sum()
    return {
        "fvu": (error.sum() / variance.clamp_min(1e-12)).item(),
        "mse": error.mean().item(),
        "l0": (feature_acts > 0).float().sum(-1).mean().item(),
    }


def _next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    log_probs = logits[:, :-1].float().log_softmax(-1)
    return -log_probs.gather(-1, tokens[:, 1:, None]).mean()


@torch.no_grad()
def evaluate_spliced(
    model: Any, dictionaries: list[Dictionary], tokens: torch.Tensor, special_ids: list[int]
) -> list[dict[str, float]]:
    """Per dictionary: FVU/MSE/L0 on ``tokens [n_seq, ctx]`` and CE, KL and CE recovered when spliced in."""
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    keep = ~torch.isin(tokens, torch.tensor(special_ids, device=device))  # [n_seq, ctx]
    clean_logits = model(tokens)
    clean_log_probs = clean_logits.float().log_softmax(-1)
    ce_clean = _next_token_loss(clean_logits, tokens).item()
    results = []
    for dictionary in dictionaries:
        cfg = dictionary.cfg
        spliced_logits, captured = spliced_forward(model, dictionary, tokens, keep)
        zero_logits = zero_ablated_forward(model, cfg.hook_out, tokens, keep)
        ce_spliced = _next_token_loss(spliced_logits, tokens).item()
        ce_zero = _next_token_loss(zero_logits, tokens).item()
        spliced_log_probs = spliced_logits.float().log_softmax(-1)
        kl = (clean_log_probs.exp() * (clean_log_probs - spliced_log_probs)).sum(-1)[keep].mean().item()
        metrics = reconstruction_metrics(dictionary, captured["in_rows"], captured["out"][keep])
        denominator = ce_zero - ce_clean
        metrics.update(
            ce_clean=ce_clean, ce_spliced=ce_spliced, ce_zero_ablation=ce_zero, kl=kl,
            ce_loss_recovered=(ce_zero - ce_spliced) / denominator if abs(denominator) > 1e-9 else float("nan"),
        )
        results.append(metrics)
    return results


class MetricLogger:
    """Progress bar with the latest metrics; wandb too when enabled and installed (offline by default)."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool, use_wandb: bool,
                 project: str, config: dict[str, Any], run_dir: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)
        self.wandb_run = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                print("featcircuits train: wandb is not installed; logging to the progress bar only.")
            else:
                # Offline unless the user asks otherwise through WANDB_MODE.
                mode = os.environ.get("WANDB_MODE", "offline")
                self.wandb_run = wandb.init(project=project, config=config, dir=run_dir, mode=mode)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            short = {k: v for k, v in metrics.items() if k.count("/") == 0 or k.endswith(("/fvu", "/l0"))}
            self.bar.set_postfix({k.split("/")[-1] if "/" in k else k: f"{v:.3g}" for k, v in list(short.items())[:6]})
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
