"""Our ACDC (speculative batched chains guided by AtP; each pattern's forward starts at the first layer it
changes and runs featcircuits' own blocks over each prompt's window of changed positions, the last block at
the last token; edges into nodes that left the circuit decided without a forward) vs the straightforward
one-forward-per-edge ACDC (each forward runs the whole model through transformer_lens's hooks).

    python benchmarks/acdc_speed.py [--tau 0.02] [--threads 1] [--batch-size 32]

Task: stories260k repeats the name of a story's character (clean "...a boy named Lily/Tim..." vs corrupt
with the other name; answer = the clean name, distractor = the other). Component edges (embed, 40 heads,
5 MLPs, logits), patch ablation, logit-difference metric. Both runs walk the same edges in the same
order with the same threshold; the benchmark checks they keep the same circuit and prints forward
passes and wall time of each. Last line: ``naive_forwards=<a> batched_forwards=<b> naive_s=<x> batched_s=<y>``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

TEMPLATES = [
    "Once upon a time, there was a boy named {}. He had a big red ball. Every day,",
    "Once upon a time, there was a little girl named {}. She liked to play outside. One day,",
    "Once upon a time, {} went to the park with her mom. At the park,",
    "There was a little girl named {}. She was very happy. One day,",
]


def name_task_pairs() -> list[dict]:
    pairs = []
    for template in TEMPLATES:
        for name, other in (("Lily", "Tim"), ("Tim", "Lily")):
            pairs.append({"clean": template.format(name), "corrupt": template.format(other), "answer": name,
                          "distractor": other})
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260k"))
    parser.add_argument("--tau", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from featcircuits import load_model
    from featcircuits.circuits import ComponentGraph, ContrastiveTask, acdc

    model = load_model(args.model)
    task = ContrastiveTask.from_pairs(model, name_task_pairs())
    graph = ComponentGraph(model, task, ablation="patch", max_copies=args.batch_size)
    # the straightforward evaluator: every forward runs the whole model
    plain = ComponentGraph(model, task, ablation="patch", max_copies=args.batch_size, skip_clean_prefix=False)
    n_edges = len(graph.edge_ids)
    order = list(reversed(range(n_edges)))
    with torch.no_grad():
        ends = graph.edge_metric(torch.stack([torch.ones(n_edges), torch.zeros(n_edges)]))
    gap = float((ends[0] - ends[1]).abs())
    print(f"task: {len(task)} pairs, logit diff clean {ends[0]:.3f}, all edges patched {ends[1]:.3f}; "
          f"{n_edges} edges, tau={args.tau}")

    start = time.perf_counter()
    naive = acdc(plain.edge_metric, order, n_edges, args.tau, batch_size=1, reference_gap=gap)
    naive_s = time.perf_counter() - start
    print(f"one forward per edge: {naive.forwards} forwards, {naive_s:.1f}s, {int(naive.keep.sum())} edges kept")

    patterns = 0

    def counted(keep: torch.Tensor) -> torch.Tensor:  # ablation patterns evaluated, speculative ones included
        nonlocal patterns
        patterns += keep.shape[0]
        return graph.edge_metric(keep)

    start = time.perf_counter()
    forwards_before = graph.forwards
    guess = graph.edge_attribution().abs() >= args.tau * gap  # one forward + backward, counted below
    batched = acdc(counted, order, n_edges, args.tau, batch_size=args.batch_size, reference_gap=gap,
                   predicted_keep=guess, edges=graph.edge_ids)
    batched_s = time.perf_counter() - start
    batched_forwards = graph.forwards - forwards_before
    print(f"ours (AtP-guided chain of {args.batch_size}, own blocks over the changed positions): {batched_forwards} forwards "
          f"(incl. 1 AtP forward), "
          f"{batched_s:.1f}s, {int(batched.keep.sum())} edges kept; {patterns} ablation patterns "
          f"({1000 * batched_s / patterns:.1f} ms each, against {1000 * naive_s / naive.forwards:.1f} ms per "
          "one-pattern forward); "
          f"{int((batched.scores == 0).sum())} edges into nodes that had left the circuit decided without a forward")
    same = torch.equal(naive.keep, batched.keep)
    print(f"same circuit: {same}; {naive.forwards / batched_forwards:.1f}x fewer forwards, "
          f"{naive_s / batched_s:.1f}x less time")
    if not same:
        raise SystemExit("the batched ACDC kept a different circuit")
    print(f"naive_forwards={naive.forwards} batched_forwards={batched_forwards} naive_s={naive_s:.2f} "
          f"batched_s={batched_s:.2f}")


if __name__ == "__main__":
    main()
