"""Feature-edge circuits: the memory plan's estimated peak beside the peak resident size a process reaches.

    python benchmarks/feature_edge_memory.py [--pairs 1] [--settings "0,1,2,3 acdc 32 all" ...]

The bundled model and its transcoders on the first ``--pairs`` pairs of its docstring task, patch ablation.
Each setting (``layers method batch_size max_edges``) runs in a fresh process: the per-position feature/error
nodes are built, then ``featcircuits.circuits.edge_memory.estimate_feature_edge_memory`` plans the search,
then, measured from there (glibc's freed memory handed back, Linux's peak resident size reset), the feature
edges are built, searched (ACDC pre-filtered to 64 edges, whose chains still carry every edge; or AtP, the
top 100), evaluated over the default size sweep and saved. Last line:
``estimate_over_measured_min=<a> estimate_over_measured_max=<b>`` over the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SETTINGS = ["0,1,2,3 acdc 32 all", "0,1,2,3 atp 32 all", "0,1,2,3 acdc 8 all", "2,3 acdc 32 all",
                    "2,3 acdc 32 50000"]


def measure(pairs: int, setting: str) -> dict:
    """One setting in this process (call it in a fresh one): the plan and the measured peak, in bytes."""
    import ctypes
    import time

    import torch

    from featcircuits import load_dictionaries, load_model
    from featcircuits.circuits import ContrastiveTask, FeatureGraph, evaluate, find_circuit
    from featcircuits.circuits.edge_memory import estimate_feature_edge_memory
    from featcircuits.patching.replacement import ReplacementModel

    torch.set_num_threads(1)
    layers, method, batch, limit = setting.split()
    max_edges = None if limit == "all" else int(limit)

    def status(key: str) -> int:
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    bundled = REPO / "featcircuits" / "pretrained" / "bundled"
    model = load_model(bundled)
    loaded = load_dictionaries(bundled / "transcoders")
    wanted = {int(layer) for layer in layers.split(",")}
    dictionaries = [d for d in (loaded.values() if isinstance(loaded, dict) else loaded) if d.cfg.layer in wanted]
    replacement = ReplacementModel(model, dictionaries)
    task = ContrastiveTask.from_pairs(model, json.loads((bundled / "docstring_task.json").read_text())[:pairs])
    nodes = FeatureGraph(replacement, task, ablation="patch", max_copies=int(batch))
    plan = estimate_feature_edge_memory(nodes, max_edges, int(batch), method)
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base, start = status("VmRSS"), time.perf_counter()
    kwargs = {"prefilter": 64} if method == "acdc" else {"top_k": 100}
    circuit = find_circuit(replacement, task, method, level="edges", graph=nodes, batch_size=int(batch),
                           max_edges=max_edges, memory_budget_gb=1024, **kwargs)
    evaluate(circuit)
    circuit.save(Path(os.environ.get("TMPDIR", "/tmp")) / f"feature_edge_memory_{os.getpid()}.json")
    return {"nodes": len(nodes.node_ids), "edges": len(circuit.edge_ids), "planned_edges": plan.n_edges,
            "stages": plan.stages, "estimate": plan.peak, "measured": status("VmHWM") - base,
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help='each "layers method batch_size max_edges", e.g. "0,1,2,3 acdc 32 all"')
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run one setting here, print its figures as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.pairs, args.one)))
        return
    if not os.access("/proc/self/clear_refs", os.W_OK):
        raise SystemExit("the peak resident size is measured through Linux's /proc/self/clear_refs")
    ratios = []
    mib = 2**20
    print(f"{'setting':24s} {'nodes':>6s} {'edges':>9s} {'estimate':>9s} {'measured':>9s} {'ratio':>6s} {'s':>5s}  stages")
    for setting in args.settings:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, __file__, "--pairs", str(args.pairs), "--one", setting], env=env,
                              capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        ratios.append(r["estimate"] / r["measured"])
        stages = " ".join(f"{k} {v / mib:.0f}" for k, v in r["stages"].items())
        print(f"{setting:24s} {r['nodes']:6d} {r['edges']:9d} {r['estimate'] / mib:7.0f}MB {r['measured'] / mib:7.0f}MB "
              f"{ratios[-1]:6.2f} {r['seconds']:5.0f}  {stages} MB", flush=True)
    print(f"estimate_over_measured_min={min(ratios):.2f} estimate_over_measured_max={max(ratios):.2f}")


if __name__ == "__main__":
    main()
