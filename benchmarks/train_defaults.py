"""Do the training defaults converge? A default run against a learning-rate sweep at the same token budget.

stories260k, TopK SAE on ``blocks.2.hook_resid_pre`` (k 8, 512 latents: the setting of the end-to-end
comparison), trained on ``train_head.txt``; every run is evaluated by one function on held-out text
(``valid_head.txt``, never trained on): FVU, CE loss recovered (spliced in vs zero-ablated) and the fraction of
latents that never fire there. The default run (``run_training``) leaves ``lr``, ``batch_size`` and
``lr_warmup_steps`` to ``featcircuits.training.defaults``. The sweep trains one dictionary per fixed learning
rate, with the default batch size and warm-up, all from one model forward: every dictionary is fed the very
batches the default run trains on (same rows, same shuffle), so the sweep costs one run's model work.

    OMP_NUM_THREADS=1 python benchmarks/train_defaults.py --budgets 300000,2000000

Last lines, one per budget: ``budget=<n> default_fvu=<a> best_sweep_fvu=<b> ratio=<a/b>``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featcircuits.data import TokenRows, open_documents, special_token_ids  # noqa: E402
from featcircuits.dictionaries import load_dictionary  # noqa: E402
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


def _config(args, budget: int, lr: float, out: Path) -> TrainConfig:
    return TrainConfig(model=str(MODEL), dataset=str(TRAIN_TEXT), hooks=[HOOK], out=str(out), architecture="topk",
                       k=args.k, d_sae=args.d_sae, total_tokens=budget, lr=lr, context_size=128, model_batch_size=32,
                       seed=args.seed, progress=False, device="cpu", overwrite=True)


def _default_run(config: TrainConfig) -> float:
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    started = time.perf_counter()
    run_training(config)
    return time.perf_counter() - started


def default_run(args, budget: int, out: Path, pool) -> tuple[object, dict, float]:
    """The default run, in ``pool`` (a process beside the sweep) when given; its dictionary read back from disk."""
    config = _config(args, budget, 0.0, out)
    seconds = pool.submit(_default_run, config).result() if pool is not None else _default_run(config)
    return load_dictionary(out / HOOK), json.loads((out / "config.json").read_text()), seconds


def sweep(args, model, budget: int, lrs: list[float], out: Path) -> tuple[list[object], float]:
    """One dictionary per learning rate, trained side by side on the default run's batches."""
    from featcircuits.training.api import _dictionary_config, _stream_source, _with_run_defaults
    from featcircuits.training.dictionary_trainer import DictionaryTrainer
    from featcircuits.training.store import ActivationStore
    from featcircuits.training.trainer import Trainer

    started = time.perf_counter()
    config = _with_run_defaults(_config(args, budget, lrs[0], out))
    torch.manual_seed(config.seed)
    source, _ = _stream_source(config, model, [HOOK], special_token_ids(model.tokenizer), 0, 1)
    widths = source.widths()
    store = ActivationStore(source, widths, config.batch_size, config.buffer_bytes, device="cpu", seed=config.seed,
                            max_rows=config.batch_size * config.n_steps)
    dict_cfg = _dictionary_config(config, HOOK, HOOK, widths, model.cfg.model_name)
    trainers = [DictionaryTrainer(dataclasses.replace(config, lr=lr), dict_cfg, torch.device("cpu")) for lr in lrs]
    result = Trainer(config, trainers, [f"lr{i}" for i in range(len(lrs))], store).run()
    return result["dictionaries"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", default="300000,2000000", help="token budgets, comma-separated")
    parser.add_argument("--lrs", default="5e-4,1e-3,2e-3,4e-3,8e-3,1.6e-2,3.2e-2", help="the sweep's learning rates")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument("--parallel", action="store_true", help="run the default run beside the sweep (2 processes)")
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
              f" steps, default lr {default_lr(args.d_sae, batch):.3g}", flush=True)
        results = {}
        lrs = [float(lr) for lr in args.lrs.split(",")]
        with tempfile.TemporaryDirectory() as tmp:
            if args.parallel:
                # The default run in a second process while this one sweeps: two cores, half the wall time.
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    pending = pool.submit(_default_run, _config(args, budget, 0.0, Path(tmp) / "default"))
                    swept, sweep_seconds = sweep(args, model, budget, lrs, Path(tmp) / "sweep")
                    seconds = pending.result()
                out = Path(tmp) / "default"
                dictionary, config = load_dictionary(out / HOOK), json.loads((out / "config.json").read_text())
            else:
                dictionary, config, seconds = default_run(args, budget, Path(tmp) / "default", None)
                swept, sweep_seconds = sweep(args, model, budget, lrs, Path(tmp) / "sweep")
        runs = [("default", config["lr"], dictionary, seconds)]
        runs += [(f"lr={lr:g}", lr, d, sweep_seconds) for lr, d in zip(lrs, swept, strict=True)]
        for label, lr, trained, wall in runs:
            metrics = held_out_metrics(model, trained, held_out, special)
            record = {"budget": budget, "run": label, "lr": lr, "batch_size": config["batch_size"],
                      "lr_warmup_steps": config["lr_warmup_steps"], "seconds": round(wall, 1), **metrics}
            records.append(record)
            results[label] = metrics
            print(f"  {label:>12}  lr {lr:.3g}  FVU {metrics['fvu']:.4f}  CE recovered "
                  f"{metrics['ce_loss_recovered']:.4f}  dead {metrics['dead_fraction']:.3f}  L0 {metrics['l0']:.1f}  "
                  f"{wall:.0f} s{' (whole sweep)' if label != 'default' else ''}  (load {os.getloadavg()[0]:.1f})",
                  flush=True)
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
