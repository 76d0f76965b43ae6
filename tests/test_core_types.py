"""Types that meet: node ids round-trip over every kind; feature-edge weights are the attribution graph's
edges (one linear engine, checked against autograd); a pruned graph is a Circuit that evaluate scores; the
training metrics' splice is the replacement model with its error term removed."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT2_CONFIG, relu_transcoders

from featcircuits import load_model
from featcircuits.circuits import ContrastiveTask, FeatureEdgeGraph, FeatureGraph, evaluate, make_graph
from featcircuits.graph import build_graph, prune_graph, verify
from featcircuits.nodes import NODE_KINDS, Node, parse_node_id
from featcircuits.patching.replacement import ReplacementModel
from featcircuits.patching.splice import spliced_forward

CLEAN = [0, 17, 33, 5, 60, 2, 41, 9, 88, 12]
CORRUPT = [0, 17, 33, 5, 61, 2, 40, 9, 88, 12]


def test_node_ids_round_trip_over_every_kind():
    nodes = [
        Node("feature", 5, site="mlp3", feature=1207), Node("feature", None, site="resid_post2", feature=0),
        Node("feature", -1, site="attn1", feature=3), Node("error", 5, site="attn1"), Node("error", site="mlp0"),
        Node("embedding", 4), Node("embedding"), Node("target", -1, name="42", is_logit=True),
        Node("target", 3, name="281-410"), Node("logits"), Node("head", layer=3, head=2), Node("mlp", layer=0),
    ]
    assert {node.kind for node in nodes} == set(NODE_KINDS)
    for node in nodes:
        assert parse_node_id(node.id) == node, node.id
    assert [n.id for n in nodes[:4]] == ["mlp3:1207@5", "resid_post2:0", "attn1:3@-1", "attn1:error@5"]
    assert [n.id for n in nodes[-3:]] == ["logits", "L3.H2", "L0.MLP"]
    assert nodes[0].block == 3 and nodes[-2].block == 3 and nodes[5].block is None


@pytest.mark.parametrize("bad", ["mlp3:12@x", "mlp:12@3", "ffn3:12@1", "L3.H", "logit:@2", "embed@", "", "L3.mlp",
                                 "mlp3:error@5@6"])
def test_malformed_node_ids_are_named_in_the_error(bad):
    with pytest.raises(ValueError, match="is not a node id|is not a site name"):
        parse_node_id(bad)


@pytest.fixture(scope="module")
def gpt2_rm():
    model = load_model(TINY_GPT2_CONFIG, seed=0)
    return ReplacementModel(model, relu_transcoders(model, d_sae=40, bias=-0.25))


@pytest.fixture(scope="module")
def one_pair(gpt2_rm):
    return ContrastiveTask.from_pairs(gpt2_rm.model, [{"clean": CLEAN, "corrupt": CORRUPT, "answer": 3,
                                                       "distractor": 5}])


def test_feature_edge_weights_are_the_attribution_graphs_edges(gpt2_rm, one_pair):
    nodes = FeatureGraph(gpt2_rm, one_pair, ablation="zero")
    linear = FeatureEdgeGraph(nodes, engine="linear")
    autograd = FeatureEdgeGraph(nodes, engine="autograd")
    assert linear.engine == "linear" and autograd.engine == "autograd"
    assert linear.edge_ids == autograd.edge_ids and linear.n_feature_edges > 100
    torch.testing.assert_close(linear._feature_weights, autograd._feature_weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(linear._logit_weights, autograd._logit_weights, atol=1e-5, rtol=1e-4)

    graph = build_graph(gpt2_rm, prompt=linear._clean_runs[0].tokens, targets=[3], progress=False)
    n_f = linear.n_feature_edges
    senders, receivers = linear._edge_sender[:n_f], linear._edge_receiver[:n_f]
    weights = linear._feature_weights[:, 0]
    ids = linear.node_ids
    expected = []
    for s, r in zip(senders.tolist(), receivers.tolist(), strict=True):
        column, row = graph.index_of(ids[s]), graph.index_of(ids[r])
        value = float(graph.adjacency[row, column])
        # the graph's edge is activation x weight; under zero ablation an error node's weight is its whole
        # ablation, minus the error the graph's column carries
        expected.append(value / float(graph.activations[column]) if not linear._is_error[s] else -value)
    torch.testing.assert_close(weights, torch.tensor(expected), atol=2e-5, rtol=1e-4)


def test_a_pruned_graph_is_a_circuit_that_evaluate_scores(gpt2_rm, one_pair):
    graph = build_graph(gpt2_rm, prompt=CLEAN, progress=False)
    circuit = prune_graph(graph, node_threshold=0.6, edge_threshold=0.9).to_circuit(graph)
    assert circuit.measured_in == "attribution graph" and 0 < len(circuit.nodes) < len(circuit.node_ids)
    assert set(circuit.nodes) <= set(graph.node_ids)
    task_graph = make_graph(gpt2_rm, one_pair, ablation="zero")
    result = evaluate(circuit, task_graph)
    # independently: keep exactly the circuit's task-graph nodes, ablate the rest
    keep = torch.tensor([[float(node in set(circuit.nodes)) for node in task_graph.node_ids]])
    m = float(task_graph.node_metric(keep)[0])
    m_full, m_empty = result["m_full"], result["m_empty"]
    assert result["faithfulness"] == pytest.approx((m - m_empty) / (m_full - m_empty), abs=1e-6)
    assert result["measured_in"] == "live replacement"
    with pytest.raises(ValueError, match="None of the circuit's"):
        evaluate(circuit, make_graph(gpt2_rm.model, one_pair, ablation="zero"))  # heads and MLPs


@torch.no_grad()
def test_training_splice_is_the_replacement_model_without_its_error(gpt2_rm):
    site = next(s for s in gpt2_rm.sites if s.dictionary is not None)
    tokens = torch.tensor([CLEAN])
    spliced, _ = spliced_forward(gpt2_rm.model, site.dictionary, tokens, torch.ones_like(tokens, dtype=torch.bool))
    replaced = gpt2_rm.run(CLEAN, errors={site.name: torch.zeros(len(CLEAN), gpt2_rm.cfg.d_model)}).logits
    torch.testing.assert_close(spliced, replaced, atol=1e-5, rtol=0)


def test_load_dictionaries_reads_a_directory_of_training_runs(tmp_path, gpt2_rm):
    """Per-layer runs trained separately (``featcircuits train --out tc/layerL`` each) load as one set."""
    import json

    import featcircuits as fc

    originals = [site.dictionary for site in gpt2_rm.sites if site.dictionary is not None]
    for layer, dictionary in enumerate(originals):
        run = tmp_path / "tc" / f"layer{layer}"
        dictionary.save(str(run / dictionary.cfg.hook_in))
        (run / "metrics.json").write_text(json.dumps({"steps": 1}))
        (run / "checkpoint").mkdir()  # a run's checkpoint folder holds no dictionary to load
    loaded = fc.load_dictionaries(tmp_path / "tc")
    assert [d.cfg.hook_out for d in loaded] == [d.cfg.hook_out for d in originals]
    for mine, theirs in zip(loaded, originals, strict=True):
        torch.testing.assert_close(mine.W_dec, theirs.W_dec, atol=0, rtol=0)
    with pytest.raises(ValueError, match="selects dictionaries of a release"):
        fc.load_dictionaries(tmp_path / "tc", ids=["layer_0"])
    with pytest.raises(FileNotFoundError, match="nor is it a release"):
        fc.load_dictionaries("no-such-release-or-folder")


def test_a_graph_records_its_engine_and_why_not_the_linear_one(gpt2_rm):
    graph = build_graph(gpt2_rm, prompt=CLEAN, progress=False)
    assert graph.provenance["engine"] == {"name": "linear", "linear_unsupported": None}
    parallel = load_model({**TINY_GPT2_CONFIG, "parallel_attn_mlp": True}, seed=0)
    rm = ReplacementModel(parallel, relu_transcoders(parallel, d_sae=40, bias=-0.25))
    fallback = build_graph(rm, prompt=CLEAN, progress=False)
    assert fallback.provenance["engine"] == {"name": "autograd", "linear_unsupported": "cfg.parallel_attn_mlp is set"}
    with pytest.raises(ValueError, match=r"engine='linear' cannot run this model \(cfg.parallel_attn_mlp is set\)"):
        build_graph(rm, prompt=CLEAN, progress=False, engine="linear")
    assert verify(fallback, n_sources=16).max_rel_error <= 1e-5
