"""build_graph: exactness by intervention (verify), consistency under linearity, caps, budgets, bad input."""

from __future__ import annotations

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.graph import (
    GraphTooLargeError,
    build_dataset_graph,
    build_graph,
    logit_diff_target,
    verify,
)
from featcircuits.graph.attribution_graph import ERROR, FEATURE, TARGET

PROMPT = "Once upon a time there was"


def make_dictionary(hook_in: str, hook_out: str, d_model: int, d_sae: int, bias: float, kind: str = "transcoder",
                    activation: str = "relu", k: int | None = None) -> Dictionary:
    cfg = DictionaryConfig(d_in=d_model, d_sae=d_sae, kind=kind, activation=activation, k=k, hook_in=hook_in,
                           hook_out=hook_out)
    dictionary = Dictionary.from_config(cfg)
    with torch.no_grad():
        dictionary.b_enc.fill_(bias)
        dictionary.b_dec.normal_(0, 0.05)
        if dictionary.W_skip is not None:
            dictionary.W_skip.normal_(0, 0.05)
        if dictionary.threshold is not None and dictionary.threshold.dim() == 1:
            dictionary.threshold.fill_(0.2)
    return dictionary


def mlp_transcoder(layer, d_model, d_sae=96, bias=-0.5, **kw):
    return make_dictionary(f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", d_model, d_sae,
                           bias, **kw)


def attn_sae(layer, d_model, d_sae=64, bias=-0.3):
    hook = f"blocks.{layer}.hook_attn_out"
    return make_dictionary(hook, hook, d_model, d_sae, bias, kind="sae")


@pytest.fixture(scope="module")
def stories_graph(stories_model):
    torch.manual_seed(1)
    dictionaries = [mlp_transcoder(layer, 64, d_sae=64, bias=-0.9) for layer in range(5)]
    dictionaries += [attn_sae(1, 64, bias=-0.5), attn_sae(3, 64, bias=-0.5)]
    return build_graph(stories_model, dictionaries, PROMPT, progress=False)


def test_stories260k_transcoders_and_attention_saes_verify_exactly(stories_graph):
    graph = stories_graph
    assert 100 < graph.n_features == graph.n_active_features
    assert {graph.sites[s] for s in graph.node_keys[graph.mask(FEATURE), 1].tolist()} == {
        "mlp0", "mlp1", "mlp2", "mlp3", "mlp4", "attn1", "attn3"}
    result = verify(graph, n_sources=40, seed=0)
    assert result.n_targets == graph.n_features + graph.count(TARGET)
    assert result.max_rel_error <= 1e-5, result
    # doubling (scale=1) moves targets by exactly the edge weights too, within fp32 rounding of the targets
    doubled = verify(graph, n_sources=40, seed=0, scale=1.0)
    assert doubled.max_abs_error <= 2e-5
    # the checked effects are real: sampled sources move their targets
    assert result.predicted.abs().max() > 1e-2


def test_tiny_gpt2_skip_topk_jumprelu_and_bare_mlps_verify_exactly(tiny_gpt2):
    torch.manual_seed(2)
    dictionaries = [
        mlp_transcoder(0, 32, d_sae=64, kind="skip_transcoder"),
        attn_sae(0, 32, d_sae=48),
        make_dictionary("blocks.1.hook_attn_out", "blocks.1.hook_attn_out", 32, 48, 0.0, kind="sae",
                        activation="topk", k=6),
        make_dictionary("blocks.1.hook_resid_post", "blocks.1.hook_resid_post", 32, 48, 0.0, kind="sae",
                        activation="jumprelu"),
    ]
    dictionaries[0].cfg.norm_scale = 1.7  # an unfolded activation-normalisation factor
    tokens = torch.tensor([0, 5, 17, 42, 8, 63, 21])
    graph = build_graph(tiny_gpt2, dictionaries, tokens, progress=False)
    assert graph.sites == ["attn0", "mlp0", "attn1", "mlp1", "resid_post1"]  # mlp1 is bare: error nodes only
    result = verify(graph, n_sources=48, seed=1)
    assert result.max_rel_error <= 1e-5, result
    # the resid_post SAE cuts the stream: nothing upstream reaches the logits except through it
    upstream = (graph.node_keys[:, 0] != TARGET) & (graph.node_keys[:, 1] != 4)
    assert graph.adjacency[graph.mask(TARGET)][:, upstream].abs().max() == 0


def test_logit_diff_edges_are_the_difference_of_logit_edges(stories_model, stories_graph):
    rm = stories_graph.replacement
    answer, distractor = 281, 410
    graph = build_graph(rm, prompt=PROMPT, targets=[answer, distractor, logit_diff_target(stories_model, answer, distractor)],
                        progress=False)
    rows = graph.adjacency[graph.mask(TARGET)]
    torch.testing.assert_close(rows[2], rows[0] - rows[1], atol=1e-5, rtol=1e-4)
    n_sources = graph.n_nodes - 3  # target columns are empty
    torch.testing.assert_close(graph.adjacency[graph.mask(FEATURE), :n_sources],
                               stories_graph.adjacency[stories_graph.mask(FEATURE), :n_sources])


def test_max_feature_nodes_keeps_the_most_influential_rows_unchanged(stories_graph):
    rm = stories_graph.replacement
    capped = build_graph(rm, prompt=PROMPT, max_feature_nodes=30, batch_size=16, progress=False)
    assert capped.n_features == 30 and capped.n_active_features == stories_graph.n_features
    full_ids = stories_graph.node_ids
    index = torch.tensor([full_ids.index(i) for i in capped.node_ids])
    torch.testing.assert_close(capped.adjacency, stories_graph.adjacency[index][:, index])
    assert verify(capped, n_sources=20).max_rel_error <= 1e-5


def test_dataset_graph_is_the_mean_of_end_aligned_graphs(stories_graph):
    rm = stories_graph.replacement
    prompts = ["Once upon a time", "The little dog ran to the"]
    answers, distractors = [281, 281], [410, 362]
    mean_graph = build_dataset_graph(rm, prompts=prompts, answers=answers, distractors=distractors,
                                     max_feature_nodes=40, progress=False)
    singles = [build_graph(rm, prompt=p, targets=[logit_diff_target(rm.model, a, d, name="answer-distractor")],
                           max_feature_nodes=40, progress=False)
               for p, a, d in zip(prompts, answers, distractors, strict=True)]
    ids = mean_graph.node_ids
    assert "target:answer-distractor@-1" in ids and "embed@-1" in ids
    expected = torch.zeros_like(mean_graph.adjacency)
    for graph in singles:
        n_pos = graph.clean.n_pos
        shifted = [i.rsplit("@", 1)[0] + f"@{int(i.rsplit('@', 1)[1]) - n_pos}" for i in graph.node_ids]
        index = torch.tensor([ids.index(i) for i in shifted])
        expected[index[:, None], index[None, :]] += graph.adjacency / len(singles)
    torch.testing.assert_close(mean_graph.adjacency, expected)
    with pytest.raises(ValueError, match="Verify the single-prompt graphs"):
        verify(mean_graph)


def test_bad_requests_fail_clearly_before_allocating(stories_graph):
    rm = stories_graph.replacement
    with pytest.raises(GraphTooLargeError, match="memory_budget_gb=1e-06"):
        build_graph(rm, prompt=PROMPT, memory_budget_gb=1e-6, progress=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_graph(rm, prompt=PROMPT, targets=[512], progress=False)
    with pytest.raises(ValueError, match="empty"):
        build_graph(rm, prompt="", progress=False)
    with pytest.raises(ValueError, match="context is 512"):
        build_graph(rm, prompt="Once upon a time " * 200, progress=False)
    with pytest.raises(ValueError, match="dictionaries must be None"):
        build_graph(rm, PROMPT)  # the prompt given where the dictionaries go
    with pytest.raises(ValueError, match="one answer and one distractor per prompt"):
        build_dataset_graph(rm, prompts=["a b", "c d"], answers=[281], distractors=[410])
    assert stories_graph.count(ERROR) == len(rm.sites) * len(rm.to_tokens(PROMPT))


def test_a_graph_over_budget_names_the_largest_setting_that_fits(stories_graph):
    import re

    from featcircuits.graph import estimate_graph_memory
    from featcircuits.graph.rows import layout_entries

    rm = stories_graph.replacement
    n_active, n_pos, n_targets = stories_graph.n_features, stories_graph.clean.n_pos, len(stories_graph.targets)
    third = n_active // 3  # a budget that holds a third of the rows, built as build_graph sizes its batches
    features = stories_graph.node_keys[stories_graph.mask(FEATURE)]  # every active feature: the graph is full
    layout = layout_entries(features[:, 1], features[:, 2], len(rm.sites), n_pos)  # as build_graph lays them out
    budget = estimate_graph_memory(rm, n_pos, n_active, third, n_targets, min(128, max(third, n_targets)),
                                   "linear", layout_vectors=layout)["total"] / 2**30
    with pytest.raises(GraphTooLargeError, match=r"max_feature_nodes=\d+ fits") as error:
        build_graph(rm, prompt=PROMPT, memory_budget_gb=budget, progress=False)
    suggested = int(re.search(r"max_feature_nodes=(\d+) fits", str(error.value)).group(1))
    assert third <= suggested < n_active
    graph = build_graph(rm, prompt=PROMPT, memory_budget_gb=budget, max_feature_nodes=suggested, progress=False)
    assert graph.n_features == suggested
    with pytest.raises(GraphTooLargeError):
        build_graph(rm, prompt=PROMPT, memory_budget_gb=budget, max_feature_nodes=suggested + 1, progress=False)
