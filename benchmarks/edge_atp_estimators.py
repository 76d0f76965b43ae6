"""Edge AtP estimators against measured single-edge ablation effects on the bundled-size real model.

    python benchmarks/edge_atp_estimators.py [--ablation patch]

stories260k, the name-repetition task of benchmarks/acdc_speed.py (8 pairs, logit difference), 941 component
edges. Every edge is ablated alone (one batched pattern each) to measure its effect, and each AtP estimator
(``receivers`` = linear: plain AtP/EAP; exact: receivers rerun, AtP*'s QK fix extended; secant: exact plus the
receiver's node effect along its own ablation; see featcircuits/circuits/receivers.py) is compared with it:
Pearson correlation, error relative to the largest effect, and ROC AUC of |score| for the edges whose measured
|effect| is at least ``--tau`` of the metric gap. Last line: ``<receivers>_pearson=<r> ...`` per estimator.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260k"))
    parser.add_argument("--ablation", default="patch", choices=("zero", "mean", "patch"))
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from acdc_speed import name_task_pairs

    from featcircuits import load_model
    from featcircuits.circuits import ComponentGraph, ContrastiveTask, roc_auc

    model = load_model(args.model)
    task = ContrastiveTask.from_pairs(model, name_task_pairs())
    graph = ComponentGraph(model, task, ablation=args.ablation)
    n_edges = len(graph.edge_ids)
    start = time.time()
    with torch.no_grad():
        ends = graph.edge_metric(torch.stack([torch.ones(n_edges), torch.zeros(n_edges)]))
        measured = graph.edge_metric(1.0 - torch.eye(n_edges)) - graph.full_metric
    gap = float((ends[0] - ends[1]).abs())
    important = measured.abs() >= args.tau * gap
    print(f"{n_edges} edges, {args.ablation} ablation, metric gap {gap:.3f}; {int(important.sum())} edges with "
          f"|effect| >= {args.tau} of it; single-edge ablations measured in {time.time() - start:.0f}s")
    figures = []
    for receivers in ("linear", "exact", "secant"):
        start = time.time()
        scores = graph.edge_attribution(receivers=receivers).detach()
        seconds = time.time() - start
        pearson = float(torch.corrcoef(torch.stack([scores, measured]))[0, 1])
        error = float((scores - measured).abs().max() / measured.abs().max())
        auc = roc_auc(scores.abs(), important)
        print(f"{receivers:6s}: pearson {pearson:.3f}, max error {error:.3f} of the largest effect, ROC AUC {auc:.3f} "
              f"({seconds:.1f}s)")
        figures.append(f"{receivers}_pearson={pearson:.4f} {receivers}_roc={auc:.4f}")
    print(" ".join(figures))


if __name__ == "__main__":
    main()
