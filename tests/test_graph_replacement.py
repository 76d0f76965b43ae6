"""ReplacementModel: exact reproduction, patching against plain TransformerLens hooks, node ids, bad input."""

from __future__ import annotations

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.graph import Node, ReplacementModel, parse_node_id

PROMPT = "Once upon a time there was a little"


def transcoder(layer: int, d_model: int, d_sae: int = 96, bias: float = -0.3, kind: str = "transcoder",
               activation: str = "relu", k: int | None = None) -> Dictionary:
    cfg = DictionaryConfig(d_in=d_model, d_sae=d_sae, kind=kind, activation=activation, k=k,
                           hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
    dictionary = Dictionary.from_config(cfg)
    with torch.no_grad():
        dictionary.b_enc.fill_(bias)
        dictionary.b_dec.normal_(0, 0.05)
        if dictionary.W_skip is not None:
            dictionary.W_skip.normal_(0, 0.05)
    return dictionary


def attn_sae(layer: int, d_model: int, d_sae: int = 64, bias: float = -0.3) -> Dictionary:
    dictionary = Dictionary.from_config(DictionaryConfig(d_in=d_model, d_sae=d_sae, hook_in=f"blocks.{layer}.hook_attn_out"))
    with torch.no_grad():
        dictionary.b_enc.fill_(bias)
    return dictionary


@pytest.fixture(scope="module")
def stories_rm(stories_model):
    return ReplacementModel(stories_model, [transcoder(0, 64), transcoder(3, 64, kind="skip_transcoder"),
                                            attn_sae(1, 64)])


def test_sites_in_forward_order_with_bare_mlps(stories_rm):
    assert [s.name for s in stories_rm.sites] == ["mlp0", "attn1", "mlp1", "mlp2", "mlp3", "mlp4"]
    assert [s.dictionary is None for s in stories_rm.sites] == [False, False, True, True, False, True]


@torch.no_grad()
def test_live_and_frozen_runs_reproduce_the_model(stories_rm, stories_model):
    clean = stories_rm.clean_run(PROMPT)
    reference = stories_model(clean.tokens[None])[0]
    # patches that change nothing force every site through decode(features) + error
    identity = {name: (lambda acts: acts) for name in ("mlp0", "attn1", "mlp3")}
    live = stories_rm.run(PROMPT, feature_acts=identity).logits[0]
    frozen = stories_rm.run(PROMPT, clean=clean, batch_size=2).logits
    torch.testing.assert_close(live, reference, atol=2e-5, rtol=0)
    torch.testing.assert_close(frozen, reference.expand(2, -1, -1), atol=2e-5, rtol=0)
    # some but not all features fire
    for name in ("mlp0", "attn1", "mlp3"):
        fraction = (clean.feature_acts[name] > 0).float().mean()
        assert 0.01 < fraction < 0.9


@torch.no_grad()
def test_live_patch_matches_a_plain_hook(stories_rm, stories_model):
    """Zeroing mlp0's features and error must equal writing the transcoder's bare b_dec at hook_mlp_out."""
    b_dec = stories_rm.site("mlp0").dictionary.b_dec
    tokens = stories_rm.to_tokens(PROMPT)
    expected = stories_model.run_with_hooks(
        tokens[None], fwd_hooks=[("blocks.0.hook_mlp_out", lambda x, hook: b_dec.expand_as(x))])[0]
    patched = stories_rm.run(tokens, feature_acts={"mlp0": torch.zeros(len(tokens), 96)},
                             errors={"mlp0": torch.zeros(len(tokens), 64)}).logits[0]
    torch.testing.assert_close(patched, expected, atol=2e-5, rtol=0)
    # a batch of two patterns: row 0 untouched, row 1 with the bare MLP 2 ablated
    errors = torch.stack([stories_rm.clean_run(tokens).errors["mlp2"], torch.zeros(len(tokens), 64)])
    both = stories_rm.run(tokens, errors={"mlp2": errors}).logits
    ablated = stories_model.run_with_hooks(tokens[None], fwd_hooks=[("blocks.2.hook_mlp_out", lambda x, hook: 0 * x)])
    torch.testing.assert_close(both[0], stories_model(tokens[None])[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(both[1], ablated[0], atol=2e-5, rtol=0)


def test_node_ids_round_trip():
    nodes = [Node("feature", 5, site="mlp3", feature=1207), Node("error", 0, site="attn1"), Node("embedding", 2),
             Node("target", 7, name="395", is_logit=True), Node("target", -1, name="answer-distractor"),
             Node("feature", -3, site="resid_post2", feature=4)]
    for node in nodes:
        assert parse_node_id(node.id) == node
    assert nodes[0].id == "mlp3:1207@5"
    with pytest.raises(ValueError, match="not a node id"):
        parse_node_id("mlp3_1207_5")


def test_bad_dictionaries_are_refused(stories_model, tiny_gpt2):
    with pytest.raises(KeyError, match="blocks.9.ln2.hook_normalized"):
        ReplacementModel(stories_model, [transcoder(9, 64)])
    with pytest.raises(ValueError, match="d_in=32"):
        ReplacementModel(stories_model, [transcoder(0, 32)])  # a dictionary for a 32-wide model
    with pytest.raises(ValueError, match="d_in=64"):
        ReplacementModel(tiny_gpt2, [transcoder(0, 64)])
    with pytest.raises(ValueError, match="at most one dictionary per site"):
        ReplacementModel(stories_model, [transcoder(1, 64), transcoder(1, 64)])
    bad = Dictionary.from_config(DictionaryConfig(d_in=64, d_sae=8, hook_in="blocks.0.ln1.hook_normalized"))
    with pytest.raises(ValueError, match="hook_out must be one of"):
        ReplacementModel(stories_model, [bad])


def test_bad_prompts_are_refused(stories_rm):
    with pytest.raises(ValueError, match="empty"):
        stories_rm.to_tokens("   ")
    with pytest.raises(ValueError, match="no tokens"):
        stories_rm.to_tokens([])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stories_rm.to_tokens([1, 600])
    with pytest.raises(ValueError, match="context is 512"):
        stories_rm.to_tokens([1] * 513)
