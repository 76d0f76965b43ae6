"""The written-out transpose (engine="linear") against autograd through the HookedTransformer."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT2_CONFIG
from test_graph_attribution import PROMPT, attn_sae, make_dictionary, mlp_transcoder

from featcircuits import load_model
from featcircuits.graph import ReplacementModel, build_graph, verify
from featcircuits.patching.linear_backward import unsupported_reason


def assert_same_graph(model, dictionaries, prompt, **kw):
    rm = ReplacementModel(model, dictionaries)
    assert unsupported_reason(rm) is None
    linear = build_graph(rm, prompt=prompt, engine="linear", progress=False, **kw)
    reference = build_graph(rm, prompt=prompt, engine="autograd", progress=False, **kw)
    assert linear.node_ids == reference.node_ids
    scale = reference.adjacency.abs().max()
    assert scale > 0.1
    assert (linear.adjacency - reference.adjacency).abs().max() <= 1e-6 * scale
    return linear


def test_stories260k_gqa_rmsnorm_with_attention_and_residual_saes(stories_model, single_torch_thread):
    torch.manual_seed(3)
    dictionaries = [mlp_transcoder(layer, 64, d_sae=64, bias=-0.9) for layer in (0, 2, 3)]  # 1 and 4 bare
    dictionaries += [attn_sae(1, 64, bias=-0.5),
                     make_dictionary("blocks.2.hook_resid_mid", "blocks.2.hook_resid_mid", 64, 64, -0.5, kind="sae"),
                     make_dictionary("blocks.3.hook_resid_pre", "blocks.4.hook_mlp_out", 64, 64, -0.9)]
    # small batches: seeds of one batch span few positions, so the truncated backward is exercised
    graph = assert_same_graph(stories_model, dictionaries, PROMPT, batch_size=7)
    assert verify(graph, n_sources=30, seed=2).max_rel_error <= 1e-5


def test_layernorm_gpt2_skip_transcoder_and_capped_graph(tiny_gpt2, single_torch_thread):
    torch.manual_seed(4)
    dictionaries = [mlp_transcoder(0, 32, d_sae=64, kind="skip_transcoder"),
                    make_dictionary("blocks.1.hook_resid_mid", "blocks.1.hook_mlp_out", 32, 48, -0.3),
                    make_dictionary("blocks.0.hook_resid_pre", "blocks.0.hook_resid_pre", 32, 48, -0.2, kind="sae")]
    tokens = torch.tensor([0, 5, 17, 42, 8, 63, 21, 3])
    assert_same_graph(tiny_gpt2, dictionaries, tokens, batch_size=5)
    assert_same_graph(tiny_gpt2, dictionaries, tokens, batch_size=5, max_feature_nodes=20)


def test_unsupported_models_fall_back_to_autograd():
    model = load_model({**TINY_GPT2_CONFIG, "parallel_attn_mlp": True}, seed=0)
    rm = ReplacementModel(model, [mlp_transcoder(0, 32, d_sae=32)])
    assert "parallel_attn_mlp" in unsupported_reason(rm)
    with pytest.raises(ValueError, match="engine='autograd'"):
        build_graph(rm, prompt=[0, 5, 17], engine="linear", progress=False)
    graph = build_graph(rm, prompt=[0, 5, 17, 9], progress=False)  # auto: autograd
    assert verify(graph, n_sources=10).max_rel_error <= 1e-5
    with pytest.raises(ValueError, match="engine must be"):
        build_graph(rm, prompt=[0, 5], engine="fast", progress=False)
