"""``featcircuits.train(config)``: set up data, dictionaries and ranks, train, write the output directory.

Output directory: one sub-directory per dictionary in the native format (norm scale folded into the
weights), ``metrics.json``, ``config.json`` and, when enabled, ``checkpoint/``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from .._paths import RunLock, output_dir
from ..dictionaries import Dictionary, DictionaryConfig
from ..dictionaries.io.common import write_json
from . import distributed
from .cache import CacheSource, is_cache_dir, read_manifest
from .config import TrainConfig, load_train_config
from .defaults import default_lr, default_warmup_steps
from .diagnosis import THRESHOLDS, diagnose, format_diagnosis, fvu_drop
from .dictionary_trainer import DictionaryTrainer
from .sources import StreamSource, hook_layer
from .store import ActivationStore
from .tokens import held_out_rows, special_token_ids
from .trainer import Trainer, output_name

__all__ = ["train"]


def _dictionary_config(config: TrainConfig, hook_in: str, hook_out: str, widths: dict[str, int],
                       model_name: str) -> DictionaryConfig:
    d_in, d_out = widths[hook_in], widths[hook_out]
    uses_k = config.architecture in ("topk", "batchtopk")
    return DictionaryConfig(
        d_in=d_in, d_out=d_out, d_sae=config.d_sae or config.expansion_factor * d_in, kind=config.kind,
        activation=config.architecture, k=config.k if uses_k else None, hook_in=hook_in, hook_out=hook_out,
        layer=hook_layer(hook_in), model_name=model_name, apply_b_dec_to_input=config.kind == "sae",
        dataset=config.dataset, training_tokens=config.n_steps * config.batch_size, dtype=config.dtype,
    )


def _load_model(config: TrainConfig, device: torch.device) -> Any:
    from ..models import load_model

    return load_model(config.model, device=device)


def train(config: TrainConfig | dict[str, Any] | str | Path) -> list[Dictionary]:
    """Train the dictionaries ``config`` describes and return them (this rank's share under torchrun).

    ``config``: a ``TrainConfig``, a dict of its fields, or a YAML/JSON file path.
    """
    if isinstance(config, (str, Path)):
        config = load_train_config(config)
    elif isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    config.validate()
    return run_training(config)["dictionaries"]


def run_training(config: TrainConfig) -> dict[str, Any]:
    """Like :func:`train`, returning the dictionaries with their metrics (``metrics.json`` contents)."""
    config.validate()
    distributed.init_from_environment(config.device)
    created = not os.path.exists(config.out)  # (False, not an error, where a folder above cannot be entered)
    out = output_dir(config.out, "--out")  # before the model loads: an unwritable out fails now, not after training
    if distributed.rank() != 0:
        return _train(config)
    try:
        with RunLock(out, "--out"):
            _check_out(config, out)
            return _train(config)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):  # a run that failed leaves no empty --out behind
            out.rmdir()
        raise


def _finished_run(out: Path) -> list[str]:
    """What a finished run left in ``out`` (metrics.json and config.json are written last), with its dictionaries."""
    found = [name for name in ("metrics.json", "config.json") if (out / name).is_file()]
    return found + sorted(entry.name for entry in out.iterdir() if (entry / "cfg.json").is_file()) if found else []


def _check_out(config: TrainConfig, out: Path) -> None:
    """Refuse to train over an earlier run unless asked to continue it (resume) or to replace it (overwrite)."""
    if config.resume or config.overwrite:
        return
    if (out / "checkpoint").exists():
        raise ValueError(
            f"{out} holds a checkpoint of an earlier run; pass --resume to continue it, --overwrite to replace it, "
            "or choose a new --out (nothing there was changed)."
        )
    earlier = _finished_run(out)
    if earlier:
        raise ValueError(
            f"--out {out} already holds a finished run ({', '.join(earlier[:6])}); pass --overwrite to replace it "
            "(its dictionaries this run does not write are removed), or choose a new --out (nothing there was changed)."
        )


def _remove_stale(config: TrainConfig, out: Path, names: list[str]) -> None:
    """--overwrite: remove what an earlier run wrote that this one does not, so no stale dictionary survives."""
    if not config.overwrite:
        return
    for entry in out.iterdir():
        if (entry / "cfg.json").is_file() and entry.name not in names:
            shutil.rmtree(entry)
    if not config.checkpoint_every and (out / "checkpoint").is_dir():
        shutil.rmtree(out / "checkpoint")


def _with_run_defaults(config: TrainConfig) -> TrainConfig:
    """A copy of ``config`` with the batch size and warm-up it leaves to the run chosen (see ``defaults``)."""
    batch_size = config.effective_batch_size
    n_steps = config.total_tokens // batch_size
    warmup = default_warmup_steps(n_steps) if config.lr_warmup_steps < 0 else config.lr_warmup_steps
    return dataclasses.replace(config, batch_size=batch_size, lr_warmup_steps=warmup)


def _dictionary_lrs(config: TrainConfig, d_saes: list[int]) -> list[float]:
    """Each dictionary's learning rate: ``config.lr``, or from its width when that is 0."""
    return [config.lr or default_lr(d_sae, config.batch_size) for d_sae in d_saes]


def _train(config: TrainConfig) -> dict[str, Any]:
    config = _with_run_defaults(config)
    rank, world = distributed.rank(), distributed.world_size()
    device = distributed.local_device(config.device)
    torch.manual_seed(config.seed)
    if config.kind == "cross_layer_transcoder":  # its settings are checked before any model or data loads
        from .cross_layer import check_cross_layer_config

        check_cross_layer_config(config)
    if config.kl_coefficient > 0:  # refused before any model or data loads when it cannot run
        from .kl_objective import check_kl_config

        check_kl_config(config, cached=is_cache_dir(config.dataset), world=world)
    pairs = config.pairs
    if config.distribute_dictionaries and world > 1:
        mine = [i for i in range(len(pairs)) if i % world == rank]
        if not mine:
            raise ValueError(f"distribute_dictionaries: {len(pairs)} dictionaries for {world} ranks leaves rank {rank} idle.")
        sync = False
    else:
        mine, sync = list(range(len(pairs))), world > 1
    my_pairs = [pairs[i] for i in mine]
    hooks = list(dict.fromkeys(h for pair in my_pairs for h in pair))

    model, eval_tokens, special_ids = None, None, []
    rank_slice = None
    if is_cache_dir(config.dataset):
        manifest = read_manifest(config.dataset)
        if config.model:
            model = _load_model(config, device)
            special_ids = _special_ids(model)
        source: Any = CacheSource(config.dataset, hooks, seed=config.seed,
                                  model_name=model.cfg.model_name if model is not None else "")
        widths = source.widths()
        model_name = manifest.get("model_name", "")
        if model is not None:
            eval_tokens = _eval_tokens_from_manifest(manifest, model, config)
    else:
        if not config.model:
            raise ValueError("Training from a text dataset needs TrainConfig.model (a checkpoint dir or model name).")
        model = _load_model(config, device)
        if model.tokenizer is None:
            raise ValueError(f"Model {config.model} has no tokenizer; training from a dataset needs one to pack rows.")
        special_ids = special_token_ids(model.tokenizer)
        source, eval_tokens = _stream_source(config, model, hooks, special_ids, rank if sync else 0,
                                             world if sync else 1)
        widths = source.widths()
        model_name = model.cfg.model_name
    if sync:
        # Every rank's store holds the global stream (read from the cache, or gathered from the shared
        # forwards) and serves the global batch; the trainer keeps this rank's slice. The union of the
        # slices is then the single-process batch, step for step.
        if config.batch_size % world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the {world} ranks.")
        per_rank = config.batch_size // world
        rank_slice = slice(rank * per_rank, (rank + 1) * per_rank)

    if config.kind == "cross_layer_transcoder":  # one dictionary over every layer; its rate from a layer's width
        from .cross_layer import cross_layer_dictionary_config

        dict_cfgs = [cross_layer_dictionary_config(config, widths, model_name)]
    else:
        dict_cfgs = [_dictionary_config(config, hook_in, hook_out, widths, model_name)
                     for hook_in, hook_out in my_pairs]
    lrs = _dictionary_lrs(config, [dict_cfg.d_sae for dict_cfg in dict_cfgs])
    if not config.lr:
        # One rate is recorded (config.json, messages) and resumed against: the smallest, that of the widest
        # dictionary; each dictionary trains at its own (a different width where hooks differ in width).
        config = dataclasses.replace(config, lr=min(lrs))
    store = ActivationStore(source, widths, config.batch_size, config.buffer_bytes, device=device,
                            seed=config.seed, max_rows=config.batch_size * config.n_steps)
    kl_objective = None
    if config.kl_coefficient > 0:  # a text dataset and a model: check_kl_config refused the rest
        from .kl_objective import SplicedKL, kl_token_rows

        held_out = len(eval_tokens) if eval_tokens is not None else 0
        kl_objective = SplicedKL(config, model, kl_token_rows(config, model, held_out), special_ids,
                                 rank if sync else 0, world if sync else 1)
    if config.kind == "cross_layer_transcoder":  # one dictionary over every layer: see cross_layer.py
        from .cross_layer import CROSS_LAYER_NAME, train_cross_layer

        result = train_cross_layer(config, store, widths, model_name, device, sync, rank_slice, model, eval_tokens,
                                   special_ids, kl_objective=kl_objective)
        result["diagnosis"] = _diagnose(result, [(config, dict_cfgs[0].d_sae)], [CROSS_LAYER_NAME])
        _write_outputs(config, result, [CROSS_LAYER_NAME], replicated=sync)
        return result
    trainers, names = [], []
    for (hook_in, _), dict_cfg, lr in zip(my_pairs, dict_cfgs, lrs, strict=True):
        trainer_config = config if lr == config.lr else dataclasses.replace(config, lr=lr)
        trainers.append(DictionaryTrainer(trainer_config, dict_cfg, device, sync_gradients=sync))
        names.append(output_name(hook_in))
    eval_fn = None
    if model is not None and eval_tokens is not None and len(eval_tokens):
        from .metrics import evaluate_spliced

        def eval_fn(dictionaries: list[Dictionary]) -> list[dict[str, float]]:
            return evaluate_spliced(model, dictionaries, eval_tokens, special_ids)

    result = Trainer(config, trainers, names, store, rank_slice=rank_slice, eval_fn=eval_fn,
                     kl_objective=kl_objective).run()
    result["diagnosis"] = _diagnose(result, [(t.config, t.dict_cfg.d_sae) for t in trainers], names)
    _write_outputs(config, result, names, replicated=sync)
    return result


def _diagnose(result: dict[str, Any], settings: list[tuple[TrainConfig, int]], names: list[str]) -> dict[str, Any]:
    """``{name: {"problems", "advice"}}`` for every poor dictionary of this rank (see ``diagnosis``); ``settings``:
    each dictionary's training config and latent count."""
    found = {}
    for (c, d_sae), name in zip(settings, names, strict=True):
        verdict = diagnose(result["per_dictionary"][name], lr=c.lr, d_sae=d_sae, k=c.k,
                           architecture=c.architecture, steps=result["steps"], total_tokens=c.total_tokens,
                           drop=fvu_drop(result["history"], name, c.n_steps), batch_size=c.batch_size)
        if verdict is not None:
            found[name] = verdict
    return found


def _special_ids(model: Any) -> list[int]:
    return special_token_ids(model.tokenizer) if model.tokenizer is not None else []


def _stream_source(config: TrainConfig, model: Any, hooks: list[str], special_ids: list[int], rank: int,
                   world: int) -> tuple[StreamSource, torch.Tensor]:
    """The streamed training rows of ``config.dataset`` and the held-out rows ``[n_eval, ctx]`` before them.

    Every rank reads the same stream (data-parallel ranks share each model batch's forward and gather the
    rows, see ModelSource); the first ``n_eval`` rows of every epoch are held out for the evaluation.
    """
    from ..data import ShuffledRows, TokenRows, open_documents

    documents = open_documents(config.dataset, config.dataset_split, config.dataset_config, config.text_column)
    vocab = int(model.cfg.d_vocab)
    eval_tokens = held_out_rows(documents, model.tokenizer, config.context_size, config.eval_sequences, vocab)
    rows: Any = TokenRows(documents, model.tokenizer, config.context_size, repeat=config.repeat_dataset,
                          skip_rows=len(eval_tokens), vocab_size=vocab)
    shuffled = None
    if config.shuffle_buffer_tokens:
        shuffled = rows = ShuffledRows(rows, max(1, config.shuffle_buffer_tokens // config.context_size),
                                       seed=config.seed)
    source = StreamSource(model, rows, hooks, config.model_batch_size, special_ids, config.drop_special_tokens,
                          rank=rank, world_size=world, needed_tokens=config.total_tokens, batch_size=config.batch_size)
    if shuffled is not None:
        # The rows the store will ask for (whole model batches): read no more, so a buffer that large
        # shuffles exactly the rows trained on.
        forwards = math.ceil(config.batch_size * config.n_steps / (config.model_batch_size * source.tokens_per_row))
        shuffled.read_limit = forwards * config.model_batch_size
    return source, eval_tokens


def _eval_tokens_from_manifest(manifest: dict[str, Any], model: Any, config: TrainConfig) -> torch.Tensor | None:
    """Held-out sequences for the spliced evaluation: the rows the cache left out at its dataset's start.

    Caches written before ``held_out_sequences`` was recorded give their dataset's first rows (which they
    also cached, so the evaluation is then on training text).
    """
    from ..data import TokenRows, open_documents

    dataset = manifest.get("dataset")
    n_eval = min(config.eval_sequences, int(manifest.get("held_out_sequences", config.eval_sequences)))
    if not dataset or model.tokenizer is None or n_eval <= 0:
        return None
    try:
        documents = open_documents(dataset, manifest.get("dataset_split", "train"),
                                   manifest.get("dataset_config", ""), manifest.get("text_column", "text"))
        rows = TokenRows(documents, model.tokenizer, int(manifest.get("context_size", config.context_size)),
                         repeat=False)
        return rows.next_rows(n_eval)
    except (OSError, ValueError):  # the cache's dataset moved or is gone: train without the evaluation
        return None


def _write_outputs(config: TrainConfig, result: dict[str, Any], names: list[str], replicated: bool) -> None:
    """Save this rank's dictionaries and, on rank 0, the metrics. ``replicated``: every rank holds the same
    dictionaries (data parallel), so rank 0 alone saves them: two ranks swapping one directory in at once race."""
    out = Path(config.out)
    if distributed.rank() == 0:
        all_names = [output_name(hook_in) for hook_in, _ in config.pairs]
        _remove_stale(config, out, all_names)
    if distributed.rank() == 0 or not replicated:
        for name, dictionary in zip(names, result["dictionaries"], strict=False):
            dictionary.save(str(out / name))
    gathered = distributed.gather_objects({"per_dictionary": result["per_dictionary"],
                                           "tokens_per_second": result["tokens_per_second"],
                                           "diagnosis": result["diagnosis"]})
    if distributed.rank() != 0:
        return
    per_dictionary: dict[str, Any] = {}
    diagnosis: dict[str, Any] = {}
    for part in gathered:
        per_dictionary.update(part["per_dictionary"])  # type: ignore[index]
        diagnosis.update(part["diagnosis"])  # type: ignore[index]
    result["diagnosis"] = diagnosis

    def mean(key: str) -> float | None:
        values = [m[key] for m in per_dictionary.values() if m.get(key) is not None and not math.isnan(m[key])]
        return sum(values) / len(values) if values else None

    metrics = {
        "l0": mean("l0"), "fvu": mean("fvu"), "mse": mean("mse"), "dead_fraction": mean("dead_fraction"),
        "dense_fraction": mean("dense_fraction"), "ce_loss_recovered": mean("ce_loss_recovered"),
        "kl": mean("kl"),
        # Data-parallel ranks each process a slice of the same global batches: the run's throughput is
        # the slowest rank's. Distributed dictionaries share the tokens too.
        "tokens_per_second": min(part["tokens_per_second"] for part in gathered),  # type: ignore[index]
        "steps": result["steps"], "tokens": result["tokens"], "world_size": distributed.world_size(),
        "dictionaries": per_dictionary,
        # Every poor dictionary with what is poor and what to change; empty when none is.
        "diagnosis": diagnosis, "diagnosis_thresholds": THRESHOLDS,
        "history": result["history"],
    }
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", config.to_dict())
    if diagnosis:
        print(format_diagnosis(diagnosis), file=sys.stderr, flush=True)
