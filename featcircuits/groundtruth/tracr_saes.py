"""SAEs on a tracr model's residual stream, trained by the library's own trainer.

Rows come from :class:`TracrSource`: random program inputs of every length from 1 to the maximum, every
position (the BOS position too: the replacement model splices the SAEs in there as well). The SAEs are
trained with :class:`featcircuits.training.Trainer` exactly as on a language model; nothing about tracr's
labelled directions is used (those are only the ground truth the results are scored against).
"""

from __future__ import annotations

from typing import Any

import torch

from .tracr_model import TracrModel

__all__ = ["TracrSource", "residual_sites", "train_residual_saes"]


def residual_sites(tm: TracrModel) -> list[str]:
    """``resid_pre`` of every layer and the final ``resid_post``."""
    last = tm.model.cfg.n_layers - 1
    return [f"blocks.{layer}.hook_resid_pre" for layer in range(last + 1)] + [f"blocks.{last}.hook_resid_post"]


class TracrSource:
    """An activation source (``next_chunk`` / ``state_dict``) of residual rows ``{hook: [rows, d_model]}``.

    Each chunk holds ``inputs_per_length`` random inputs of every length ``1..max_seq_len`` (tokens drawn
    uniformly from the program's vocabulary), all positions. Every length matters: a program's variables
    (a length, an index counted from the end) take values at short lengths that full-length inputs never
    show, and some labels only separate across lengths (``opp_idx`` is a function of ``indices`` at one length).
    """

    def __init__(self, tm: TracrModel, hooks: list[str], inputs_per_length: int = 64, seed: int = 0) -> None:
        self.tm, self.hooks, self.inputs_per_length = tm, list(hooks), inputs_per_length
        vocab = [v for v in tm.input_encoding if v not in ("BOS", "compiler_pad")]
        self.token_ids = torch.tensor([tm.input_encoding[v] for v in vocab])
        self.bos = tm.input_encoding["BOS"]
        self.max_len = tm.model.cfg.n_ctx - 1
        self.device = next(tm.model.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)

    def widths(self) -> dict[str, int]:
        return {hook: self.tm.model.cfg.d_model for hook in self.hooks}

    def sample_tokens(self, length: int, count: int) -> torch.Tensor:
        """``[count, 1 + length]`` token ids: BOS then random program tokens."""
        picks = torch.randint(len(self.token_ids), (count, length), generator=self.generator)
        return torch.cat([torch.full((count, 1), self.bos), self.token_ids[picks]], dim=1)

    @torch.no_grad()
    def next_chunk(self) -> dict[str, torch.Tensor]:
        parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in self.hooks}
        for length in range(1, self.max_len + 1):  # one forward per length: tracr attention is bidirectional
            tokens = self.sample_tokens(length, self.inputs_per_length).to(self.device)
            _, cache = self.tm.model.run_with_cache(tokens, names_filter=self.hooks)
            for hook in self.hooks:
                parts[hook].append(cache[hook].reshape(-1, cache[hook].shape[-1]))
        return {hook: torch.cat(rows) for hook, rows in parts.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])


def _held_out_fvu(dictionary: Any, rows: torch.Tensor) -> float:
    with torch.no_grad():
        reconstruction, _ = dictionary(rows)
        return float((reconstruction - rows).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum().clamp_min(1e-12))


def train_residual_saes(tm: TracrModel, architecture: str = "relu", l1_coefficient: float = 0.1, k: int = 4,
                        expansion_factor: int = 1, steps: int = 1500, batch_size: int = 256, lr: float = 1e-2,
                        seeds: tuple[int, ...] = (0, 1, 2), device: str = "cpu",
                        matryoshka_fractions: tuple[float, ...] = ()) -> tuple[list, dict[str, Any]]:
    """SAEs on every residual site, trained by :class:`featcircuits.training.Trainer` from :class:`TracrSource`.

    One run per seed trains every site from the same forwards; per site the run with the lowest FVU on
    held-out rows is kept (selection by reconstruction only). Width ``expansion_factor * d_model``: the
    distinct residual vectors are few, so a much wider dictionary can memorise combinations of labels.
    ``matryoshka_fractions``: Matryoshka prefixes as fractions of the width (e.g. ``(0.25, 0.5)``).
    Returns ``(saes, info)`` with ``info = {"fvu": {hook: best held-out FVU}, "seed": {hook: seed}}``.
    """
    from ..dictionaries import DictionaryConfig
    from ..training import ActivationStore, DictionaryTrainer, TrainConfig, Trainer

    hooks = residual_sites(tm)
    held_out = TracrSource(tm, hooks, inputs_per_length=256, seed=10_000).next_chunk()
    best: dict[str, tuple[float, int, Any]] = {}
    for seed in seeds:
        config = TrainConfig(
            hooks=hooks, dataset=f"tracr {tm.output_label}: random inputs of every length", architecture=architecture,
            k=k, expansion_factor=expansion_factor, l1_coefficient=l1_coefficient, total_tokens=steps * batch_size,
            batch_size=batch_size, lr=lr, seed=seed, device=device, progress=False, log_every=steps,
            dead_after_tokens=50 * batch_size,
            matryoshka_prefixes=sorted({max(1, round(f * expansion_factor * tm.model.cfg.d_model))
                                        for f in matryoshka_fractions}),
        )
        torch.manual_seed(seed)
        d_model = tm.model.cfg.d_model
        widths = {hook: d_model for hook in hooks}
        trainers = [DictionaryTrainer(config, DictionaryConfig(
            d_in=d_model, d_out=d_model, d_sae=expansion_factor * d_model, activation=architecture,
            k=k if architecture in ("topk", "batchtopk") else None, hook_in=hook, hook_out=hook,
            layer=int(hook.split(".")[1]), model_name=tm.model.cfg.model_name, apply_b_dec_to_input=True,
            dataset=config.dataset, training_tokens=config.total_tokens), torch.device(device)) for hook in hooks]
        store = ActivationStore(TracrSource(tm, hooks, seed=seed), widths, batch_size, 32 * 2**20, device=device,
                                seed=seed, max_rows=steps * batch_size)
        result = Trainer(config, trainers, hooks, store).run()
        for hook, sae in zip(hooks, result["dictionaries"], strict=True):
            fvu = _held_out_fvu(sae, held_out[hook].to(sae.W_dec.device))
            if hook not in best or fvu < best[hook][0]:
                best[hook] = (fvu, seed, sae)
    info = {"fvu": {hook: best[hook][0] for hook in hooks}, "seed": {hook: best[hook][1] for hook in hooks}}
    return [best[hook][2] for hook in hooks], info
