"""A feature circuit on stories260k with transcoders: <= 5% of the active feature nodes, faithfulness, completeness.

    featcircuits train train/stories260k_skip_transcoders.yaml --set out=/tmp/stc
    python benchmarks/stories_feature_circuit.py --dictionaries /tmp/stc

Task: the name-repetition pairs of benchmarks/acdc_speed.py (the model is competent: logit difference
3.72). Nodes: every transcoder feature at every position whose clean and corrupt activations differ
(the active candidates) plus each site's error node per position; patch ablation. Features are ranked
by AtP-IG (8 steps) and by AtP; the circuit is the best 5% of feature nodes with the error nodes (they
stand for what the transcoders miss) chosen three ways: ranked with the features on the same scores, as
Sparse Feature Circuits does; all kept; all ablated (a feature-only circuit). Then the ceiling of any
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
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dictionaries", required=True)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parents[2] / "shared/models/stories260k"))
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
    from featcircuits.circuits import ContrastiveTask, FeatureGraph, acdc
    from featcircuits.patching.replacement import ReplacementModel

    model = load_model(args.model)
    replacement = ReplacementModel(model, load_dictionaries(args.dictionaries))
    task = ContrastiveTask.from_pairs(model, name_task_pairs())
    graph = FeatureGraph(replacement, task, ablation="patch", positions="each")
    features = torch.tensor([i for i, n in enumerate(graph.node_ids) if ":error@" not in n])
    errors = torch.tensor([i for i, n in enumerate(graph.node_ids) if ":error@" in n])
    budget = int(args.fraction * len(features))
    print(f"{len(features)} active feature nodes, {len(errors)} error nodes; full-model logit diff "
          f"{graph.full_metric:.3f}; circuit: the best {budget} feature nodes ({budget / len(features):.1%})")
    is_error = torch.zeros(len(graph.node_ids), dtype=torch.bool)
    is_error[errors] = True
    last = ""
    scores_by_method = {}
    for method, steps in (("ig", 8), ("atp", 1)):
        scores = scores_by_method[method] = graph.node_attribution(steps=steps).abs()
        top = features[scores[features].argsort(descending=True)[:budget]]
        # As Sparse Feature Circuits selects: error nodes compete with the features on the same scores;
        # walk the ranking until it holds `budget` feature nodes, keeping the error nodes met on the way.
        order = scores.argsort(descending=True)
        ranked = order[torch.cumsum((~is_error[order]).long(), 0) <= budget]
        variants = {"error nodes ranked with them": ranked, "every error node kept": torch.cat([top, errors]),
                    "error nodes ablated": top}
        for name, chosen in variants.items():
            keep = torch.zeros(len(graph.node_ids))
            keep[chosen] = 1
            values = graph.node_metric(torch.stack([keep, 1 - keep, torch.ones_like(keep), torch.zeros_like(keep)]))
            full, empty = float(values[2]), float(values[3])
            faithfulness = (float(values[0]) - empty) / (full - empty)
            completeness = (float(values[1]) - empty) / (full - empty)
            n_errors = int(is_error[chosen].sum())
            print(f"{method:3s} {budget} features, {name} ({n_errors} error nodes): faithfulness={faithfulness:.3f} "
                  f"completeness={completeness:.3f} (m(model)={full:.3f}, m(empty)={empty:.3f})")
            if method == "ig" and name == "error nodes ranked with them":
                last = (f"features={budget}/{len(features)} errors={n_errors}/{len(errors)} "
                        f"faithfulness={faithfulness:.4f} completeness={completeness:.4f}")
    # The ceiling of any feature-only circuit: every feature node kept, every error node ablated.
    keep = torch.zeros(len(graph.node_ids))
    keep[features] = 1
    values = graph.node_metric(torch.stack([keep, torch.ones_like(keep), torch.zeros_like(keep)]))
    ceiling = (float(values[0]) - float(values[2])) / (float(values[1]) - float(values[2]))
    print(f"all {len(features)} feature nodes, error nodes ablated: faithfulness={ceiling:.3f} "
          "(the most any feature-only circuit can reach)")
    full, empty = float(values[1]), float(values[2])
    ig_scores = scores_by_method["ig"]
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
