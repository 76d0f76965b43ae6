"""Do the training defaults converge? A default run against a learning-rate sweep at the same token budget.

stories260k, TopK SAE on ``blocks.2.hook_resid_pre`` (k 8, 512 latents: the setting of the end-to-end
comparison), trained on ``train_head.txt``; every run is evaluated by one function on held-out text
(``valid_head.txt``, never trained on): FVU, CE loss recovered (spliced in vs zero-ablated) and the fraction of
latents that never fire there. The default run leaves ``lr``, ``batch_size`` and ``lr_warmup_steps`` to
``featcircuits.training.defaults``; the sweep runs the same batch size and warm-up at fixed learning rates.

    OMP_NUM_THREADS=1 python benchmarks/train_defaults.py --budgets 300000,2000000

Last lines, one per budget: ``budget=<n> default_fvu=<a> best_sweep_fvu=<b> ratio=<a/b>``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featcircuits.data import TokenRows, open_documents, special_token_ids  # noqa: E402
from featcircuits.models import load_model  # noqa: E402
from featcircuits.training import TrainConfig, run_training  # noqa: E402
from featcircuits.training.defaults import default_batch_size, default_lr, default_warmup_steps  # noqa: E402
from featcircuits.training.metrics import evaluate_spliced  # noqa: E402

SHARED = ROOT.parent / "shared"
MODEL = SHARED / "models" / "stories260k"
TRAIN_TEXT = SHARED / "data" / "tinystories" / "train_head.txt"
HELD_OUT_TEXT = SHARED / "data" / "tinystories" / "valid_head.txt"
HOOK = "blocks.2.hook_resid_pre"


def held_out_metrics(model, dictionary, rows: torch.Tensor, special: list[int]) -> dict[str, float]:
    """FVU and CE recovered on ``rows [n, ctx]`` and the fraction of latents that never fire on them."""
    metrics = evaluate_spliced(model, [dictionary], rows, special)[0]
    keep = ~torch.isin(rows, torch.tensor(special))
    with torch.no_grad():
        _, cache = model.run_with_cache(rows, names_filter=HOOK, stop_at_layer=3)
        acts = dictionary.encode(cache[HOOK][keep])
    dead = float((acts > 0).sum(0).eq(0).float().mean())
    return {"fvu": metrics["fvu"], "ce_loss_recovered": metrics["ce_loss_recovered"], "dead_fraction": dead,
            "l0": metrics["l0"]}


def train_once(args, budget: int, lr: float, out: Path) -> tuple[object, dict, float]:
    config = TrainConfig(model=str(MODEL), dataset=str(TRAIN_TEXT), hooks=[HOOK], out=str(out), architecture="topk",
                         k=args.k, d_sae=args.d_sae, total_tokens=budget, lr=lr, context_size=128,
                         model_batch_size=32, seed=args.seed, progress=False, device="cpu", overwrite=True)
    started = time.perf_counter()
    result = run_training(config)
    return result["dictionaries"][0], json.loads((out / "config.json").read_text()), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="300000,2000000", help="token budgets, comma-separated")
    parser.add_argument("--lrs", default="2.5e-4,5e-4,1e-3,2e-3,4e-3,8e-3", help="the sweep's learning rates")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every run's figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_model(str(MODEL), device="cpu")
    special = special_token_ids(model.tokenizer)
    held_out = TokenRows(open_documents(HELD_OUT_TEXT), model.tokenizer, 128, repeat=False).next_rows(10_000)
    print(f"uptime: {os.popen('uptime').read().strip()}")
    print(f"settings: {HOOK}, TopK k {args.k}, {args.d_sae} latents, context 128, train {TRAIN_TEXT.name}, "
          f"held out {HELD_OUT_TEXT.name} ({len(held_out)} rows), seed {args.seed}, threads {torch.get_num_threads()}")
    records, summary = [], []
    for budget in [int(b) for b in args.budgets.split(",")]:
        batch = default_batch_size(budget)
        print(f"budget {budget}: batch {batch}, {budget // batch} steps, warm-up {default_warmup_steps(budget // batch)}"
              f" steps, default lr {default_lr(args.d_sae):.3g}", flush=True)
        results = {}
        for label, lr in [("default", 0.0)] + [(f"lr={lr}", float(lr)) for lr in args.lrs.split(",")]:
            with tempfile.TemporaryDirectory() as tmp:
                dictionary, config, seconds = train_once(args, budget, lr, Path(tmp) / "run")
            metrics = held_out_metrics(model, dictionary, held_out, special)
            record = {"budget": budget, "run": label, "lr": config["lr"], "batch_size": config["batch_size"],
                      "lr_warmup_steps": config["lr_warmup_steps"], "seconds": round(seconds, 1), **metrics}
            records.append(record)
            results[label] = metrics
            print(f"  {label:>12}  lr {config['lr']:.3g}  FVU {metrics['fvu']:.4f}  CE recovered "
                  f"{metrics['ce_loss_recovered']:.4f}  dead {metrics['dead_fraction']:.3f}  L0 {metrics['l0']:.1f}  "
                  f"{seconds:.0f} s  (load {os.getloadavg()[0]:.1f})", flush=True)
        best = min((m["fvu"], label) for label, m in results.items() if label != "default")
        default_fvu = results["default"]["fvu"]
        summary.append(f"budget={budget} default_fvu={default_fvu:.4f} best_sweep_fvu={best[0]:.4f} "
                       f"ratio={default_fvu / best[0]:.3f} best_sweep={best[1]}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    print(f"uptime: {os.popen('uptime').read().strip()}")
    for line in summary:
        print(line)
    if any(not math.isfinite(r["fvu"]) for r in records):
        sys.exit(1)


if __name__ == "__main__":
    main()
