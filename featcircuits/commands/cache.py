"""featcircuits cache --model PATH --hook NAME [--hook NAME ...] --dataset DATASET --out DIR"""

from __future__ import annotations

import argparse

from ._checks import non_negative_int, positive_int

HELP = "Write a model's activations at chosen hooks to safetensors shards (resumable) for training."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF checkpoint dir or TransformerLens model name")
    parser.add_argument("--hook", action="append", required=True,
                        help="hook to cache (repeatable; give a transcoder's input and output hooks both)")
    parser.add_argument("--dataset", required=True,
                        help="text file or directory, .jsonl/.parquet/.arrow file, or Hugging Face dataset id")
    parser.add_argument("--dataset-split", default="train", help="Hugging Face dataset split")
    parser.add_argument("--dataset-config", default="", help="Hugging Face dataset configuration (subset)")
    parser.add_argument("--text-column", default="text", help="text column (else input_ids/tokens)")
    parser.add_argument("--out", required=True, help="cache directory (an interrupted one is resumed)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--context-size", type=positive_int, default=128)
    parser.add_argument("--tokens", type=non_negative_int, default=0, help="stop after about this many tokens (0: whole dataset)")
    parser.add_argument("--rows-per-shard", type=positive_int, default=65536)
    parser.add_argument("--model-batch-size", type=positive_int, default=32, help="sequences per model forward")
    parser.add_argument("--eval-sequences", type=non_negative_int, default=16,
                        help="rows at the dataset's start left out of the cache, for training's evaluation")
    parser.add_argument("--device", default="", help="cpu, cuda, ...")
    parser.add_argument("--keep-special-tokens", action="store_true", help="keep BOS/pad positions")


def run(args: argparse.Namespace) -> int:
    from .._paths import output_dir
    from ..data import TokenRows, describe_dataset, open_documents
    from ..models import load_model
    from ..training.cache import write_cache
    from ..training.distributed import local_device
    from ..training.sources import StreamSource
    from ..training.tokens import held_out_rows, special_token_ids

    output_dir(args.out, "--out")  # before any work: a file in the way or a read-only disk fails now
    model = load_model(args.model, device=local_device(args.device))
    documents = open_documents(args.dataset, args.dataset_split, args.dataset_config, args.text_column)
    vocab = int(model.cfg.d_vocab)
    n_eval = len(held_out_rows(documents, model.tokenizer, args.context_size, args.eval_sequences, vocab))
    rows = TokenRows(documents, model.tokenizer, args.context_size, repeat=False, skip_rows=n_eval, vocab_size=vocab)
    n_sequences = -(-args.tokens // args.context_size) if args.tokens else None
    source = StreamSource(model, rows, args.hook, args.model_batch_size, special_token_ids(model.tokenizer),
                          drop_special=not args.keep_special_tokens, max_rows=n_sequences, stop_at_end=True)
    metadata = {
        "model_name": model.cfg.model_name, "model_path": str(args.model),
        "dataset": describe_dataset(args.dataset), "context_size": args.context_size,
        "drop_special_tokens": not args.keep_special_tokens, "held_out_sequences": n_eval,
    }
    for key, default in (("dataset_split", "train"), ("dataset_config", ""), ("text_column", "text")):
        if getattr(args, key) != default:
            metadata[key] = getattr(args, key)
    manifest = write_cache(source, args.out, args.hook, source.widths(), n_sequences, dtype=args.dtype,
                           rows_per_shard=args.rows_per_shard, metadata=metadata)
    rows_cached = sum(shard["rows"] for shard in manifest["shards"])
    shards = len(manifest["shards"])
    verb = "reused the cache of" if manifest.get("reused") else "cached"
    written = ""
    if "writer" in manifest:  # what this run wrote, and how long the model waited for the disk
        stats = manifest["writer"]
        written = f"; wrote {stats['bytes'] / 1e6:.1f} MB, the model waited {stats['wait_seconds']:.1f} s for the disk"
    print(f"{verb} {rows_cached} rows of {len(manifest['hooks'])} hooks in {shards} shard{'s' * (shards != 1)} "
          f"({args.dtype}): {args.out}{written}")
    return 0
