"""Honest circuits: error nodes ranked, kept or ablated, counted apart from features, and a warning when they
carry most of the effect; checked against a hand-run of the replacement model with plain hooks."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from conftest import TINY_GPT2_CONFIG, random_token_task, relu_transcoders

from featcircuits.circuits import Circuit, FeatureGraph, evaluate, find_circuit
from featcircuits.nodes import parse_node_id

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def setup():
    from featcircuits import load_model
    from featcircuits.patching.replacement import ReplacementModel

    model = load_model(TINY_GPT2_CONFIG, seed=0)
    transcoders = relu_transcoders(model)
    replacement = ReplacementModel(model, transcoders)
    task = random_token_task(model, 3, 6, seed=1)
    return model, transcoders, replacement, task, FeatureGraph(replacement, task, ablation="patch")


@torch.no_grad()
def metric_by_hand(model, transcoders, task, node_ids: list[str], kept: set[str]) -> float:
    """The live replacement model with transformer_lens hooks: each MLP output is its transcoder's decoding of
    the features it computes from its own (changed) input plus the error term there (the MLP's own output
    minus that reconstruction); every node of ``node_ids`` outside ``kept`` takes its patch-ablation value
    instead (the corrupt prompt's feature activation or error term at that position). Mean logit difference."""
    removed = [parse_node_id(node) for node in node_ids if node not in kept]
    diffs = []
    for index in range(len(task)):
        clean, corrupt = task.clean_tokens[index][None], task.corrupt_tokens[index][None]
        hooks = []
        for layer, transcoder in enumerate(transcoders):
            names = [f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"]
            corrupt_cache = model.run_with_cache(corrupt, names_filter=names)[1]
            corrupt_acts = transcoder.encode(corrupt_cache[names[0]][0])
            corrupt_error = corrupt_cache[names[1]][0] - transcoder.decode(corrupt_acts)
            keep = torch.ones_like(corrupt_acts)
            keep_error = torch.ones(corrupt_acts.shape[0], 1)
            for node in removed:
                if node.site == f"mlp{layer}":
                    if node.kind == "error":
                        keep_error[node.pos] = 0.0
                    else:
                        keep[node.pos, node.feature] = 0.0
            inputs = {}

            def write(out, hook, t=transcoder, k=keep, a=corrupt_acts, ke=keep_error, e=corrupt_error, inputs=inputs):
                x = inputs["x"][0]
                live_error = out[0] - t.decode(t.encode(x))
                error = ke * live_error + (1 - ke) * e
                return (t.decode(k * t.encode(x) + (1 - k) * a) + error)[None]

            hooks.append((names[0], lambda x, hook, inputs=inputs: inputs.setdefault("x", x)))
            hooks.append((names[1], write))
        last = model.run_with_hooks(clean, fwd_hooks=hooks)[0, -1]
        diffs.append(float(last[task.answers[index]] - last[task.distractors[index]]))
    return sum(diffs) / len(diffs)


def faithfulness_by_hand(setup, kept: set[str]) -> float:
    model, transcoders, _, task, graph = setup
    full = metric_by_hand(model, transcoders, task, graph.node_ids, set(graph.node_ids))
    empty = metric_by_hand(model, transcoders, task, graph.node_ids, set())
    return (metric_by_hand(model, transcoders, task, graph.node_ids, kept) - empty) / (full - empty)


def _features_errors(node_ids):
    errors = [n for n in node_ids if parse_node_id(n).kind == "error"]
    return [n for n in node_ids if n not in errors], errors


@pytest.mark.parametrize("errors", ["rank", "keep", "ablate"])
def test_error_modes_select_count_and_measure_as_a_hand_run_does(setup, errors):
    _, _, replacement, task, graph = setup
    circuit = find_circuit(replacement, task, "atp", graph=graph, errors=errors, top_fraction=0.1)
    features, error_nodes = _features_errors(graph.node_ids)
    k = int(0.1 * len(features))
    # the expected selection, from the scores by hand
    scores = dict(zip(circuit.node_ids, circuit.node_scores, strict=True))
    ranked = sorted(graph.node_ids, key=lambda n: -abs(scores[n]))
    best_features = [n for n in ranked if n in set(features)][:k]
    if errors == "rank":  # Sparse Feature Circuits: the errors ranked above the k-th feature join
        expected = set(ranked[: ranked.index(best_features[-1]) + 1])
    else:
        expected = set(best_features) | (set(error_nodes) if errors == "keep" else set())
    assert set(circuit.nodes) == expected
    n_errors = len(expected & set(error_nodes))
    if errors != "rank":
        assert n_errors == (len(error_nodes) if errors == "keep" else 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(circuit)
    assert result["faithfulness"] == pytest.approx(faithfulness_by_hand(setup, expected), abs=1e-4)
    # the circuit's features with every error node kept and with none, measured by hand
    assert result["faithfulness_errors_kept"] == pytest.approx(
        faithfulness_by_hand(setup, set(best_features) | set(error_nodes)), abs=1e-4)
    assert result["faithfulness_errors_ablated"] == pytest.approx(faithfulness_by_hand(setup, set(best_features)),
                                                                  abs=1e-4)
    line = circuit.summary().splitlines()[-1]
    match = re.fullmatch(r"features=(\d+)/(\d+) errors=(\d+)/(\d+) faithfulness=(-?[\d.]+) completeness=(-?[\d.]+)",
                         line)
    assert match, line
    assert [int(g) for g in match.groups()[:4]] == [k, len(features), n_errors, len(error_nodes)]
    assert float(match.group(5)) == pytest.approx(result["faithfulness"], abs=1e-4)


def test_the_sweep_keeps_the_error_mode(setup):
    _, _, replacement, task, graph = setup
    features, error_nodes = _features_errors(graph.node_ids)
    circuit = find_circuit(replacement, task, "atp", graph=graph, errors="ablate", top_k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = evaluate(circuit, sizes=[0, len(features)])
    # every feature, no error node: the feature-only ceiling; no feature: every node ablated
    assert result["curve"]["faithfulness"][1] == pytest.approx(faithfulness_by_hand(setup, set(features)), abs=1e-4)
    assert result["curve"]["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
    keep = find_circuit(replacement, task, "atp", graph=graph, errors="keep", top_k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = evaluate(keep, sizes=[0])
    assert kept["curve"]["faithfulness"][0] == pytest.approx(faithfulness_by_hand(setup, set(error_nodes)), abs=1e-4)
    with pytest.raises(ValueError, match=r"outside \[0, \d+\] \(the number of feature nodes"):
        evaluate(keep, sizes=[len(graph.node_ids)])


def _literal_acdc(graph, tau: float, start: torch.Tensor, tried: list[int]) -> set[int]:
    """One forward per node, in reverse order over ``tried``, from the keep mask ``start``."""
    with torch.no_grad():
        ends = graph.node_metric(torch.stack([torch.ones(len(start)), torch.zeros(len(start))]))
        threshold = tau * float((ends[0] - ends[1]).abs())
        keep = start.clone().float()
        current = float(graph.node_metric(keep[None])[0])
        for unit in reversed(tried):
            trial = keep.clone()
            trial[unit] = 0.0
            value = float(graph.node_metric(trial[None])[0])
            if abs(value - current) < threshold:
                keep, current = trial, value
    return set(keep.nonzero()[:, 0].tolist())


@pytest.mark.parametrize("errors", ["keep", "ablate"])
def test_acdc_never_tries_kept_error_nodes_and_starts_without_ablated_ones(setup, errors):
    _, _, replacement, task, graph = setup
    is_error = torch.tensor([parse_node_id(n).kind == "error" for n in graph.node_ids])
    circuit = find_circuit(replacement, task, "acdc", graph=graph, errors=errors, tau=0.05, prefilter=40)
    # the pre-filter tries the 40 features with the largest AtP; every other feature starts removed
    atp = graph.node_attribution(steps=1).abs().masked_fill(is_error, -1.0)
    tried = sorted(atp.argsort(descending=True)[:40].tolist())
    start = is_error.float() if errors == "keep" else torch.zeros(len(is_error))
    start[tried] = 1.0
    expected = _literal_acdc(graph, 0.05, start, tried)
    assert {graph.node_ids.index(n) for n in circuit.nodes} == expected
    assert 0 < len(expected & set(tried)) < len(tried)  # the walk removed some features and kept some
    chosen_errors = [n for n in circuit.nodes if parse_node_id(n).kind == "error"]
    assert len(chosen_errors) == (int(is_error.sum()) if errors == "keep" else 0)


def test_error_share_and_its_warning_follow_the_measurement(setup):
    _, _, replacement, task, graph = setup
    features, error_nodes = _features_errors(graph.node_ids)
    # every error node and no feature: all the effect is the error nodes'
    only_errors = Circuit("atp", "nodes", graph.node_ids, [1.0] * len(graph.node_ids), nodes=list(error_nodes),
                          params={"errors": "keep"})
    with pytest.warns(UserWarning, match="Error nodes carry most"):
        result = evaluate_on(graph, only_errors)
    assert result["faithfulness_errors_ablated"] == pytest.approx(0.0, abs=1e-6)
    assert result["error_share"] == pytest.approx(1.0)
    assert "WARNING: error nodes carry most" in only_errors.summary()
    # every feature and every error node: the whole model; the share is what ablating the errors loses
    everything = Circuit("atp", "nodes", graph.node_ids, [1.0] * len(graph.node_ids), nodes=list(graph.node_ids))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate_on(graph, everything)
    ceiling = faithfulness_by_hand(setup, set(features))
    assert result["error_share"] == pytest.approx(1.0 - ceiling, abs=1e-4)
    warned = any("Error nodes carry most" in str(w.message) for w in caught)
    assert warned == (1.0 - ceiling > 0.5)
    assert ("WARNING" in everything.summary()) == warned


def evaluate_on(graph, circuit):
    from featcircuits.circuits import evaluate_circuit

    return evaluate_circuit(graph, circuit, sizes=[0])


def test_component_circuits_count_components(tiny_gpt2):
    task = random_token_task(tiny_gpt2, 2, 5, seed=2)
    circuit = find_circuit(tiny_gpt2, task, "atp", top_fraction=0.25)
    assert len(circuit.nodes) == int(0.25 * len(circuit.node_ids))
    evaluate(circuit)
    assert re.fullmatch(rf"components={len(circuit.nodes)}/{len(circuit.node_ids)} faithfulness=-?[\d.]+ "
                        r"completeness=-?[\d.]+", circuit.summary_line())
    with pytest.raises(ValueError, match="errors='keep' decides what happens to error nodes"):
        find_circuit(tiny_gpt2, task, "atp", errors="keep")


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5, math.nan])
def test_top_fraction_outside_zero_one_is_refused(setup, fraction):
    _, _, replacement, task, graph = setup
    with pytest.raises(ValueError, match=r"top_fraction=.* is outside \(0, 1\]"):
        find_circuit(replacement, task, "atp", graph=graph, top_fraction=fraction)


def test_bad_error_options_are_refused(setup):
    _, _, replacement, task, graph = setup
    with pytest.raises(ValueError, match=r"errors='drop'; choose one of \('rank', 'keep', 'ablate'\)"):
        find_circuit(replacement, task, "atp", graph=graph, errors="drop")
    with pytest.raises(ValueError, match="top_fraction selects the best AtP/IG scores"):
        find_circuit(replacement, task, "acdc", graph=graph, top_fraction=0.1)
    with pytest.raises(ValueError, match="Give top_k or top_fraction, not both"):
        find_circuit(replacement, task, "atp", graph=graph, top_fraction=0.1, top_k=3)


def test_feature_edge_circuits_without_error_edges(setup):
    _, _, replacement, task, graph = setup
    from featcircuits.circuits import FeatureEdgeGraph

    edges = FeatureEdgeGraph(graph, max_edges=400)
    circuit = find_circuit(replacement, task, "atp", graph=edges, level="edges", errors="ablate", top_fraction=0.1)
    from_errors = [e for e in edges.edge_ids if parse_node_id(e[0]).kind == "error"]
    assert from_errors and not any(parse_node_id(s).kind == "error" for s, _ in circuit.edges)
    assert len(circuit.edges) == int(0.1 * (len(edges.edge_ids) - len(from_errors)))
    kept = find_circuit(replacement, task, "atp", graph=edges, level="edges", errors="keep", top_fraction=0.1)
    assert set(from_errors) <= set(kept.edges)
    assert kept.counts()["edges"] == len(circuit.edges) + len(from_errors)
