"""featcircuits demo [--model DIR --dictionaries DIR] [--prompt TEXT] [--task TASK] [--out DIR]"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HELP = ("The whole pipeline in one command: attribution graph of a prompt, a feature circuit for a task with its "
        "faithfulness and completeness, the top features and their tokens, and an HTML report "
        "(default: the bundled model and its transcoders, offline).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local HF checkpoint dir or TransformerLens name (default: the bundled model)")
    parser.add_argument("--dictionaries", help="directory of dictionaries in any supported format, or a registry "
                        "release (default: the bundled transcoders)")
    parser.add_argument("--prompt", help="text whose attribution graph is built (default: the task's first prompt)")
    parser.add_argument("--task", help="task JSON file (clean/corrupt/answer/distractor pairs) or a built-in task: "
                        "docstring, forwarding, names, induction (default: the bundled model's task, else names, "
                        "else induction)")
    parser.add_argument("--out", default="featcircuits-demo", help="report directory (default: %(default)s)")
    parser.add_argument("--method", default="atp", choices=("atp", "ig", "acdc"), help="circuit discovery method")
    parser.add_argument("--max-feature-nodes", type=int, default=256, help="feature nodes kept in the graph")
    parser.add_argument("--max-pairs", type=int, default=4, help="task pairs used (default: %(default)s)")
    parser.add_argument("--top", type=int, default=8, help="features listed (default: %(default)s)")
    parser.add_argument("--text", help="text file on which the feature cards find top activations (besides the "
                        "prompts)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _tokens(values: list[str]) -> str:
    return " ".join(repr(v) for v in values) if values else "-"


def run(args: argparse.Namespace) -> int:
    from .._paths import output_dir
    from ..pipeline import run_demo
    from ._checks import check_task_file

    if args.text is not None and not Path(args.text).is_file():
        raise FileNotFoundError(f"No text file at {args.text}; give a text file for --text or leave it out.")
    output_dir(args.out, "--out", create=False)  # before any work: a file there, or read-only, is named now
    if args.task is not None and Path(args.task).suffix == ".json":
        check_task_file(args.task)
    start = time.perf_counter()
    result = run_demo(args.model, args.dictionaries, args.prompt, args.task, args.out, method=args.method,
                      max_feature_nodes=args.max_feature_nodes, n_top=args.top, max_pairs=args.max_pairs,
                      text=Path(args.text).read_text() if args.text else None, device=args.device,
                      progress=not args.no_progress)
    graph, circuit, evaluation = result.graph, result.circuit, result.evaluation
    rm = graph.replacement
    widths = sorted({d.cfg.d_sae for d in rm.dictionaries})
    print(f"model {rm.cfg.model_name} ({rm.cfg.n_layers} layers, d_model {rm.cfg.d_model}) with "
          f"{len(rm.dictionaries)} dictionaries ({', '.join(sorted({d.cfg.kind for d in rm.dictionaries}))}, "
          f"d_sae {'/'.join(map(str, widths))})")
    print(f"prompt: {result.prompt!r} ({graph.tokens.numel()} tokens)")
    print("  top predictions: " + ", ".join(f"{t!r} {p:.2f}" for t, p in result.top_predictions))
    print(f"attribution graph: {graph.n_features} feature nodes (of {graph.n_active_features} active), "
          f"{graph.n_edges} edges; replacement score {result.replacement_score:.3f}, "
          f"completeness score {result.graph_completeness:.3f}")
    n_pairs = len(circuit.graph.task)
    print(f"circuit ({circuit.method}, task {result.task_name!r}, {n_pairs} pair{'s' * (n_pairs != 1)}, metric logit "
          f"diff {evaluation['m_full']:.3f} full / {evaluation['m_empty']:.3f} all ablated): "
          f"{_made_of(circuit.counts())}")
    print(f"  faithfulness {result.faithfulness:.3f}   (the circuit alone; 1 = recovers the full model)")
    print(f"  completeness {result.completeness:.3f}   (everything but the circuit; 0 = nothing outside matters)")
    print("top features (AtP score; tokens the decoder promotes through the unembedding; tokens it fires on):")
    for feature in result.top_features:
        print(f"  {feature.node_id:<14} {feature.score:+.3f}  promotes {_tokens(feature.promoted_tokens)}  "
              f"| fires on {_tokens(feature.activating_tokens)}")
    if not result.top_features:
        print("  (the circuit holds no feature nodes, only error terms)")
    explanation = result.explanation
    if explanation is not None and explanation.units:
        print(f"explanation (pruned graph; measured change of target {explanation.target!r} when each unit is ablated):")
        for unit in explanation.units:
            print(f"  {unit.effect:+.3f}  {unit.name}" + (f"  ({len(unit.members)} features)" if len(unit.members) > 1 else ""))
        if explanation.steered is not None:
            print(f"steering: {explanation.steered.name} off: p({explanation.target!r}) "
                  f"{explanation.target_prob_before:.2f} -> {explanation.target_prob_after:.2f}; continues "
                  f"{explanation.text_after!r} (was {explanation.text_before!r})")
    print(f"report: {result.report.resolve()}")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def _made_of(counts: dict[str, int]) -> str:
    """The circuit's feature and error nodes apart, so that a circuit of error nodes says so."""
    return (f"{counts['features']} of {counts['n_features']} feature nodes, "
            f"{counts['errors']} of {counts['n_errors']} error nodes")
