"""featcircuits circuit --model PATH [--dictionaries DIR] --task TASK.json --method {atp,ig,acdc} --out CIRCUIT.json

The last line says what the circuit is made of and how well it does:
``features=<k>/<n> errors=<e>/<m> faithfulness=<f> completeness=<c>`` (``components=<k>/<n> ...`` without
dictionaries), after a summary that warns when error nodes carry most of the effect.
"""

from __future__ import annotations

import argparse

from ._checks import check_task_file, non_negative_int, positive_float, positive_int

HELP = "Find a circuit for a contrastive task (AtP, AtP-IG or ACDC) and measure its faithfulness."


def top_fraction(text: str) -> float:
    """An argparse type: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (a fraction of the feature nodes, e.g. 0.05), got {text}")
    return value


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
    parser.add_argument("--top-fraction", type=top_fraction, metavar="F",
                        help="AtP/IG: select the best fraction F in (0, 1] of the feature nodes instead of a tau threshold")
    parser.add_argument("--errors", default="rank", choices=["rank", "keep", "ablate"],
                        help="error nodes: ranked with the features (Sparse Feature Circuits), every one kept, or "
                             "every one ablated (a feature-only circuit); with --dictionaries")
    parser.add_argument("--steps", type=positive_int, default=8, help="integrated-gradients steps (--method ig)")
    parser.add_argument("--prefilter", type=positive_int, help="ACDC: only try the N units with the largest AtP scores")
    parser.add_argument("--max-edges", type=positive_int,
                        help="feature edges: keep the N candidate edges with the largest |AtP| (default: all)")
    parser.add_argument("--sizes", type=non_negative_int, nargs="+", help="circuit sizes (units) of the faithfulness sweep")
    parser.add_argument("--batch-size", type=positive_int, default=None,
                        help="ablation patterns per forward (default 32 on CPU, 64 on accelerators)")
    parser.add_argument("--memory-budget-gb", type=positive_float, default=4.0,
                        help="feature edges: refuse, before allocating, a search estimated to need more")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace) -> int:
    import csv
    import warnings

    from .._paths import output_file
    from ..circuits import FeatureGraph, evaluate, find_circuit, load_task, make_graph
    from ..circuits.discovery import default_batch_size
    from ..circuits.edge_memory import check_feature_edge_memory
    from ..hub.checks import check_dictionaries_match_model
    from ..hub.loading import load_dictionaries
    from ..models import load_model

    out = output_file(args.out, "--out")  # before any work
    output_file(out.with_suffix(".curve.csv"), "the curve file beside --out")
    if args.top_fraction is not None and (args.method == "acdc" or args.top_k is not None):
        raise ValueError("--top-fraction selects the best AtP/IG scores: use it with --method atp or ig, and "
                         "without --top-k.")
    if args.errors != "rank" and not args.dictionaries:
        raise ValueError(f"--errors {args.errors} decides what happens to error nodes, which only circuits over "
                         "dictionaries have; give --dictionaries, or leave --errors rank.")
    check_task_file(args.task)
    model = load_model(args.model, device=args.device)
    task = load_task(args.task, model)
    dictionaries = load_dictionaries(args.dictionaries, device=args.device) if args.dictionaries else None
    if dictionaries:
        check_dictionaries_match_model(model, dictionaries)  # raises on wrong widths, warns on another model's name
    batch_size = args.batch_size or default_batch_size(model)
    graph = None
    if dictionaries and args.level == "edges":
        # the plan is checked (and refused over the budget) before a single edge is built
        graph = make_graph(model, task, dictionaries, args.ablation, args.metric, args.positions,
                           max_copies=batch_size)
        assert isinstance(graph, FeatureGraph)  # dictionaries give feature nodes
        plan = check_feature_edge_memory(graph, args.memory_budget_gb, args.max_edges, batch_size, args.method)
        print(f"memory: {plan.describe()}; budget {args.memory_budget_gb:g} GiB")
        print(f"work: {plan.weight_passes} backward passes for the edge weights"
              + (f", then ACDC over {plan.n_edges} edges: at least {plan.search_forwards} forward passes of "
                 f"{batch_size} patterns (more after wrong guesses)" if args.method == "acdc" else ""), flush=True)
    circuit = find_circuit(
        model, task, args.method, dictionaries=dictionaries, level=args.level, ablation=args.ablation,
        metric=args.metric, tau=args.tau, steps=args.steps, top_k=args.top_k, prefilter=args.prefilter,
        positions=args.positions, batch_size=batch_size, receivers=args.receivers, max_edges=args.max_edges,
        errors=args.errors, top_fraction=args.top_fraction, memory_budget_gb=args.memory_budget_gb, graph=graph,
        progress=True,
    )
    with warnings.catch_warnings():  # the summary below says it, on stdout with the figures
        warnings.filterwarnings("ignore", message="Error nodes carry most")
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
    print(f"wrote {out} and {curve_path}")
    print(circuit.summary())
    return 0
