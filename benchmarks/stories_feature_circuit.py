"""A feature circuit on stories260k with transcoders: <= 5% of the active feature nodes, faithfulness, completeness.

    featcircuits train train/stories260k_skip_transcoders.yaml --set out=/tmp/stc
    python benchmarks/stories_feature_circuit.py --dictionaries /tmp/stc

Task: ``--task FILE`` (a task JSON), by default the name-repetition pairs of benchmarks/acdc_speed.py (the model
is competent: logit difference 3.72). Nodes: every transcoder feature at every position whose clean and corrupt activations differ
(the active candidates) plus each site's error node per position; patch ablation. Features are ranked
by AtP-IG (8 steps) and by AtP; the circuit is the best 5% of feature nodes with the error nodes (they
stand for what the transcoders miss) chosen three ways (``find_circuit(errors=..., top_fraction=0.05)``):
ranked with the features on the same scores, as Sparse Feature Circuits does; all kept; all ablated (a
feature-only circuit). Then the ceiling of any
feature-only circuit: every feature kept, every error node ablated.
``--acdc-tau T ...`` also runs ACDC over feature nodes in the feature-only world (error nodes ablated from
the start; the ``--prefilter`` features with the largest AtP-IG scores tried, the rest removed; the walk
guided by those scores) and prints each circuit's size, faithfulness and completeness.
Last line: ``features=<k>/<n> errors=<e>/<m> faithfulness=<f> completeness=<c>`` (IG, errors ranked).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionaries", required=True)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260k"))
    parser.add_argument("--task", help="task JSON file (a list of {clean, corrupt, answer, distractor}); default: "
                                       "the name-repetition pairs of benchmarks/acdc_speed.py")
    parser.add_argument("--fraction", type=float, default=0.05)
    parser.add_argument("--acdc-tau", type=float, nargs="*", default=[],
                        help="also run feature-only ACDC at these tau (fractions of the metric gap)")
    parser.add_argument("--prefilter", type=int, default=None,
                        help="features ACDC tries (default: twice the 5%% budget)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from acdc_speed import name_task_pairs

    from featcircuits import load_dictionaries, load_model
    from featcircuits.circuits import ContrastiveTask, FeatureGraph, acdc, evaluate, find_circuit, load_task
    from featcircuits.patching.replacement import ReplacementModel

    model = load_model(args.model)
    loaded = load_dictionaries(args.dictionaries)
    replacement = ReplacementModel(model, list(loaded.values()) if isinstance(loaded, dict) else loaded)
    task = load_task(args.task, model) if args.task else ContrastiveTask.from_pairs(model, name_task_pairs())
    graph = FeatureGraph(replacement, task, ablation="patch", positions="each")
    features = torch.tensor([i for i, n in enumerate(graph.node_ids) if ":error@" not in n])
    errors = torch.tensor([i for i, n in enumerate(graph.node_ids) if ":error@" in n])
    budget = max(1, int(args.fraction * len(features)))
    print(f"task {args.task or 'names (benchmarks/acdc_speed.py)'}: {len(task)} pairs; {len(features)} active feature "
          f"nodes, {len(errors)} error nodes; full-model logit diff {graph.full_metric:.3f}; circuit: the best "
          f"{budget} feature nodes ({budget / len(features):.1%})")
    last = ""
    for method, steps in (("ig", 8), ("atp", 1)):
        # the error nodes three ways: ranked with the features on the same scores (Sparse Feature Circuits:
        # those above the last chosen feature join), every one kept, every one ablated (feature-only)
        for mode in ("rank", "keep", "ablate"):
            circuit = find_circuit(replacement, task, method, graph=graph, steps=steps, errors=mode,
                                   top_fraction=args.fraction)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the summary line says it
                result = evaluate(circuit, sizes=[0])
            share = result.get("error_share")
            print(f"{method:3s} errors={mode:6s}: {circuit.summary_line()}  (m(model)={result['m_full']:.3f}, "
                  f"m(empty)={result['m_empty']:.3f}; error nodes carry "
                  f"{'n/a' if share is None else f'{share:.0%}'} of its features' effect)")
            if method == "ig" and mode == "rank":
                last = circuit.summary_line()
    full, empty = graph.full_metric, float(graph.node_metric(torch.zeros(1, len(graph.node_ids)))[0])
    # The ceiling of any feature-only circuit: every feature node kept, every error node ablated.
    keep = torch.zeros(len(graph.node_ids))
    keep[features] = 1
    ceiling = (float(graph.node_metric(keep[None])[0]) - empty) / (full - empty)
    print(f"all {len(features)} feature nodes, error nodes ablated: faithfulness={ceiling:.3f} "
          "(the most any feature-only circuit can reach)")
    ig_scores = graph.node_attribution(steps=8).abs()
    tried = features[ig_scores[features].argsort(descending=True)[:args.prefilter or 2 * budget]]
    for tau in args.acdc_tau:
        initial = torch.zeros(len(graph.node_ids), dtype=torch.bool)
        initial[tried] = True  # error nodes and untried features start removed
        start, forwards = time.perf_counter(), graph.forwards
        result = acdc(graph.node_metric, list(reversed(range(len(graph.node_ids)))), len(graph.node_ids), tau,
                      initial_keep=initial, reference_gap=abs(full - empty),
                      predicted_keep=ig_scores >= tau * abs(full - empty))
        keep = result.keep.float()
        circuit, complement = graph.node_metric(torch.stack([keep, 1 - keep])).tolist()
        print(f"acdc tau={tau} over the best {len(tried)} features, error nodes ablated: {int(keep.sum())} features "
              f"({int(keep.sum()) / len(features):.1%}), faithfulness={(circuit - empty) / (full - empty):.3f} "
              f"completeness={(complement - empty) / (full - empty):.3f}; {graph.forwards - forwards} forwards, "
              f"{time.perf_counter() - start:.0f} s")
    print(last)


if __name__ == "__main__":
    main()
