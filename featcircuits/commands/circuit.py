"""featcircuits circuit --model PATH [--dictionaries DIR] --task TASK.json --method {atp,ig,acdc} --out CIRCUIT.json"""

from __future__ import annotations

import argparse

from ._checks import check_task_file, non_negative_int, positive_int

HELP = "Find a circuit for a contrastive task (AtP, AtP-IG or ACDC) and measure its faithfulness."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF checkpoint directory or TransformerLens name")
    parser.add_argument("--dictionaries", help="directory of dictionaries (feature nodes); omit for heads/MLPs")
    parser.add_argument("--task", required=True, help="task JSON: a list of {clean, corrupt, answer, distractor}")
    parser.add_argument("--method", required=True, choices=["atp", "ig", "acdc"])
    parser.add_argument("--out", required=True, help="circuit JSON to write (the curve goes beside it as .csv)")
    parser.add_argument("--ablation", default="patch", choices=["zero", "mean", "patch"])
    parser.add_argument("--metric", default="logit_diff", choices=["logit_diff", "prob_diff", "kl", "l2"],
                        help="kl and l2 are distances from the clean model (ig or acdc; atp's gradient is 0 there)")
    parser.add_argument("--level", default="nodes", choices=["nodes", "edges"],
                        help="edges: between heads/MLPs, or with --dictionaries the linear graph's feature edges")
    parser.add_argument("--receivers", default="linear", choices=["linear", "exact", "secant"],
                        help="edge AtP estimator (--level edges): plain AtP, receivers re-run, or secant downstream")
    parser.add_argument("--positions", default="each", choices=["each", "sum"], help="feature nodes per position or summed")
    parser.add_argument("--tau", type=float, default=0.01, help="fraction of the full metric gap, in [0, 1]")
    parser.add_argument("--top-k", type=positive_int, help="AtP/IG: select the k best units instead of a tau threshold")
    parser.add_argument("--steps", type=positive_int, default=8, help="integrated-gradients steps (--method ig)")
    parser.add_argument("--prefilter", type=positive_int, help="ACDC: only try the N units with the largest AtP scores")
    parser.add_argument("--max-edges", type=positive_int,
                        help="feature edges: keep the N candidate edges with the largest |AtP| (default: all)")
    parser.add_argument("--sizes", type=non_negative_int, nargs="+", help="circuit sizes (units) of the faithfulness sweep")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="ablation patterns per forward (default 32 on CPU, 64 on accelerators)")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import csv

    from .._paths import output_file
    from ..circuits import evaluate, find_circuit, load_task
    from ..hub.checks import check_dictionaries_match_model
    from ..hub.loading import load_dictionaries
    from ..models import load_model

    out = output_file(args.out, "--out")  # before any work
    output_file(out.with_suffix(".curve.csv"), "the curve file beside --out")
    check_task_file(args.task)
    model = load_model(args.model, device=args.device)
    task = load_task(args.task, model)
    dictionaries = load_dictionaries(args.dictionaries, device=args.device) if args.dictionaries else None
    if dictionaries:
        check_dictionaries_match_model(model, dictionaries)  # raises on wrong widths, warns on another model's name
    circuit = find_circuit(
        model, task, args.method, dictionaries=dictionaries, level=args.level, ablation=args.ablation,
        metric=args.metric, tau=args.tau, steps=args.steps, top_k=args.top_k, prefilter=args.prefilter,
        positions=args.positions, batch_size=args.batch_size, receivers=args.receivers, max_edges=args.max_edges,
    )
    result = evaluate(circuit, sizes=args.sizes)
    circuit.save(out)
    curve_path = out.with_suffix(".curve.csv")
    with open(curve_path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["size", "fraction", "faithfulness", "completeness"])
        curve = result["curve"]
        writer.writerows(zip(curve["sizes"], curve["fractions"], curve["faithfulness"], curve["completeness"],
                             strict=True))
    kind = "feature/error" if dictionaries else "component"
    print(f"{args.method} over {len(circuit.node_ids)} {kind} nodes ({len(circuit.edge_ids)} candidate edges), "
          f"{circuit.params['forwards']} forward passes")
    print(f"circuit: {len(circuit.nodes)} nodes, {len(circuit.edges)} edges")
    print(f"metric: full model {result['m_full']:.4g}, everything ablated {result['m_empty']:.4g}; "
          f"CPR={result['cpr']:.3f} CMD={result['cmd']:.3f}")
    print(f"wrote {out} and {curve_path}")
    print(f"faithfulness={result['faithfulness']:.4f} completeness={result['completeness']:.4f} "
          f"nodes={len(circuit.nodes)}")
    return 0
