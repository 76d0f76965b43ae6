"""The one patching core: the logits head with soft caps, q/k norms frozen, one definition of each ablation,
the model a circuit was measured in, and refused options. Each check compares against the model's own forward
or a hand-written hook, not against the library's other engines alone."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA_CONFIG, mean_ablated_mlps_by_hand, prefix_sharing_task, relu_transcoders

from featcircuits import load_model
from featcircuits.circuits import ComponentGraph, FeatureEdgeGraph, FeatureGraph, evaluate, find_circuit
from featcircuits.circuits.circuit import Circuit
from featcircuits.graph import build_graph, verify
from featcircuits.patching.replacement import ReplacementModel

PROMPT = [1, 17, 33, 5, 60, 2, 41, 9, 88, 12]


@pytest.fixture(scope="module")
def capped_model():
    """A tiny Llama whose output logits are soft-capped at 2, with logits large enough that the cap bites."""
    model = load_model({**TINY_LLAMA_CONFIG, "output_logits_soft_cap": 2.0}, seed=0)
    with torch.no_grad():
        model.unembed.W_U.mul_(30.0)
        raw = model.unembed(model.ln_final(model(torch.tensor([PROMPT]), stop_at_layer=model.cfg.n_layers)))
    assert raw.abs().max() > 4.0  # the cap changes these logits a lot
    return model


@pytest.fixture(scope="module")
def qk_norm_model():
    return load_model({**TINY_LLAMA_CONFIG, "use_qk_norm": True}, seed=1)


@torch.no_grad()
def test_replacement_logits_apply_the_output_soft_cap(capped_model):
    rm = ReplacementModel(capped_model, relu_transcoders(capped_model))
    reference = capped_model(torch.tensor([PROMPT]))[0]
    assert reference.abs().max() <= 2.0
    identity = {site.name: (lambda acts: acts) for site in rm.sites if site.dictionary is not None}
    live = rm.run(PROMPT, feature_acts=identity).logits[0]
    frozen = rm.run(PROMPT, clean=rm.clean_run(PROMPT), batch_size=2).logits
    torch.testing.assert_close(live, reference, atol=1e-4, rtol=0)
    torch.testing.assert_close(frozen, reference.expand(2, -1, -1), atol=1e-4, rtol=0)


@torch.no_grad()
def test_component_and_feature_engines_agree_on_a_soft_capped_model(capped_model):
    task = prefix_sharing_task(capped_model)
    rm = ReplacementModel(capped_model, relu_transcoders(capped_model))
    components = ComponentGraph(capped_model, task)
    features = FeatureGraph(rm, task)
    edges = FeatureEdgeGraph(features)
    # the metric read off the model's own forward, prompt by prompt
    by_hand = []
    for index in range(len(task)):
        tokens = task.clean_tokens[index, : int(task.clean_last[index]) + 1]
        last = capped_model(tokens[None])[0, -1]
        by_hand.append(float(last[task.answers[index]] - last[task.distractors[index]]))
    expected = sum(by_hand) / len(by_hand)
    assert components.full_metric == pytest.approx(expected, abs=1e-5)
    assert features.full_metric == pytest.approx(expected, abs=1e-5)
    assert float(edges.edge_metric(torch.ones(1, len(edges.edge_ids)))[0]) == pytest.approx(expected, abs=1e-5)
    kl = FeatureGraph(rm, task, metric="kl")
    assert abs(kl.full_metric) < 1e-6  # the unablated replacement model is the model


def test_qk_norm_model_builds_verifies_and_runs_batched(qk_norm_model):
    rm = ReplacementModel(qk_norm_model, relu_transcoders(qk_norm_model))
    graph = build_graph(rm, prompt=PROMPT, progress=False, batch_size=16)
    assert verify(graph, n_sources=24).max_rel_error <= 1e-5
    with torch.no_grad():
        frozen = rm.run(PROMPT, clean=rm.clean_run(PROMPT), batch_size=3).logits
        torch.testing.assert_close(frozen, qk_norm_model(torch.tensor([PROMPT])).expand(3, -1, -1), atol=1e-5, rtol=0)


def test_mean_ablation_is_one_definition_on_prompts_of_unequal_length(tiny_llama):
    task = prefix_sharing_task(tiny_llama)  # lengths 9, 7, 9, 8
    expected = mean_ablated_mlps_by_hand(tiny_llama, task)
    components = ComponentGraph(tiny_llama, task, ablation="mean")
    keep = torch.ones(1, len(components.node_ids))
    keep[0, [i for i, node in enumerate(components.node_ids) if node.endswith(".MLP")]] = 0.0
    # no dictionaries: every MLP is a bare site, its whole output one error node per position
    features = FeatureGraph(ReplacementModel(tiny_llama, []), task, ablation="mean", positions="sum")
    assert all(node.endswith(":error") for node in features.node_ids)
    through_components = float(components.node_metric(keep)[0])
    through_features = float(features.node_metric(torch.zeros(1, len(features.node_ids)))[0])
    assert through_components == pytest.approx(expected, abs=1e-5)
    assert through_features == pytest.approx(expected, abs=1e-5)


def test_a_circuit_records_the_model_it_was_measured_in(tiny_llama, tmp_path):
    task = prefix_sharing_task(tiny_llama)
    rm = ReplacementModel(tiny_llama, relu_transcoders(tiny_llama))
    found = {
        "model": find_circuit(tiny_llama, task, "atp"),
        "live replacement": find_circuit(rm, task, "atp", top_k=5),
        "frozen local replacement": find_circuit(rm, task, "atp", level="edges", top_k=5),
    }
    for where, circuit in found.items():
        assert circuit.measured_in == where
        path = tmp_path / f"{where}.json"
        circuit.save(path)
        assert Circuit.load(path).measured_in == where
        evaluation = evaluate(circuit)
        assert evaluation["measured_in"] == where
    with pytest.raises(ValueError, match="measured_in="):
        Circuit("atp", "nodes", ["L0.MLP"], [1.0], measured_in="somewhere")


def test_output_deltas_on_a_live_run_are_refused(tiny_llama):
    rm = ReplacementModel(tiny_llama, relu_transcoders(tiny_llama))
    with pytest.raises(ValueError, match="output_deltas apply to frozen runs"):
        rm.run(PROMPT, output_deltas={"mlp0": torch.zeros(1, len(PROMPT), tiny_llama.cfg.d_model)})


def test_a_dictionary_with_nan_weights_is_refused_by_the_replacement_model(tiny_llama):
    dictionaries = relu_transcoders(tiny_llama)
    with torch.no_grad():
        dictionaries[1].W_dec[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in \['W_dec'\]"):
        ReplacementModel(tiny_llama, dictionaries)
