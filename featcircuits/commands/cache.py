"""featcircuits cache --model PATH --hook NAME [--hook NAME ...] --dataset TEXTFILE --out DIR"""

from __future__ import annotations

import argparse

HELP = "Write a model's activations at chosen hooks to safetensors shards (resumable) for training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF checkpoint dir or TransformerLens model name")
    parser.add_argument("--hook", action="append", required=True,
                        help="hook to cache (repeatable; give a transcoder's input and output hooks both)")
    parser.add_argument("--dataset", required=True, help="text file")
    parser.add_argument("--out", required=True, help="cache directory (an interrupted one is resumed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=0, help="stop after about this many tokens (0: whole dataset)")
    parser.add_argument("--rows-per-shard", type=int, default=65536)
    parser.add_argument("--model-batch-size", type=int, default=32)
    parser.add_argument("--device", default="", help="cpu, cuda, ...")
    parser.add_argument("--keep-special-tokens", action="store_true", help="keep BOS/pad positions")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..models import load_model
    from ..training.cache import write_cache
    from ..training.distributed import local_device
    from ..training.sources import ModelSource
    from ..training.tokens import special_token_ids, tokenize_text_file

    model = load_model(args.model, device=local_device(args.device))
    tokens = tokenize_text_file(args.dataset, model.tokenizer, args.context_size)
    n_sequences = len(tokens)
    if args.tokens:
        n_sequences = min(n_sequences, -(-args.tokens // args.context_size))
    special = special_token_ids(model.tokenizer)
    source = ModelSource(model, tokens[:n_sequences], args.hook, args.model_batch_size, special,
                         drop_special=not args.keep_special_tokens, shuffle=False)
    metadata = {
        "model_name": model.cfg.model_name, "model_path": str(args.model),
        "dataset": str(Path(args.dataset).resolve()), "context_size": args.context_size,
        "drop_special_tokens": not args.keep_special_tokens,
    }
    manifest = write_cache(source, args.out, args.hook, source.widths(), n_sequences, dtype=args.dtype,
                           rows_per_shard=args.rows_per_shard, metadata=metadata)
    rows = sum(shard["rows"] for shard in manifest["shards"])
    shards = len(manifest["shards"])
    print(f"cached {rows} rows of {len(manifest['hooks'])} hooks in {shards} shard{'s' * (shards != 1)} ({args.dtype}): "
          f"{args.out}")
    return 0
