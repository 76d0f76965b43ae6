"""Feature and error nodes on the ReplacementModel, checked by interventions (tracr: test_circuits_tracr.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import prefix_sharing_task, random_token_task

from featcircuits.circuits import FeatureGraph, evaluate, find_circuit
from featcircuits.dictionaries import Dictionary, DictionaryConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _replacement(model):
    """``model`` with a fresh 48-feature transcoder on layer 0's MLP and a 40-feature SAE on layer 1's input."""
    from featcircuits.patching.replacement import ReplacementModel

    torch.manual_seed(0)
    d = model.cfg.d_model
    transcoder = Dictionary.from_config(DictionaryConfig(
        d_in=d, d_sae=48, kind="transcoder", hook_in="blocks.0.ln2.hook_normalized", hook_out="blocks.0.hook_mlp_out",
        layer=0))
    sae = Dictionary.from_config(DictionaryConfig(d_in=d, d_sae=40, hook_in="blocks.1.hook_resid_pre", layer=1))
    return ReplacementModel(model, [transcoder, sae])


@pytest.fixture(scope="module")
def replacement(tiny_gpt2):
    return _replacement(tiny_gpt2)


@pytest.fixture(scope="module")
def task(tiny_gpt2):
    return random_token_task(tiny_gpt2, 3, 5, 1)


def test_feature_node_ablation_matches_a_direct_replacement_run(replacement, task):
    graph = FeatureGraph(replacement, task, ablation="zero")
    clean = replacement.model(task.clean_tokens).detach()
    assert graph.full_metric == pytest.approx(
        float((clean[:, -1, 3] - clean[:, -1, 5]).mean()), abs=1e-4)  # error nodes make the splice exact
    node = next(i for i, node_id in enumerate(graph.node_ids) if node_id.startswith("mlp0:") and "error" not in node_id)
    site, rest = graph.node_ids[node].split(":")
    feature, pos = (int(x) for x in rest.split("@"))
    expected = []
    for index in range(len(task)):
        def zero_one(acts, feature=feature, pos=pos):
            acts = acts.clone()
            acts[:, pos, feature] = 0
            return acts
        logits = replacement.run(graph._prompt(index), feature_acts={site: zero_one}).logits.detach()
        expected.append(float(logits[0, -1, 3] - logits[0, -1, 5]))
    masks = torch.ones(2, len(graph.node_ids))
    masks[1, node] = 0
    values = graph.node_metric(masks)
    assert values[0].item() == pytest.approx(graph.full_metric, abs=1e-5)
    assert values[1].item() == pytest.approx(sum(expected) / len(expected), abs=1e-4)


@pytest.mark.parametrize("positions", ["each", "sum"])
def test_feature_atp_is_the_derivative_of_a_real_intervention(replacement, task, positions):
    graph = FeatureGraph(replacement, task, ablation="patch", positions=positions)
    scores = graph.node_attribution()
    picks = scores.abs().argsort(descending=True)[:3]
    eps = 1e-3
    masks = torch.ones(len(picks), len(graph.node_ids))
    masks[torch.arange(len(picks)), picks] = 1 - eps
    slope = (graph.node_metric(masks) - graph.full_metric) / eps
    assert torch.allclose(slope, scores[picks], rtol=0.05, atol=2e-3)


def test_feature_acdc_and_evaluation(replacement, task):
    circuit = find_circuit(replacement, task, "acdc", tau=0.02, positions="sum")
    result = evaluate(circuit)
    assert result["curve"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4)
    assert len(circuit.nodes) < len(circuit.node_ids)
    # the viewer draws summed nodes too: each in its site's layer row, labelled as covering every position
    from featcircuits.viz.adapters import circuit_to_graph_json
    from featcircuits.viz.graph_data import graph_payload

    drawn = graph_payload(circuit_to_graph_json(circuit))["nodes"]
    assert [node["id"] for node in drawn] == list(circuit.nodes)
    for node in drawn:
        site, _, what = node["id"].partition(":")
        assert node["layer"] == site[len(site.rstrip("0123456789")):]  # the site's layer number
        assert node["label"].endswith("(all positions)")
        assert node["kind"] == ("error" if what == "error" else "feature")


def test_sites_without_dictionaries_are_refused(replacement, task):
    with pytest.raises(ValueError, match=r"No dictionary covers site\(s\) \['mlp1'\]"):
        FeatureGraph(replacement, task, sites=["mlp0", "mlp1"])



@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("positions", ["each", "sum"])
def test_feature_ablations_after_the_clean_prefix_match_whole_prompt_runs(model_name, positions, request):
    """Under patch ablation each prompt's forwards run only the positions after its first clean/corrupt
    difference, with the model's clean keys and values before them; whole-prompt runs give the same metrics
    (positional and rotary models, prompts of unequal lengths and prefixes)."""
    model = request.getfixturevalue(model_name)
    replacement = _replacement(model)
    task = prefix_sharing_task(model, ((9, 4), (7, 3), (8, 6)))
    generator = torch.Generator().manual_seed(3)
    graph = FeatureGraph(replacement, task, ablation="patch", positions=positions)
    whole = FeatureGraph(replacement, task, ablation="patch", positions=positions, skip_clean_prefix=False)
    assert [prefix is not None for prefix in graph._clean_prefixes] == [True, True, True]
    assert graph.node_ids == whole.node_ids
    keep = (torch.rand(6, len(graph.node_ids), generator=generator) > 0.5).float()
    keep[0] = 1.0
    keep[1] = 0.0
    expected = whole.node_metric(keep)
    assert expected.std() > 1e-2
    assert torch.allclose(graph.node_metric(keep), expected, atol=1e-5)
    assert graph.full_metric == pytest.approx(whole.full_metric, abs=1e-5)
