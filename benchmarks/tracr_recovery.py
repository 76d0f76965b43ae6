"""Recover tracr ground truth: component circuits (ACDC, AtP) and feature circuits on residual-stream SAEs.

    python benchmarks/tracr_recovery.py --program frac_prevs      (or tracr's own name: --program make_frac_prevs)
    python benchmarks/tracr_recovery.py --program all [--components-only]

``--program all`` runs every program of tracr's lib (all but ``make_nary_sequencemap``, a combinator that takes
a function) and ends with one table row per program: RASP agreement, the component ROC AUCs (ACDC over nodes and
edges) and the feature ROC AUCs (ACDC, variables and labels).

Compiles the program (tracr lib, customary arguments), checks the HookedTransformer against tracr's RASP
interpreter, finds component circuits (edges, zero ablation) with ACDC and AtP (plain, and with exact
receivers / the secant downstream: featcircuits/circuits/receivers.py) and scores them by ROC AUC against the
compiled graph, trains SAEs on every residual site with the library's Trainer (random inputs of
every length; best of ``--seeds`` runs per site by held-out FVU), and scores the feature circuit (ACDC, AtP
and AtP-IG over feature and error nodes summed over positions) against the program's dataflow, per program
variable and per label (see featcircuits/groundtruth/tracr_truth.py); ``--task-draws N`` rescores the feature
circuits on N task draws with the same SAEs and prints each method's mean and minimum. ACDC runs twice:
with the ACDC paper's metric for tracr (``--metric auto``: the squared distance to the clean output for a
numerical output, KL to the clean distribution for a categorical one; a distance cannot cancel across
pairs) and with the mean clean-output logit, which AtP and AtP-IG use (a distance's gradient vanishes at
the clean run). Last line: ``roc_auc_components=<ACDC edges> roc_auc_features=<ACDC, variable units>``,
both with the ``--metric`` metric.
"""

from __future__ import annotations

import argparse
import random
import time

import torch


def _roc(scores, truth) -> float:
    """ROC AUC, or NaN where every unit is true (or none is): e.g. a 1-layer program uses its only head and MLP."""
    from featcircuits.circuits import roc_auc

    truth = torch.as_tensor(truth)
    return roc_auc(scores, truth) if 0 < int(truth.sum()) < len(truth) else float("nan")


def _name(method: str, metric: str, acdc_metric: str) -> str:
    """``acdc`` under the chosen ACDC metric; ``acdc-logit`` for ACDC under the logit metric when that differs."""
    return f"{method}-logit" if method == "acdc" and metric != acdc_metric else method


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--program", default="frac_prevs",
                        help="a program of tracr's lib, by our name (hist) or tracr's (make_hist), or all")
    parser.add_argument("--max-seq-len", type=int)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--task-seed", type=int, default=0, help="seed of the random clean/corrupt inputs")
    parser.add_argument("--task-draws", type=int, default=1,
                        help="also score the feature circuits on this many task draws (seeds --task-seed onwards) "
                             "with the same SAEs, and print each method's mean and minimum ROC AUC over them")
    parser.add_argument("--tau", type=float, default=0.01)
    parser.add_argument("--metric", default="auto", choices=("auto", "l2", "kl", "logit_diff"),
                        help="ACDC's metric; auto: l2 for a numerical output, kl for a categorical one")
    parser.add_argument("--ablation", default="zero", choices=("zero", "mean", "patch"))
    parser.add_argument("--architecture", default="relu", choices=("relu", "topk", "batchtopk", "jumprelu"))
    parser.add_argument("--l1", type=float, default=0.1, help="L1 coefficient (relu)")
    parser.add_argument("--k", type=int, default=4, help="active latents (topk, batchtopk)")
    parser.add_argument("--sae-steps", type=int, default=1500)
    parser.add_argument("--matryoshka", type=float, nargs="*", default=[],
                        help="Matryoshka prefixes as fractions of the SAE width, e.g. --matryoshka 0.25 0.5")
    parser.add_argument("--expansion-factor", type=int, default=1, help="SAE width as a multiple of d_model")
    parser.add_argument("--seeds", type=int, default=3, help="training runs; per site the lowest held-out FVU is kept")
    parser.add_argument("--verbose", action="store_true", help="print every feature unit with its score")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny models)")
    parser.add_argument("--components-only", action="store_true", help="skip the SAEs and the feature circuits")
    return parser.parse_args()


def run_program(name: str, args: argparse.Namespace) -> dict:
    """Every figure of one program, keyed ``(level or grain, method)``, plus ``agree`` and ``layers``."""
    from tracr.rasp import rasp

    from featcircuits.circuits import find_circuit, make_graph
    from featcircuits.groundtruth.tracr_model import compile_tracr, tracr_program
    from featcircuits.groundtruth.tracr_saes import train_residual_saes
    from featcircuits.groundtruth.tracr_truth import (
        feature_truth_units,
        label_recovery,
        tracr_task,
        variable_truth_units,
    )
    from featcircuits.patching.replacement import ReplacementModel

    start = time.time()
    program, vocab, n = tracr_program(name, args.max_seq_len)
    tm = compile_tracr(program, vocab, n)
    rng = random.Random(0)
    agree = 0
    for _ in range(50):
        tokens = [rng.choice(sorted(vocab, key=str)) for _ in range(n)]
        want = rasp.evaluate(program, tokens)
        logits = tm.model(torch.tensor([tm.encode(tokens)]))[0, 1:].detach()
        if tm.output_values is None:
            got = logits[:, 0].tolist()
            agree += all(w is None or abs(g - w) < 1e-3 for g, w in zip(got, want, strict=True))
        else:
            got = [tm.output_values[i] for i in logits.argmax(-1).tolist()]
            agree += all(w is None or g == w for g, w in zip(got, want, strict=True))
    cfg = tm.model.cfg
    print(f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_model {cfg.d_model}; agrees with the RASP "
          f"interpreter on {agree}/50 random inputs ({time.time() - start:.1f}s)")
    task = tracr_task(tm, args.pairs, seed=args.task_seed)
    metric = args.metric if args.metric != "auto" else "l2" if tm.output_values is None else "kl"
    # (method, metric) pairs: ACDC under the chosen metric is the headline; the logit metric for comparison
    methods = [("acdc", metric), ("acdc", "logit_diff"), ("atp", "logit_diff"), ("ig", "logit_diff")]
    methods = list(dict.fromkeys(methods))
    metrics = list(dict.fromkeys(m for _, m in methods))  # one graph per metric
    results = {}
    for level in ("nodes", "edges"):
        graphs = {m: make_graph(tm.model, task, ablation="zero", metric=m) for m in metrics}
        graph = graphs["logit_diff"]
        truth = tm.component_truth(graph.node_ids) if level == "nodes" else tm.edge_truth(graph.edge_ids)
        # edge AtP three ways: plain (linear receivers), exact receivers, exact receivers + secant downstream
        variants = [(method, m, "linear") for method, m in methods if method != "ig"]
        variants += [("atp", "logit_diff", "exact"), ("atp", "logit_diff", "secant")] if level == "edges" else []
        for method, m, receivers in variants:
            circuit = find_circuit(tm.model, task, method, level=level, tau=args.tau, graph=graphs[m],
                                   receivers=receivers)
            scores = circuit.node_scores if level == "nodes" else circuit.edge_scores
            name = _name(method, m, metric) if receivers == "linear" else f"{method}-{receivers}"
            results[(level, name)] = _roc([abs(s) for s in scores], truth)
            print(f"components {level:5s} {name:10s}: ROC AUC {results[(level, name)]:.3f}  "
                  f"({len(circuit.selected)}/{len(truth)} selected, {int(truth.sum())} true)")
        if level == "edges":  # reference: every single-edge ablation measured (one batched forward of them all)
            n_edges = len(graph.edge_ids)
            effects = (graph.edge_metric(1.0 - torch.eye(n_edges)) - graph.full_metric).abs()
            results[(level, "patching")] = _roc(effects, truth)
            print(f"components {level:5s} {'patching':10s}: ROC AUC {results[(level, 'patching')]:.3f}  "
                  f"(each edge's own ablation effect, {n_edges} patterns)")
    results["agree"] = agree
    results["layers"] = cfg.n_layers
    if args.components_only:
        return results
    start = time.time()
    saes, info = train_residual_saes(tm, architecture=args.architecture, l1_coefficient=args.l1, k=args.k,
                                     steps=args.sae_steps, seeds=tuple(range(args.seeds)),
                                     expansion_factor=args.expansion_factor,
                                     matryoshka_fractions=tuple(args.matryoshka))
    recovery = label_recovery(tm, saes)
    fvus = " ".join(f"{fvu:.3f}" for fvu in info["fvu"].values())
    print(f"SAEs ({args.architecture}) on {len(saes)} residual sites ({time.time() - start:.0f}s), held-out FVU {fvus}: "
          f"{int(recovery['directions'])} labelled directions, best decoder cosine mean {recovery['mean_cosine']:.3f} "
          f"min {recovery['min_cosine']:.3f}, {recovery['recovered_0.9']:.0%} at >= 0.9")
    replacement = ReplacementModel(tm.model, saes)
    graphs = {m: make_graph(replacement, task, ablation=args.ablation, positions="sum", metric=m) for m in metrics}
    for method, m in methods:
        graph, name = graphs[m], _name(method, m, metric)
        circuit = find_circuit(replacement, task, method, tau=args.tau, graph=graph)
        node_scores = torch.tensor(circuit.node_scores)
        for grain, units in (("variables", variable_truth_units), ("labels", feature_truth_units)):
            names, scores, truth = units(tm, graph, node_scores)
            results[(grain, name)] = _roc(scores, truth)
            print(f"features {name:12s} {grain:9s}: ROC AUC {results[(grain, name)]:.3f} over {len(names)} units "
                  f"({int(truth.sum())} true; {len(graph.node_ids)} feature/error nodes, {len(circuit.nodes)} kept)")
            if args.verbose:
                for unit, score, true in sorted(zip(names, scores.tolist(), truth.tolist(), strict=True),
                                                key=lambda row: -row[1]):
                    print(f"    {score:8.4f} {'true ' if true else 'false'} {unit}")
    if args.task_draws > 1:  # how much the feature figures depend on which random pairs the task drew
        draws: dict[str, list[float]] = {_name(method, m, metric): [] for method, m in methods}
        for seed in range(args.task_seed, args.task_seed + args.task_draws):
            draw_task = tracr_task(tm, args.pairs, seed=seed)
            draw_graphs = {m: make_graph(replacement, draw_task, ablation=args.ablation, positions="sum", metric=m)
                           for m in metrics}
            for method, m in methods:
                circuit = find_circuit(replacement, draw_task, method, tau=args.tau, graph=draw_graphs[m])
                _, scores, truth = variable_truth_units(tm, draw_graphs[m], torch.tensor(circuit.node_scores))
                draws[_name(method, m, metric)].append(_roc(scores, truth))
            print(f"task seed {seed}: variables ROC AUC " + "  ".join(f"{n} {v[-1]:.3f}" for n, v in draws.items()))
        for name, values in draws.items():
            print(f"features {name:12s} variables over {args.task_draws} task draws: mean "
                  f"{sum(values) / len(values):.3f} min {min(values):.3f} max {max(values):.3f}")
    return results


TABLE_HEADER = (f"{'program':24s} {'layers':>6s} {'RASP':>6s} {'comp nodes':>10s} {'comp edges':>10s} "
                f"{'feat vars':>9s} {'feat labels':>11s}")


def _row(name: str, r: dict) -> str:
    """A table row: tracr's name, layers, RASP agreement, component and feature ROC AUCs (ACDC)."""
    from featcircuits.groundtruth.tracr_model import tracr_name

    nan = float("nan")
    return (f"{tracr_name(name):24s} {r['layers']:6d} {r['agree']:4d}/50 {r.get(('nodes', 'acdc'), nan):10.3f} "
            f"{r.get(('edges', 'acdc'), nan):10.3f} {r.get(('variables', 'acdc'), nan):9.3f} "
            f"{r.get(('labels', 'acdc'), nan):11.3f}")


def main() -> None:
    args = _arguments()
    torch.set_num_threads(args.threads)
    from featcircuits.groundtruth.tracr_model import TRACR_PROGRAMS, program_name

    names = list(TRACR_PROGRAMS) if args.program == "all" else [program_name(args.program)]
    rows = {}
    for name in names:
        start = time.time()
        rows[name] = run_program(name, args)
        print(f"{name}: {time.time() - start:.0f} s; row: {_row(name, rows[name])}", flush=True)
    nan = float("nan")
    if len(rows) > 1:
        print(TABLE_HEADER)
        for name, r in rows.items():
            print(_row(name, r))
        components = [r[("edges", "acdc")] for r in rows.values()]
        features = [r.get(("variables", "acdc"), nan) for r in rows.values()]
        print(f"programs={len(rows)} min_roc_auc_components={min(components, key=lambda v: (v != v, v)):.4f} "
              f"min_roc_auc_features={min(features, key=lambda v: (v != v, v)):.4f}")
    else:
        r = next(iter(rows.values()))
        print(f"roc_auc_components={r[('edges', 'acdc')]:.4f} roc_auc_features={r.get(('variables', 'acdc'), nan):.4f}")


if __name__ == "__main__":
    main()
