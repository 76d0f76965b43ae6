"""End-to-end KL fine-tuning on stories260k: the same recipe trained with and without the KL term.

Each run trains from the same seed on the same tokens (``kl_coefficient`` 0, then each value asked for) and
is measured on held-out text (TinyStories' validation head, never trained on): FVU per layer, CE loss
recovered and KL with every dictionary spliced in at once (what the KL term optimises), and each per-layer
dictionary's own CE recovered spliced alone. One JSON line per run, then a table.

    OMP_NUM_THREADS=1 python benchmarks/kl_finetune.py train/stories260k_transcoders.yaml --tokens 300000 \\
        --coefficients 0,30,100 --fraction 0.25
    OMP_NUM_THREADS=1 python benchmarks/kl_finetune.py --clt --tokens 300000 --coefficients 0,100
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
N_LAYERS = 5
HOOKS_IN = [f"blocks.{layer}.ln2.hook_normalized" for layer in range(N_LAYERS)]
HOOKS_OUT = [f"blocks.{layer}.hook_mlp_out" for layer in range(N_LAYERS)]
# A small CLT: 256 latents per layer (1280 in all), TopK k 16 per layer.
CLT_SETTINGS: dict[str, Any] = dict(hooks=HOOKS_IN, hooks_out=HOOKS_OUT, kind="cross_layer_transcoder", architecture="topk", k=16,
                    d_sae=256, batch_size=2048, lr=3e-3, lr_warmup_steps=20, dead_after_tokens=200_000,
                    context_size=128, model_batch_size=64, buffer_bytes=2**27, eval_sequences=32, seed=0)


def held_out_metrics(model, dictionaries, tokens, special_ids) -> dict[str, float]:
    from featcircuits.dictionaries import CrossLayerTranscoder
    from featcircuits.training.cross_layer import evaluate_cross_layer
    from featcircuits.training.kl_objective import evaluate_spliced_set
    from featcircuits.training.metrics import evaluate_spliced

    together = evaluate_spliced_set(model, dictionaries, tokens, special_ids)
    out = {"set_ce_loss_recovered": together["ce_loss_recovered"], "set_kl": together["kl"],
           "ce_clean": together["ce_clean"], "set_ce_spliced": together["ce_spliced"]}
    if isinstance(dictionaries[0], CrossLayerTranscoder):
        metrics = evaluate_cross_layer(model, dictionaries[0], tokens, special_ids)
        out.update({f"fvu_layer{m}": metrics[f"eval_fvu_layer{m}"] for m in range(N_LAYERS)})
        return out
    for layer, metrics in enumerate(evaluate_spliced(model, dictionaries, tokens, special_ids)):
        out[f"fvu_layer{layer}"] = metrics["fvu"]
        out[f"alone_ce_recovered_layer{layer}"] = metrics["ce_loss_recovered"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or '').splitlines()[0])
    parser.add_argument("recipe", nargs="?", help="a train/ YAML recipe (per-layer kinds); omit with --clt")
    parser.add_argument("--clt", action="store_true", help="a small cross-layer transcoder instead of a recipe")
    parser.add_argument("--tokens", type=int, default=300_000)
    parser.add_argument("--coefficients", default="0,100", help="kl_coefficient values, comma-separated (0: none)")
    parser.add_argument("--fraction", type=float, default=0.25, help="kl_fraction")
    parser.add_argument("--kl-sequences", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="the training seed of every run")
    parser.add_argument("--dataset", default=str(SHARED / "data/tinystories/train_head.txt"))
    parser.add_argument("--held-out", default=str(SHARED / "data/tinystories/valid_head.txt"))
    parser.add_argument("--out", default="runs/kl_finetune")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from featcircuits.models import load_model
    from featcircuits.training import TrainConfig, load_train_config, run_training
    from featcircuits.training.tokens import special_token_ids, tokenize_text_file

    if args.clt:
        base = TrainConfig(model=str(SHARED / "models/stories260k"), dataset=args.dataset, **CLT_SETTINGS)
    else:
        if not args.recipe:
            parser.error("give a recipe YAML or --clt")
        base = load_train_config(args.recipe)
    model = load_model(str(SHARED / "models/stories260k"), device="cpu")
    held_out = tokenize_text_file(args.held_out, model.tokenizer, base.context_size)[:64]
    special_ids = special_token_ids(model.tokenizer)
    print(f"# load: {os.getloadavg()}, threads {torch.get_num_threads()}, held-out rows {len(held_out)}")
    rows = []
    for coefficient in [float(c) for c in args.coefficients.split(",")]:
        config = TrainConfig.from_dict({
            **base.to_dict(), "model": str(SHARED / "models/stories260k"), "dataset": args.dataset,
            "total_tokens": args.tokens, "out": f"{args.out}/coef{coefficient:g}", "overwrite": True,
            "checkpoint_every": 0, "progress": False, "device": "cpu", "kl_coefficient": coefficient,
            "kl_fraction": args.fraction, "kl_sequences": args.kl_sequences, "seed": args.seed})
        started = time.perf_counter()
        result = run_training(config)
        seconds = time.perf_counter() - started
        metrics = held_out_metrics(model, result["dictionaries"], held_out, special_ids)
        row = {"kind": config.kind, "seed": args.seed, "kl_coefficient": coefficient, "kl_fraction": args.fraction,
               "tokens": result["tokens"], "seconds": round(seconds, 1),
               "train_tokens_per_second": round(result["tokens_per_second"]), "load": os.getloadavg()[0], **{k: round(v, 4) for k, v in metrics.items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    layers = " ".join(f"fvu{m}" for m in range(N_LAYERS))
    print(f"\n| kl_coefficient | {layers} | set CE recovered | set KL | seconds | training tokens/s |")
    for row in rows:
        fvus = " ".join(f"{row[f'fvu_layer{m}']:.3f}" for m in range(N_LAYERS))
        print(f"| {row['kl_coefficient']:g} | {fvus} | {row['set_ce_loss_recovered']:.3f} | {row['set_kl']:.4f} | "
              f"{row['seconds']} | {row['train_tokens_per_second']} |")


if __name__ == "__main__":
    main()
