"""Influence, pruning and graph scores against hand computations and explicit matrix inverses."""

from __future__ import annotations

import pytest
import torch

from featcircuits.graph import (
    AttributionGraph,
    apply_prune,
    graph_scores,
    prune_graph,
    prune_threshold,
    prune_topk,
)
from featcircuits.graph.attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET
from featcircuits.graph.influence import node_influence, normalize_adjacency
from featcircuits.graph.targets import Target


def test_node_influence_equals_the_inverse_series():
    torch.manual_seed(0)
    n = 40
    adjacency = torch.randn(n, n, dtype=torch.float64).tril(-1) * (torch.rand(n, n) < 0.3)
    weights = torch.zeros(n, dtype=torch.float64)
    weights[-3:] = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    normalized = normalize_adjacency(adjacency)
    expected = weights @ (torch.linalg.inv(torch.eye(n, dtype=torch.float64) - normalized) - torch.eye(n, dtype=torch.float64))
    torch.testing.assert_close(node_influence(normalized, weights), expected)
    with pytest.raises(RuntimeError, match="cycle"):
        node_influence(torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0]), max_iter=50)


def toy_graph() -> AttributionGraph:
    """emb0 -> f0 -> target (strong); emb1 -> f1 (dead end); f2 -> target (weak, no input); err -> target."""
    # nodes: f0, f1, f2, err, emb0, emb1, target
    keys = torch.tensor([[FEATURE, 0, 0, 10], [FEATURE, 0, 1, 11], [FEATURE, 0, 1, 12], [ERROR, 0, 1, -1],
                         [EMBEDDING, -1, 0, -1], [EMBEDDING, -1, 1, -1], [TARGET, -1, 1, 0]])
    adjacency = torch.zeros(7, 7)
    adjacency[0, 4] = 1.0  # emb0 -> f0
    adjacency[1, 5] = 1.0  # emb1 -> f1
    adjacency[6, 0] = 2.0  # f0 -> target
    adjacency[6, 2] = -0.01  # f2 -> target
    adjacency[6, 3] = 1.0  # err -> target
    target = Target("5", torch.zeros(4), 0.0, pos=1, weight=1.0, is_logit=True, token=5)
    return AttributionGraph(keys, adjacency, torch.ones(7), sites=["mlp0"], targets=[target])


def test_scores_match_a_hand_computation():
    scores = graph_scores(toy_graph())
    # target row normalised: f0 2/3.01, f2 .01/3.01, err 1/3.01; f0's input is all emb0
    f0, f2, err = 2 / 3.01, 0.01 / 3.01, 1 / 3.01
    emb0 = f0
    assert scores.replacement_score == pytest.approx(emb0 / (emb0 + err), rel=1e-6)
    output_influence = {"f0": f0, "f2": f2, "err": err, "emb0": emb0, "target": 1.0}
    non_error = {"target": 1 - err}
    expected = sum(non_error.get(k, 1.0) * v for k, v in output_influence.items()) / sum(output_influence.values())
    assert scores.completeness_score == pytest.approx(expected, rel=1e-6)


def test_pruning_drops_dangling_and_weak_nodes():
    graph = toy_graph()
    kept = prune_threshold(graph, 0.5)
    assert kept.node_mask.tolist() == [True, False, False, True, True, True, True]  # f1 dead end, f2 too weak
    assert kept.n_edges == 3
    influence = prune_graph(graph, node_threshold=0.6, edge_threshold=1.0)
    # cumulative influence: f0 and emb0 (2/3.01 each) reach 0.6 of the total, so err and f2 are cut
    assert influence.node_mask.tolist() == [True, False, False, False, True, True, True]
    assert influence.edge_mask.nonzero().tolist() == [[0, 4], [6, 0]]
    everything = prune_graph(graph, node_threshold=1.0, edge_threshold=1.0)
    assert everything.node_mask.tolist() == [True, False, False, True, True, True, True]  # f2 has no input
    top = prune_topk(graph, n_nodes=1)
    assert top.node_mask.tolist() == [True, False, False, False, True, True, True]
    sub = apply_prune(graph, kept)
    assert sub.node_ids == ["mlp0:10@0", "mlp0:error@1", "embed@0", "embed@1", "logit:5@1"]
    assert sub.n_edges == 3 and graph_scores(sub).replacement_score == pytest.approx(2 / 3, rel=1e-6)
    with pytest.raises(ValueError, match="node_threshold must be in"):
        prune_graph(graph, node_threshold=1.5)


def test_pruning_over_budget_is_refused_before_allocating(tiny_gpt2):
    from conftest import relu_transcoders

    from featcircuits.graph import GraphTooLargeError, ReplacementModel, build_graph, prune_graph
    from featcircuits.graph.prune import prune_memory

    graph = build_graph(ReplacementModel(tiny_gpt2, relu_transcoders(tiny_gpt2, d_sae=40, bias=-0.25)),
                        prompt=[0, 5, 9, 13, 2, 7], progress=False)
    need = prune_memory(graph) / 2**30
    with pytest.raises(GraphTooLargeError, match=f"Pruning this graph \\({graph.n_nodes} nodes\\) needs about"):
        prune_graph(graph, memory_budget_gb=need / 2)
    assert prune_graph(graph, memory_budget_gb=need * 2).n_nodes > 0
