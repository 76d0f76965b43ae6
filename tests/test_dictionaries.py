"""Dictionary kinds and activations against direct computations from their definitions."""

from __future__ import annotations

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig, load_dictionary
from featcircuits.dictionaries import SAE, SkipTranscoder, Transcoder


def _make(**overrides) -> Dictionary:
    cfg = DictionaryConfig(**{"d_in": 12, "d_sae": 40, "hook_in": "blocks.0.hook_resid_pre", **overrides})
    dictionary = Dictionary.from_config(cfg)
    with torch.no_grad():
        dictionary.b_enc.normal_(0, 0.3)
        dictionary.b_dec.normal_(0, 0.3)
        if dictionary.W_skip is not None:
            dictionary.W_skip.normal_(0, 0.2)
    return dictionary


def _reference_pre(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    x = x * d.cfg.norm_scale
    if d.cfg.apply_b_dec_to_input:
        x = x - d.b_dec
    return x @ d.W_enc + d.b_enc


def test_kinds_dispatch():
    assert type(_make()) is SAE
    assert type(_make(kind="transcoder", d_out=7, hook_out="blocks.0.hook_mlp_out")) is Transcoder
    assert type(_make(kind="skip_transcoder", d_out=7)) is SkipTranscoder


def test_relu_sae_matches_definition():
    d = _make(apply_b_dec_to_input=True, norm_scale=2.5)
    x = torch.randn(3, 5, 12)
    recon, acts = d(x)
    pre = _reference_pre(d, x)
    torch.testing.assert_close(acts, pre.clamp(min=0))
    torch.testing.assert_close(recon, (acts @ d.W_dec + d.b_dec) / 2.5)


def test_topk_keeps_exactly_k_largest():
    d = _make(activation="topk", k=5)
    x = torch.randn(64, 12)
    acts = d.encode(x)
    pre = _reference_pre(d, x)
    kth = pre.sort(dim=-1, descending=True).values[:, 4:5]
    expected = torch.where(pre >= kth, pre.clamp(min=0), torch.zeros_like(pre))
    torch.testing.assert_close(acts, expected)
    assert ((acts > 0).sum(-1) <= 5).all()


def test_batchtopk_trains_across_batch_and_infers_with_threshold():
    d = _make(activation="batchtopk", k=3)
    x = torch.randn(16, 12)
    d.train()
    acts = d.encode(x)
    assert (acts > 0).sum() == 3 * 16  # k per token on average, chosen across the whole batch
    per_token = (acts > 0).sum(-1)
    assert per_token.max() > per_token.min()
    d.eval()
    d.activation.threshold.fill_(0.4)
    pre = _reference_pre(d, x)
    torch.testing.assert_close(d.encode(x), pre * (pre > 0.4))
    torch.testing.assert_close(d.encode(x[:1]), d.encode(x)[:1])  # no batch dependence at inference


def test_jumprelu_per_feature_threshold():
    d = _make(activation="jumprelu")
    with torch.no_grad():
        d.activation.threshold.uniform_(0.0, 0.5)
    x = torch.randn(8, 12)
    pre = _reference_pre(d, x)
    torch.testing.assert_close(d.encode(x), pre * (pre > d.activation.threshold))


def test_skip_transcoder_adds_dense_path():
    d = _make(kind="skip_transcoder", d_out=7, norm_scale=0.5)
    x = torch.randn(4, 12)
    recon, acts = d(x)
    torch.testing.assert_close(recon, (acts @ d.W_dec + d.b_dec + (x * 0.5) @ d.W_skip) / 0.5)
    with pytest.raises(ValueError, match="needs the input x"):
        d.decode(acts)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("kind", ["sae", "skip_transcoder"])
def test_fold_norm_scale_preserves_function(activation, kind):
    d = _make(activation=activation, k=4, kind=kind, norm_scale=3.0,
              apply_b_dec_to_input=kind == "sae", d_out=None if kind == "sae" else 9)
    if activation == "jumprelu":
        with torch.no_grad():
            d.activation.threshold.fill_(0.2)
    x = torch.randn(10, 12)
    before = d(x)
    # A JumpReLU threshold lives in pre-activation units, which folding leaves unchanged.
    d.fold_norm_scale()
    after = d(x)
    assert d.cfg.norm_scale == 1.0
    torch.testing.assert_close(after.feature_acts, before.feature_acts)
    torch.testing.assert_close(after.reconstruction, before.reconstruction)


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
def test_native_round_trip_is_exact(tmp_path, activation):
    d = _make(activation=activation, k=4, kind="skip_transcoder", d_out=9, layer=3, model_name="m",
              dataset="tinystories", training_tokens=1000)
    d.save(tmp_path / "d")
    loaded = load_dictionary(tmp_path / "d")
    assert loaded.cfg == d.cfg
    x = torch.randn(6, 12)
    assert torch.equal(loaded(x).reconstruction, d(x).reconstruction)


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="Unknown architecture/activation 'gated'"):
        DictionaryConfig(d_in=4, d_sae=8, activation="gated")
    with pytest.raises(ValueError, match="d_out=5 must equal d_in=4"):
        DictionaryConfig(d_in=4, d_sae=8, d_out=5)
    with pytest.raises(ValueError, match="k="):
        Dictionary.from_config(DictionaryConfig(d_in=4, d_sae=8, activation="topk"))


def test_width_mismatch_names_hook_and_fix(tiny_gpt2):
    d = _make(d_in=64, hook_in="blocks.0.hook_resid_pre", model_name="stories260k")
    _, cache = tiny_gpt2.run_with_cache(torch.tensor([[1, 2, 3]]))
    activation = cache["blocks.0.hook_resid_pre"]
    with pytest.raises(ValueError, match=r"blocks\.0\.hook_resid_pre.*d_in=64.*width 32.*another model"):
        d.check_input_width(activation.shape[-1], "blocks.0.hook_resid_pre of the tiny model")
