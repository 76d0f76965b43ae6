"""featcircuits graph --model PATH --dictionaries DIR --prompt TEXT --out GRAPH.json [--verify N]"""

from __future__ import annotations

import argparse

from ._checks import check_prompt_fits, fraction, non_negative_int, positive_float, positive_int

HELP = "Build an exact attribution graph for a prompt and write it as circuit-tracer / Neuronpedia JSON."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory or TransformerLens name")
    parser.add_argument("--dictionaries", required=True,
                        help="directory of dictionaries (one sub-directory each, any supported format) "
                             "or a registry release name")
    parser.add_argument("--prompt", required=True, help="the text to attribute")
    parser.add_argument("--out", required=True, help="output graph JSON file")
    parser.add_argument("--target", type=int, action="append", default=None,
                        help="target token id (repeatable); default: the most probable next tokens")
    parser.add_argument("--verify", type=non_negative_int, default=0, metavar="N",
                        help="check N sampled source nodes by intervention; prints max_rel_error")
    parser.add_argument("--node-threshold", type=fraction, default=0.8, help="influence pruning: node fraction")
    parser.add_argument("--edge-threshold", type=fraction, default=0.98, help="influence pruning: edge fraction")
    parser.add_argument("--max-feature-nodes", type=positive_int, default=None, help="cap on feature nodes")
    parser.add_argument("--batch-size", type=positive_int, default=128, help="targets per backward pass")
    parser.add_argument("--memory-budget-gb", type=positive_float, default=4.0, help="refuse larger graphs")
    parser.add_argument("--offload", choices=["cpu"], default=None,
                        help="keep the model's and dictionaries' weights and the decoder layout in CPU memory "
                             "while attribution rows are computed on --device (an accelerator short of memory)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slug", default=None, help="graph slug in the JSON metadata (default: file name)")


def _load_dictionaries(spec: str, device: str):
    from ..hub.loading import load_dictionaries

    return load_dictionaries(spec, device=device)


def run(args: argparse.Namespace) -> int:
    import time

    from .._paths import output_file
    from ..graph import (
        ReplacementModel,
        apply_prune,
        build_graph,
        graph_scores,
        prune_graph,
        verify,
        write_circuit_tracer_json,
    )
    from ..hub.checks import check_dictionaries_match_model
    from ..models import load_model

    started = time.perf_counter()
    out = output_file(args.out, "--out")  # before any work
    dictionaries = _load_dictionaries(args.dictionaries, args.device)  # cheap checks first
    model = load_model(args.model, device=args.device)
    if isinstance(dictionaries, dict):
        dictionaries = list(dictionaries.values())
    check_prompt_fits(model, args.prompt)
    vocab = int(model.cfg.d_vocab)
    for target in args.target or []:
        if not 0 <= target < vocab:
            raise ValueError(f"--target {target} is outside the model's vocabulary [0, {vocab}); give a token id "
                             f"below {vocab}.")
    replacement = ReplacementModel(model, dictionaries)  # raises on widths that do not fit
    check_dictionaries_match_model(model, dictionaries)  # warns when they record another model's name
    graph = build_graph(replacement, prompt=args.prompt, targets=args.target, max_feature_nodes=args.max_feature_nodes,
                        batch_size=args.batch_size, memory_budget_gb=args.memory_budget_gb, offload=args.offload)
    built = time.perf_counter()
    print(f"graph: {graph.n_nodes} nodes ({graph.n_features} features of {graph.n_active_features} active, "
          f"{graph.count(1)} errors, {graph.count(2)} embeddings, {graph.count(3)} targets), {graph.n_edges} edges "
          f"in {built - started:.1f}s")
    print(f"full graph: {graph_scores(graph)}")
    pruned = prune_graph(graph, args.node_threshold, args.edge_threshold, memory_budget_gb=args.memory_budget_gb)
    print(f"pruned (node_threshold={args.node_threshold}, edge_threshold={args.edge_threshold}): "
          f"{pruned.n_nodes} nodes, {pruned.n_edges} edges; {graph_scores(apply_prune(graph, pruned))}")
    write_circuit_tracer_json(graph, out, slug=args.slug or out.stem, node_threshold=args.node_threshold,
                              edge_threshold=args.edge_threshold, pruned=pruned)
    print(f"wrote {out}")
    if args.verify:
        result = verify(graph, n_sources=args.verify)
        print(f"verified {result.n_sources} sources x {result.n_targets} targets by intervention")
        print(f"max_rel_error={result.max_rel_error:.3g}")
    return 0
