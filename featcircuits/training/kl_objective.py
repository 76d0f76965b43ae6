"""End-to-end fine-tuning: the KL from the model's next-token distribution to the one with every dictionary
spliced in at once, added to each dictionary's reconstruction loss.

Dictionaries trained on reconstruction alone lose more of the model's next-token loss than their FVU
suggests: their errors point where the rest of the model is sensitive. End-to-end SAEs (Braun et al. 2024)
train on the KL from the start, at many times the cost; a short KL + MSE fine-tune over the final few
percent of the tokens recovers most of the gain (Karvonen 2025). This module does the latter, for every
kind the trainer trains, all spliced at once: per-layer transcoders and skip transcoders replace their
output hook (``hook_mlp_out``) by their reconstruction, a CLT replaces every MLP output, SAEs their own hook.

``TrainConfig``: ``kl_coefficient`` (0: off), ``kl_fraction`` (the final share of the steps that add the
term; 1: the whole run) and ``kl_sequences`` (token rows per step; 0: ``batch_size // context_size``).
At such a step, before the dictionaries' reconstruction steps, :class:`SplicedKL` reads that many rows of
its own stream over the training text (after the held-out rows), runs the frozen model on them once clean
and once with every reconstruction in place (inputs read in the spliced forward, so upstream errors reach
downstream dictionaries; special-token positions keep their real activations, as the evaluation does),
and leaves ``kl_coefficient * d KL / d parameters`` in each trainer's ``extra_gradients``. The trainer adds
it to its reconstruction gradient before the data-parallel average, the unit-norm projection and Adam:
each dictionary then minimises ``its reconstruction loss + kl_coefficient * KL`` (nats per kept position).
The reconstruction term is the squared error of activations scaled to mean norm sqrt(d), about FVU * d per
token, so a coefficient of the order of d / 2 (30 for stories260k's d_model 64) gives the two terms similar
weight; ``benchmarks/kl_finetune.py`` measures a run with and without the term.

The spliced forward uses the training-time activations (TopK per row, BatchTopK across the step's rows,
JumpReLU with its straight-through threshold gradient), so a JumpReLU threshold learns from the KL too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..dictionaries.config import LAYER_FIELD
from . import distributed
from .config import TrainConfig
from .cross_layer_module import TrainableCrossLayer
from .module import TrainableDictionary
from .objectives import _JumpReLU
from .sources import fused_attention
from .sparse_ops import gathered_pre_acts, sparse_decode

__all__ = ["check_kl_config", "kl_sequences", "kl_start_step", "kl_token_rows", "spliced_kl", "splice_hooks",
           "evaluate_spliced_set", "SplicedKL"]


def kl_sequences(config: TrainConfig, world: int = 1) -> int:
    """Token rows per KL step across all ranks: ``kl_sequences``, or about one batch's tokens rounded up to
    a multiple of the ranks (each rank runs an equal share)."""
    if config.kl_sequences:
        return config.kl_sequences
    rows = max(1, config.effective_batch_size // config.context_size)
    return -(-rows // world) * world


def kl_start_step(config: TrainConfig) -> int:
    """The first step that adds the KL term: the final ``kl_fraction`` of the steps (at least one)."""
    return config.n_steps - max(1, round(config.kl_fraction * config.n_steps))


def check_kl_config(config: TrainConfig, cached: bool, world: int = 1) -> None:
    """Refuse, with a ``ValueError`` naming the fix, a KL objective this run cannot compute."""
    if config.kl_coefficient <= 0:
        return
    if cached:
        raise ValueError(f"kl_coefficient={config.kl_coefficient:g} needs token rows run through the model, but "
                         f"dataset {config.dataset} is an activation cache: train from its text dataset instead "
                         "(--dataset FILE), or set kl_coefficient=0.")
    if not config.model:
        raise ValueError("kl_coefficient > 0 needs the model (TrainConfig.model) to splice the dictionaries into.")
    outs = [hook_out for _, hook_out in config.pairs]
    repeated = sorted({hook for hook in outs if outs.count(hook) > 1})
    if repeated:
        raise ValueError(f"kl_coefficient > 0 splices every dictionary in at once, but several write {repeated}: "
                         "give each output hook one dictionary, or set kl_coefficient=0.")
    if world > 1 and config.distribute_dictionaries:
        raise ValueError("kl_coefficient > 0 needs every dictionary on every rank (the spliced forward runs them "
                         "all); drop distribute_dictionaries, or set kl_coefficient=0.")
    if world > 1 and kl_sequences(config, world) % world:
        raise ValueError(f"kl_sequences={config.kl_sequences} must be divisible by the {world} ranks (each runs an "
                         "equal share of the KL rows); give a multiple, or 0 for the default.")


def kl_token_rows(config: TrainConfig, model: Any, held_out: int) -> Any:
    """The KL term's own row stream: ``config.dataset`` after its ``held_out`` evaluation rows, shuffled (a seed
    of its own) through a buffer of at most the rows the KL phase reads."""
    from ..data import ShuffledRows, TokenRows, open_documents

    documents = open_documents(config.dataset, config.dataset_split, config.dataset_config, config.text_column)
    rows: Any = TokenRows(documents, model.tokenizer, config.context_size, repeat=config.repeat_dataset,
                          skip_rows=held_out, vocab_size=int(model.cfg.d_vocab))
    needed = (config.n_steps - kl_start_step(config)) * kl_sequences(config, distributed.world_size())
    buffer_rows = min(config.shuffle_buffer_tokens // config.context_size, needed)
    return ShuffledRows(rows, buffer_rows, seed=config.seed + 1, read_limit=needed) if buffer_rows > 0 else rows


def spliced_kl(clean_logits: torch.Tensor, spliced_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over kept positions of ``KL(softmax(clean) || softmax(spliced))`` (nats): logits ``[n_seq, ctx, vocab]``,
    ``keep [n_seq, ctx]``; differentiable in ``spliced_logits``."""
    clean_log_probs = clean_logits.float().log_softmax(-1)
    spliced_log_probs = spliced_logits.float().log_softmax(-1)
    return (clean_log_probs.exp() * (clean_log_probs - spliced_log_probs)).sum(-1)[keep].mean()


@torch.no_grad()
def evaluate_spliced_set(model: Any, dictionaries: list[Any], tokens: torch.Tensor,
                         special_ids: list[int]) -> dict[str, float]:
    """CE, KL and CE recovered on ``tokens [n_seq, ctx]`` with every (exported) dictionary spliced in at once,
    what the KL term optimises; the zero-ablation baseline zeroes every output hook. A CLT: see
    ``cross_layer.evaluate_cross_layer``. Special-token positions keep their real activations."""
    from ..dictionaries import CrossLayerTranscoder

    if any(isinstance(d, CrossLayerTranscoder) for d in dictionaries):
        from .cross_layer import evaluate_cross_layer

        (clt,) = dictionaries
        metrics = evaluate_cross_layer(model, clt, tokens, special_ids)
        return {key: metrics[key] for key in ("ce_clean", "ce_spliced", "ce_zero_ablation", "kl", "ce_loss_recovered")}
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    keep = ~torch.isin(tokens, torch.tensor(special_ids, dtype=torch.long, device=device))
    inputs: dict[str, torch.Tensor] = {}

    def read(acts: torch.Tensor, hook: Any) -> None:
        inputs[hook.name] = acts[keep]

    def write(acts: torch.Tensor, hook: Any, dictionary: Any) -> torch.Tensor:
        x_in = acts[keep] if dictionary.cfg.hook_in == hook.name else inputs[dictionary.cfg.hook_in]
        acts = acts.clone()
        acts[keep] = dictionary(x_in)[0].to(acts.dtype)
        return acts

    def zero(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        return acts.masked_fill(keep[..., None], 0.0)

    hooks: list[tuple[str, Any]] = [(d.cfg.hook_in, read) for d in dictionaries if d.cfg.hook_in != d.cfg.hook_out]
    hooks += [(d.cfg.hook_out, lambda acts, hook, d=d: write(acts, hook, d)) for d in dictionaries]
    clean = model(tokens)
    spliced = model.run_with_hooks(tokens, fwd_hooks=hooks)
    zeroed = model.run_with_hooks(tokens, fwd_hooks=[(d.cfg.hook_out, zero) for d in dictionaries])

    def next_token_loss(logits: torch.Tensor) -> float:
        return float(-logits[:, :-1].float().log_softmax(-1).gather(-1, tokens[:, 1:, None]).mean())

    ce_clean, ce_spliced, ce_zero = next_token_loss(clean), next_token_loss(spliced), next_token_loss(zeroed)
    denominator = ce_zero - ce_clean
    return {"ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablation": ce_zero,
            "kl": float(spliced_kl(clean, spliced, keep)),
            "ce_loss_recovered": (ce_zero - ce_spliced) / denominator if abs(denominator) > 1e-9 else float("nan")}


def _sparse_decode(x: torch.Tensor, W_enc_t: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
                   config: TrainConfig, log_threshold: torch.Tensor | None) -> torch.Tensor:
    """``acts(x @ W_enc_t.T + b_enc) @ W_dec`` ``[rows, d_dec]`` for scaled ``x [rows, d_in]``, with the
    training-time activation of ``config.architecture`` (the one the reconstruction loss uses)."""
    architecture = config.architecture
    if architecture == "topk":
        with torch.no_grad():
            pre = torch.addmm(b_enc, x, W_enc_t.t())
            _, indices = pre.topk(config.k, dim=-1, sorted=False)
        return sparse_decode(indices, gathered_pre_acts(x, W_enc_t, b_enc, indices, pre).relu(), W_dec)
    pre = torch.addmm(b_enc, x, W_enc_t.t())
    if architecture == "batchtopk":
        flat = pre.relu().reshape(-1)
        values, indices = flat.topk(min(config.k * pre.shape[0], flat.numel()), sorted=False)
        acts = torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)
    elif architecture == "jumprelu":
        assert log_threshold is not None
        acts = _JumpReLU.apply(pre, log_threshold.exp(), config.jumprelu_bandwidth)
    else:
        acts = pre.relu()
    return acts @ W_dec


# A hook's kept rows in, rows out: writers replace the activation; readers see the (spliced) rows.
Writer = Callable[[torch.Tensor], torch.Tensor]
Reader = Callable[[torch.Tensor], None]


def _per_layer_sites(module: TrainableDictionary, config: TrainConfig, writers: dict[str, Writer],
                     readers: dict[str, list[Reader]]) -> None:
    """One dictionary's splice: its output hook gets the reconstruction (raw units) from its input rows."""
    cfg = module.cfg
    hook_in, hook_out = cfg.hook_in, cfg.hook_out or cfg.hook_in
    seen: dict[str, torch.Tensor] = {}

    def reconstruct(rows_out: torch.Tensor) -> torch.Tensor:
        x_raw = (rows_out if hook_in == hook_out else seen.pop("x")).float() * module.norm_scale
        x = x_raw - module.b_dec if cfg.apply_b_dec_to_input else x_raw
        out = _sparse_decode(x, module.W_enc_t, module.b_enc, module.W_dec, config,
                             getattr(module, "log_threshold", None)) + module.b_dec
        if module.W_skip is not None:
            out = out + x_raw @ module.W_skip
        return out / module.target_scale  # training units -> raw, as export() folds it

    if hook_in != hook_out:
        readers.setdefault(hook_in, []).append(lambda rows: seen.__setitem__("x", rows))
    writers[hook_out] = reconstruct


def _cross_layer_sites(module: TrainableCrossLayer, config: TrainConfig, writers: dict[str, Writer],
                       readers: dict[str, list[Reader]]) -> None:
    """The CLT's splice: layer L's input rows decode into outputs L..n-1; output M sums layers <= M."""
    cfg, n = module.cfg, module.n_layers
    decoded: list[torch.Tensor] = []  # [rows, n - L, d_out] per source layer L, in training units

    def encode(rows: torch.Tensor, layer: int) -> None:
        x = rows.float() * module.norm_scale[layer]
        log_threshold = module.log_threshold[layer] if cfg.activation == "jumprelu" else None
        out = _sparse_decode(x, module.W_enc_t[layer], module.b_enc[layer], module.W_dec[layer], config, log_threshold)
        decoded.append(out.view(len(rows), n - layer, -1))

    def reconstruct(rows_out: torch.Tensor, layer: int) -> torch.Tensor:
        total = module.b_dec[layer] + sum(decoded[source][:, layer - source] for source in range(layer + 1))
        return total / module.target_scale[layer]

    for layer in range(n):
        hook_in, hook_out = (template.replace(LAYER_FIELD, str(layer)) for template in (cfg.hook_in, cfg.hook_out))
        readers.setdefault(hook_in, []).append(lambda rows, layer=layer: encode(rows, layer))
        writers[hook_out] = lambda rows, layer=layer: reconstruct(rows, layer)


def splice_hooks(trainers: list[Any], config: TrainConfig, keep: torch.Tensor) -> list[tuple[str, Any]]:
    """transformer_lens forward hooks that splice every trainer's dictionary (training weights, differentiable)
    into the positions where ``keep [n_seq, ctx]`` is True; one hook per hook point, writing before reading."""
    writers: dict[str, Writer] = {}
    readers: dict[str, list[Reader]] = {}
    for trainer in trainers:
        if isinstance(trainer.module, TrainableCrossLayer):
            _cross_layer_sites(trainer.module, config, writers, readers)
        else:
            _per_layer_sites(trainer.module, config, writers, readers)

    def hook_fn(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        shape = acts.shape
        flat = acts.flatten(2) if acts.dim() == 4 else acts  # per-head hooks: heads concatenated
        rows = flat[keep]
        if hook.name in writers:
            rows = writers[hook.name](rows).to(acts.dtype)
            flat = flat.clone()
            flat[keep] = rows
        for read in readers.get(hook.name, []):
            read(rows)
        return flat.view(shape)

    return [(name, hook_fn) for name in dict.fromkeys([*readers, *writers])]


@contextmanager
def _frozen(model: Any) -> Iterator[None]:
    """The model's parameters out of autograd: gradients reach the dictionaries only, and no graph is kept
    for the model's own weights."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


class SplicedKL:
    """The KL term of a run: its row stream, the spliced forward, the gradients it hands the trainers.

    Args:
        rows: token rows (``next_rows``, ``state_dict``), e.g. :func:`kl_token_rows`; every rank reads the
            same rows and runs its share (``rank::world``), so averaged gradients are those of the whole set.
        special_ids: token ids whose positions keep their real activations and are left out of the mean.
    """

    def __init__(self, config: TrainConfig, model: Any, rows: Any, special_ids: list[int], rank: int = 0,
                 world: int = 1) -> None:
        self.config, self.model, self.rows = config, model, rows
        self.rank, self.world = rank, world
        self.sequences = kl_sequences(config, world)
        self.start_step = kl_start_step(config)
        self.device = next(model.parameters()).device
        self.special = torch.tensor(special_ids, dtype=torch.long, device=self.device)
        self._running = torch.zeros(2, device=self.device)  # (summed KL, KL steps) since the last log

    def loss(self, trainers: list[Any], tokens: torch.Tensor) -> torch.Tensor:
        """Differentiable mean KL (nats per kept position) on ``tokens [n_seq, ctx]`` with every trainer's
        dictionary spliced in; the model is frozen."""
        tokens = tokens.to(self.device)
        keep = ~torch.isin(tokens, self.special)
        hooks = splice_hooks(trainers, self.config, keep)
        names = [name for name, _ in hooks]
        with _frozen(self.model), fused_attention(self.model, names):
            with torch.no_grad():
                clean = self.model(tokens)
            spliced = self.model.run_with_hooks(tokens, fwd_hooks=hooks)
        return spliced_kl(clean, spliced, keep)

    def prepare(self, trainers: list[Any], step: int) -> None:
        """At a KL step: set each trainer's ``extra_gradients`` (one per parameter, in ``parameters()`` order)
        to ``kl_coefficient * d KL / d parameter``; the trainers' own steps add them."""
        if step < self.start_step:
            return
        tokens = self.rows.next_rows(self.sequences)
        if len(tokens) < self.sequences:
            raise ValueError(f"The KL rows of {self.config.dataset} ended after {self.rows.rows_done} rows; set "
                             "repeat_dataset=true or lower kl_sequences.")
        kl = self.loss(trainers, tokens[self.rank :: self.world])
        groups = [list(trainer.module.parameters()) for trainer in trainers]
        flat = [parameter for group in groups for parameter in group]
        grads = iter(torch.autograd.grad(kl * self.config.kl_coefficient, flat, allow_unused=True))
        for trainer, group in zip(trainers, groups, strict=True):
            trainer.extra_gradients = [next(grads) for _ in group]
        self._running += torch.stack([kl.detach(), torch.ones((), device=self.device)])

    def running_metrics(self) -> dict[str, float]:
        """``{"train_kl": mean training KL over this interval's KL steps (all ranks)}``; empty before the KL phase."""
        running = distributed.sum_(self._running.clone()) if self.world > 1 else self._running.clone()
        self._running.zero_()
        total, steps = running.tolist()
        return {"train_kl": total / steps} if steps > 0 else {}

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows.state_dict(), "running": self._running.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rows.load_state_dict(state["rows"])
        self._running.copy_(state["running"])
