"""circuit-tracer transcoder sets: the files we write have the layout circuit-tracer's loader reads, compute
what circuit-tracer computes from them, and read back exactly.

circuit-tracer cannot be installed beside our transformers, so the reference here is its loader and forward
re-stated from its source: decoderesearch/circuit-tracer (formerly safety-research/circuit-tracer) at commit
4bb8c0ea10bde09727e14565ec8469656880da53, files circuit_tracer/transcoder/single_layer_transcoder.py
(``load_transcoder``: tensors W_enc [d_sae, d_model], W_dec [d_sae, d_model], b_enc, b_dec, optional W_skip and
``activation_function.threshold``; ``SingleLayerTranscoder.encode`` = F.linear(x, W_enc, b_enc) then the
activation, ``decode`` = acts @ W_dec + b_dec, skip = x @ W_skip.T; ``load_transcoder_set``: activation
relu | topk (k) | else JumpReLU from the threshold tensor), circuit_tracer/transcoder/activation_functions.py
(JumpReLU x * (x > t); TopK keeps the top k without a ReLU), circuit_tracer/utils/hf_utils.py and
circuit_tracer/utils/caching.py (config.yaml keys model_kind, feature_input_hook, feature_output_hook, scan,
activation, k, transcoders; cache directories of layer_{i}.safetensors).
benchmarks/check_circuit_tracer_format.py runs circuit-tracer's own loader on our files in a separate venv.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file

from featcircuits.dictionaries import Dictionary, DictionaryConfig
from featcircuits.dictionaries.io import detect_format, load_dictionaries, save_dictionary

D_MODEL, D_SAE, N_LAYERS = 16, 48, 3


def make_set(kind: str = "transcoder", activation: str = "relu", k: int | None = None) -> list[Dictionary]:
    dictionaries = []
    for layer in range(N_LAYERS):
        cfg = DictionaryConfig(d_in=D_MODEL, d_sae=D_SAE, kind=kind, activation=activation, k=k,
                               hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out",
                               layer=layer, model_name="karpathy/stories260K")
        dictionary = Dictionary.from_config(cfg)
        with torch.no_grad():
            for param in dictionary.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
            if dictionary.threshold is not None:
                dictionary.threshold.copy_(torch.rand_like(dictionary.threshold) * 0.5)
        dictionaries.append(dictionary)
    return dictionaries


def circuit_tracer_forward(config: dict, tensors: dict[str, torch.Tensor], x: torch.Tensor):
    """SingleLayerTranscoder.forward as circuit-tracer computes it from its files (see module docstring)."""
    pre_acts = F.linear(x, tensors["W_enc"], tensors["b_enc"])
    activation = config.get("activation")
    if activation == "relu" or (activation is None and "activation_function.threshold" not in tensors):
        acts = F.relu(pre_acts)
    elif activation == "topk":
        _, indices = torch.topk(pre_acts, k=config["k"], dim=-1)
        acts = pre_acts * torch.zeros_like(pre_acts).scatter_(-1, indices, 1)
    else:
        acts = pre_acts * (pre_acts > tensors["activation_function.threshold"])
    out = acts @ tensors["W_dec"] + tensors["b_dec"]
    if "W_skip" in tensors:
        out = out + x @ tensors["W_skip"].T
    return out, acts


@pytest.mark.parametrize(
    ("kind", "activation", "k"),
    [("transcoder", "relu", None), ("skip_transcoder", "jumprelu", None), ("transcoder", "topk", 6),
     ("skip_transcoder", "batchtopk", 6)],
)
def test_written_set_has_circuit_tracer_layout_and_outputs(tmp_path, kind, activation, k):
    ours = make_set(kind, activation, k)
    save_dictionary(ours, tmp_path, format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set"
    assert config["feature_input_hook"] == "ln2.hook_normalized"
    assert config["feature_output_hook"] == "hook_mlp_out"
    assert config["model_name"] == "karpathy/stories260K" and config["scan"]
    assert config["transcoders"] == [f"layer_{layer}.safetensors" for layer in range(N_LAYERS)]
    assert config["activation"] == {"batchtopk": "jumprelu"}.get(activation, activation)
    x = torch.randn(2, 7, D_MODEL)
    for layer, dictionary in enumerate(ours):
        tensors = load_file(tmp_path / config["transcoders"][layer])
        expected = {"W_enc": (D_SAE, D_MODEL), "W_dec": (D_SAE, D_MODEL), "b_enc": (D_SAE,), "b_dec": (D_MODEL,)}
        if kind == "skip_transcoder":
            expected["W_skip"] = (D_MODEL, D_MODEL)
        if activation in ("jumprelu", "batchtopk"):
            expected["activation_function.threshold"] = (D_SAE,)
        # No "k" tensor even for TopK: circuit-tracer's load_transcoder loads every tensor into the module
        # strictly (load_state_dict), so k lives in config.yaml only.
        assert {name: tuple(t.shape) for name, t in tensors.items()} == expected
        if activation == "topk":
            assert config["k"] == k
            # Encoder bias shifted up so every token has >= k positive pre-activations: there circuit-tracer's
            # TopK (no ReLU) and ours agree; the format module's docstring states the difference.
            with torch.no_grad():
                dictionary.b_enc.add_(3.0)
                tensors["b_enc"] += 3.0
        reference_out, reference_acts = circuit_tracer_forward(config, tensors, x)
        if activation == "topk":
            assert (dictionary.pre_acts(x).topk(k).values > 0).all()
        reconstruction, feature_acts = dictionary(x)
        assert torch.equal(feature_acts, reference_acts)
        assert torch.equal(reconstruction, reference_out)


def test_round_trip_through_our_reader_is_exact(tmp_path):
    ours = make_set("skip_transcoder", "jumprelu")
    save_dictionary(ours, tmp_path, format="circuit_tracer")
    assert detect_format(tmp_path) == "circuit_tracer"
    back = load_dictionaries(tmp_path)
    x = torch.randn(4, 5, D_MODEL)
    assert [d.cfg.layer for d in back] == list(range(N_LAYERS))
    for original, loaded in zip(ours, back, strict=True):
        assert (loaded.cfg.kind, loaded.cfg.activation) == ("skip_transcoder", "jumprelu")
        assert (loaded.cfg.hook_in, loaded.cfg.hook_out) == (original.cfg.hook_in, original.cfg.hook_out)
        assert loaded.cfg.model_name == "karpathy/stories260K"
        assert torch.equal(loaded(x).reconstruction, original(x).reconstruction)
        assert torch.equal(loaded(x).feature_acts, original(x).feature_acts)


def test_reads_circuit_tracer_cache_layout(tmp_path):
    """circuit-tracer's own cache (``save_transcoders_to_cache``): layer_i.safetensors and a yaml without a list,
    tensors as ``SingleLayerTranscoder.to_safetensors`` names them."""
    W_enc, W_dec = torch.randn(2, D_SAE, D_MODEL), torch.randn(2, D_SAE, D_MODEL)
    b_enc, b_dec, threshold = torch.randn(2, D_SAE), torch.randn(2, D_MODEL), torch.rand(2, D_SAE)
    for layer in range(2):
        save_file({"W_enc": W_enc[layer], "W_dec": W_dec[layer], "b_enc": b_enc[layer], "b_dec": b_dec[layer],
                   "activation_function.threshold": threshold[layer]}, tmp_path / f"layer_{layer}.safetensors")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "model_name": "google/gemma-2-2b", "scan": "gemma-2-2b",
        "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out"}))
    back = load_dictionaries(tmp_path)
    assert [d.cfg.hook_in for d in back] == ["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid"]
    x = torch.randn(6, D_MODEL)
    for layer, loaded in enumerate(back):
        assert loaded.cfg.activation == "jumprelu"  # inferred from the threshold tensor, as circuit-tracer does
        tensors = load_file(tmp_path / f"layer_{layer}.safetensors")
        reference_out, reference_acts = circuit_tracer_forward({}, tensors, x)
        # circuit-tracer's F.linear is a fused addmm, which rounds differently from matmul + bias with some
        # thread counts: equal to float32 rounding, not always to the bit
        torch.testing.assert_close(loaded.encode(x), reference_acts, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(loaded(x).reconstruction, reference_out, rtol=1e-6, atol=1e-5)


def test_reads_k_from_the_file_when_the_yaml_lacks_it(tmp_path):
    """``SingleLayerTranscoder.to_safetensors`` stores TopK's k as a scalar tensor ``k``."""
    save_dictionary(make_set("transcoder", "topk", 5), tmp_path, format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del config["k"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="topk but gives no k"):
        load_dictionaries(tmp_path)
    for layer in range(N_LAYERS):
        file = tmp_path / f"layer_{layer}.safetensors"
        save_file({**load_file(file), "k": torch.tensor(5)}, file)
    assert [d.cfg.k for d in load_dictionaries(tmp_path)] == [5] * N_LAYERS


def test_sets_circuit_tracer_cannot_hold_are_refused(tmp_path):
    sae = Dictionary.from_config(DictionaryConfig(d_in=D_MODEL, d_sae=D_SAE, hook_in="blocks.0.hook_resid_pre"))
    with pytest.raises(ValueError, match="circuit-tracer holds transcoders"):
        save_dictionary(sae, tmp_path / "a", format="circuit-tracer")
    gap = make_set()[1:]  # layers 1 and 2 only
    with pytest.raises(ValueError, match=r"every layer 0..n-1; got layers \[1, 2\]"):
        save_dictionary(gap, tmp_path / "b", format="circuit-tracer")
    negative = make_set("transcoder", "jumprelu")
    with torch.no_grad():
        negative[0].threshold[0] = -0.1
    with pytest.raises(ValueError, match="negative thresholds"):
        save_dictionary(negative, tmp_path / "c", format="circuit-tracer")
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abc")


def test_hub_and_npz_entries_are_named_in_the_error(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "feature_input_hook": "hook_resid_mid", "feature_output_hook": "hook_mlp_out",
        "transcoders": ["hf://mntss/transcoder-Llama-3.2-1B/layer_0.safetensors"]}))
    with pytest.raises(ValueError, match="hf://mntss/transcoder-Llama-3.2-1B/layer_0.safetensors.*local files"):
        load_dictionaries(tmp_path)
