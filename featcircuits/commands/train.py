"""featcircuits train CONFIG [--set key=value ...] | featcircuits train --model PATH --hook NAME ..."""

from __future__ import annotations

import argparse

HELP = "Train SAEs or transcoders on a model's activations (from text or an activation cache)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML/JSON TrainConfig file (flags below override it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any TrainConfig field, e.g. --set lr=3e-4 (repeatable)")
    parser.add_argument("--model", help="local HF checkpoint dir or TransformerLens model name")
    parser.add_argument("--hook", action="append", default=[], help="input hook of a dictionary (repeatable)")
    parser.add_argument("--hook-out", action="append", default=[],
                        help="output hook (transcoders), one per --hook")
    parser.add_argument("--kind", choices=["sae", "transcoder", "skip_transcoder", "cross_layer_transcoder"])
    parser.add_argument("--architecture", choices=["relu", "topk", "batchtopk", "jumprelu"])
    parser.add_argument("--k", type=int, help="active latents per token (topk, batchtopk)")
    parser.add_argument("--d-sae", type=int, help="number of latents")
    parser.add_argument("--tokens", type=int, help="training tokens")
    parser.add_argument("--batch-size", type=int, help="tokens per optimiser step (default: from --tokens)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default: from the number of latents)")
    parser.add_argument("--dataset", help="text file or directory, .jsonl/.parquet/.arrow file, Hugging Face dataset id "
                        "(streamed) or activation cache directory")
    parser.add_argument("--dataset-split", help="Hugging Face dataset split (default train)")
    parser.add_argument("--dataset-config", help="Hugging Face dataset configuration (subset) name")
    parser.add_argument("--text-column", help="text column of record datasets (default text; else input_ids/tokens)")
    parser.add_argument("--model-batch-size", type=int, help="sequences per model forward")
    parser.add_argument("--context-size", type=int, help="tokens per sequence, BOS included")
    parser.add_argument("--kl-coefficient", type=float,
                        help="end-to-end fine-tuning: weight of the KL from the model's next-token distribution to the "
                        "one with every dictionary spliced in, added to the reconstruction loss (default 0: off)")
    parser.add_argument("--kl-fraction", type=float,
                        help="final share of the steps that add the KL term (default 0.1; 1: the whole run)")
    parser.add_argument("--kl-sequences", type=int,
                        help="token rows per KL step (default: batch size / context size)")
    parser.add_argument("--out", help="output directory")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (0: none)")
    parser.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run in --out (its dictionaries this run does not write are removed)")
    parser.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE says otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


_FLAG_FIELDS = {
    "model": "model", "kind": "kind", "architecture": "architecture", "k": "k", "d_sae": "d_sae",
    "tokens": "total_tokens", "batch_size": "batch_size", "lr": "lr", "dataset": "dataset", "out": "out",
    "device": "device", "checkpoint_every": "checkpoint_every", "dataset_split": "dataset_split",
    "dataset_config": "dataset_config", "text_column": "text_column", "model_batch_size": "model_batch_size",
    "context_size": "context_size", "kl_coefficient": "kl_coefficient", "kl_fraction": "kl_fraction",
    "kl_sequences": "kl_sequences",
}


def build_config(args: argparse.Namespace):
    import math

    from ..training.config import TrainConfig, apply_overrides, load_train_config

    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        # TrainConfig.lr=0 means "from the dictionary width"; a flag that names a rate must name a usable one.
        raise ValueError(f"--lr {args.lr} trains nothing (or diverges): give a positive learning rate, e.g. --lr 1e-3, "
                         "or leave --lr out to take it from the dictionary width.")
    config = load_train_config(args.config) if args.config else TrainConfig()
    flags = []
    for flag, field in _FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            flags.append(f"{field}={value}")
    if args.hook:
        flags.append("hooks=" + ",".join(args.hook))
    if args.hook_out:
        flags.append("hooks_out=" + ",".join(args.hook_out))
        if args.kind is None and config.kind == "sae":
            flags.append("kind=transcoder")
    if args.resume:
        flags.append("resume=true")
    if args.overwrite:
        flags.append("overwrite=true")
    if args.wandb:
        flags.append("wandb=true")
    if args.no_progress:
        flags.append("progress=false")
    return apply_overrides(config, flags + args.overrides)


def run(args: argparse.Namespace) -> int:
    import json

    from ..training.api import run_training
    from ..training.distributed import rank

    config = build_config(args)
    config.validate()
    result = run_training(config)
    if rank() == 0:
        summary = {name: {key: metrics.get(key) for key in ("fvu", "l0", "ce_loss_recovered", "dead_fraction")}
                   for name, metrics in result["per_dictionary"].items()}
        # The poor dictionaries, with what to change, were also printed on stderr (see training.diagnosis).
        print(json.dumps({"out": config.out, "steps": result["steps"], "tokens": result["tokens"],
                          "tokens_per_second": round(result["tokens_per_second"], 1),
                          "dictionaries": summary, "poor": result["diagnosis"]}))
    return 0
