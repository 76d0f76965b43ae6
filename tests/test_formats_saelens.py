"""SAELens format: files that sae-lens itself saves are read with identical outputs, and files we write load
in ``sae_lens.SAE.load_from_disk`` with identical outputs (sae-lens is the reference throughout)."""

from __future__ import annotations

import json

import pytest
import torch

sae_lens = pytest.importorskip("sae_lens")
from sae_lens import SAE  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    BatchTopKTrainingSAE,
    BatchTopKTrainingSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata  # noqa: E402
from sae_lens.saes.transcoder import (  # noqa: E402
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    JumpReLUTranscoder,
    JumpReLUTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    Transcoder,
    TranscoderConfig,
)

from featcircuits.dictionaries import Dictionary, DictionaryConfig  # noqa: E402
from featcircuits.dictionaries.io import detect_format, load_dictionary, save_dictionary  # noqa: E402

D_IN, D_SAE, D_OUT = 16, 64, 12


def metadata(transcoder: bool = False) -> SAEMetadata:
    extra = {"hook_name_out": "blocks.2.hook_mlp_out"} if transcoder else {}
    return SAEMetadata(model_name="stories260k", hook_name="blocks.2.ln2.hook_normalized" if transcoder
                       else "blocks.2.hook_resid_pre", prepend_bos=True, context_size=64, **extra)


def randomise(sae: torch.nn.Module) -> torch.nn.Module:
    """Random weights so every term (biases, skip path, thresholds) matters."""
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(torch.randn_like(param) * 0.3)
            if name == "threshold":
                param.abs_()
    return sae


SAELENS_CASES = {
    "standard": lambda: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=metadata())),
    "topk": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, metadata=metadata())),
    "topk_no_b_dec_in": lambda: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, apply_b_dec_to_input=False,
                                                      metadata=metadata())),
    "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=metadata())),
    "transcoder": lambda: Transcoder(TranscoderConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
                                                      metadata=metadata(True))),
    "skip_transcoder": lambda: SkipTranscoder(SkipTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=metadata(True))),
    "jumprelu_transcoder": lambda: JumpReLUTranscoder(JumpReLUTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=metadata(True))),
    "jumprelu_skip_transcoder": lambda: JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False, metadata=metadata(True))),
}
EXPECTED = {
    "standard": ("sae", "relu"), "topk": ("sae", "topk"), "topk_no_b_dec_in": ("sae", "topk"),
    "jumprelu": ("sae", "jumprelu"), "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"), "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}


def inputs(d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(3, 5, d_in)  # [batch, pos, d_in]


def assert_same_outputs(ours: Dictionary, reference, x: torch.Tensor) -> None:
    reconstruction, feature_acts = ours(x)
    assert torch.equal(feature_acts, reference.encode(x))
    assert torch.equal(reconstruction, reference(x))
    assert torch.equal(ours.decode(feature_acts, x), reference(x))
    assert (feature_acts > 0).any() and (feature_acts == 0).any()  # the activation did something


@pytest.mark.parametrize("name", list(SAELENS_CASES))
def test_read_what_saelens_saves_and_write_back(name, tmp_path):
    reference = randomise(SAELENS_CASES[name]())
    reference.save_model(tmp_path / "theirs")
    assert detect_format(tmp_path / "theirs") == "saelens"
    ours = load_dictionary(tmp_path / "theirs")
    assert (ours.cfg.kind, ours.cfg.activation) == EXPECTED[name]
    assert ours.cfg.model_name == "stories260k" and ours.cfg.layer == 2
    assert ours.cfg.hook_in == reference.cfg.metadata.hook_name
    assert ours.cfg.hook_out == (reference.cfg.metadata.hook_name_out or reference.cfg.metadata.hook_name)
    x = inputs()
    assert_same_outputs(ours, reference, x)

    save_dictionary(ours, tmp_path / "ours", format="saelens")
    reloaded = SAE.load_from_disk(str(tmp_path / "ours"))
    assert type(reloaded) is type(reference)
    assert reloaded.cfg.metadata.hook_name == reference.cfg.metadata.hook_name
    assert reloaded.cfg.metadata.model_name == "stories260k"
    assert reloaded.cfg.metadata.context_size == 64  # metadata we do not map survives the round trip
    assert_same_outputs(ours, reloaded, x)


def test_batchtopk_saved_by_saelens_reads_as_batchtopk(tmp_path):
    training = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4, metadata=metadata()))
    randomise(training)
    training.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    training.save_inference_model(tmp_path / "theirs")
    reference = SAE.load_from_disk(str(tmp_path / "theirs"))
    assert isinstance(reference, JumpReLUSAE)  # sae-lens' inference form of BatchTopK
    ours = load_dictionary(tmp_path / "theirs")
    assert (ours.cfg.activation, ours.cfg.k) == ("batchtopk", 4)
    assert float(ours.threshold) == pytest.approx(0.4)
    assert_same_outputs(ours, reference, inputs())


def test_our_batchtopk_is_written_as_jumprelu_with_global_threshold(tmp_path):
    ours = Dictionary.from_config(DictionaryConfig(d_in=D_IN, d_sae=D_SAE, activation="batchtopk", k=4,
                                                   hook_in="blocks.0.hook_resid_post", model_name="m"))
    randomise(ours)
    with torch.no_grad():
        ours.threshold.fill_(0.5)
    save_dictionary(ours, tmp_path, format="saelens")
    reference = SAE.load_from_disk(str(tmp_path))
    assert isinstance(reference, JumpReLUSAE)
    assert torch.equal(reference.threshold, torch.full((D_SAE,), 0.5))
    assert_same_outputs(ours, reference, inputs())
    again = load_dictionary(tmp_path)
    assert (again.cfg.activation, again.cfg.k) == ("batchtopk", 4)


def test_topk_rescaled_by_decoder_norm_is_folded(tmp_path):
    """rescale_acts_by_decoder_norm is the same function with unit decoder rows: equal up to rounding."""
    reference = randomise(TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True,
                                                metadata=metadata())))
    reference.save_model(tmp_path / "theirs")
    ours = load_dictionary(tmp_path / "theirs")
    assert torch.allclose(ours.decoder_norms(), torch.ones(D_SAE), atol=1e-6)
    x = inputs()
    reconstruction, feature_acts = ours(x)
    assert torch.equal(feature_acts > 0, reference.encode(x) > 0)  # same features selected
    torch.testing.assert_close(feature_acts, reference.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reconstruction, reference(x), rtol=1e-5, atol=1e-6)
    save_dictionary(ours, tmp_path / "ours", format="saelens")
    assert json.loads((tmp_path / "ours" / "cfg.json").read_text())["rescale_acts_by_decoder_norm"] is False
    assert_same_outputs(ours, SAE.load_from_disk(str(tmp_path / "ours")), x)


def test_normalize_activations_with_scaling_factor(tmp_path):
    """expected_average_only_in + sae-lens' activation_scaler.json: the scale becomes our norm_scale."""
    from sae_lens.training.activation_scaler import ActivationScaler

    reference = randomise(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, metadata=metadata(),
                                                        normalize_activations="expected_average_only_in")))
    reference.save_model(tmp_path / "theirs")
    scaler = ActivationScaler(scaling_factor=2.5)
    scaler.save(str(tmp_path / "theirs" / "activation_scaler.json"))
    ours = load_dictionary(tmp_path / "theirs")
    assert ours.cfg.norm_scale == 2.5
    x = inputs()
    reconstruction, feature_acts = ours(x)
    assert torch.equal(feature_acts, reference.encode(scaler.scale(x)))
    assert torch.equal(reconstruction, scaler.unscale(reference(scaler.scale(x))))

    # Written back, the scale is folded (sae-lens inference SAEs read raw activations); folding rounds.
    save_dictionary(ours, tmp_path / "ours", format="saelens")
    assert ours.cfg.norm_scale == 2.5  # the caller's dictionary is untouched
    folded = SAE.load_from_disk(str(tmp_path / "ours"))
    assert folded.cfg.normalize_activations == "none"
    torch.testing.assert_close(folded(x), reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"normalize_activations": "layer_norm"}, "normalize_activations='layer_norm'"),
        ({"normalize_activations": "expected_average_only_in"}, "activation_scaler.json"),
        ({"reshape_activations": "hook_z"}, "reshape_activations"),
        ({"architecture": "gated"}, "'gated'"),
        ({"metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.attn.hook_z", "hook_head_index": 3}},
         "hook_head_index"),
    ],
)
def test_unrepresentable_options_raise_naming_them(tmp_path, change, named):
    randomise(SAELENS_CASES["standard"]()).save_model(tmp_path)
    config = json.loads((tmp_path / "cfg.json").read_text())
    config.update(change)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cfg.json") as err:
        load_dictionary(tmp_path)
    assert named in str(err.value)


def test_topk_transcoder_has_no_saelens_architecture(tmp_path):
    ours = Dictionary.from_config(DictionaryConfig(d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, kind="transcoder",
                                                   activation="topk", k=3))
    with pytest.raises(ValueError, match="sae-lens has no architecture for a transcoder with topk"):
        save_dictionary(ours, tmp_path / "out", format="saelens")
    assert not (tmp_path / "out" / "cfg.json").exists()


@pytest.mark.parametrize("name", ["topk", "jumprelu", "skip_transcoder"])
def test_bit_identical_at_realistic_width(tmp_path, name):
    """At widths in the hundreds a fused addmm rounds differently from sae-lens' matmul + bias; we match it."""
    d_in, d_sae = 64, 1024  # stories260k's d_model, a 16x dictionary
    meta = metadata(transcoder=name == "skip_transcoder")
    reference = {
        "topk": lambda: TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=32, metadata=meta)),
        "jumprelu": lambda: JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=meta)),
        "skip_transcoder": lambda: SkipTranscoder(SkipTranscoderConfig(
            d_in=d_in, d_sae=d_sae, d_out=d_in, apply_b_dec_to_input=False, metadata=meta)),
    }[name]()
    randomise(reference).save_model(tmp_path)
    assert_same_outputs(load_dictionary(tmp_path), reference, torch.randn(4, 128, d_in))
