"""Cross-layer transcoders: what they compute (against a hand-written loop), their decoder memory, native files and
circuit-tracer's CLT layout (written and read against a reference computed from the files as circuit-tracer's
``CrossLayerTranscoder.encode``/``decode`` do: decoderesearch/circuit-tracer 0.5.0,
circuit_tracer/transcoder/cross_layer_transcoder.py), and bad input.

benchmarks/check_clt_format.py runs circuit-tracer's own loader on these files in its own environment.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_hub_loading import hub_cache  # noqa: F401  (the offline Hub cache fixture)

import featcircuits as fc
from featcircuits.cli import main
from featcircuits.dictionaries import CrossLayerTranscoder, Dictionary, DictionaryConfig
from featcircuits.dictionaries.io import detect_format, load_dictionary, save_dictionary
from featcircuits.hub.checks import check_dictionaries_match_model

N_LAYERS, D_MODEL, D_SAE, K = 4, 12, 20, 5
HOOK_IN, HOOK_OUT = "blocks.{layer}.ln2.hook_normalized", "blocks.{layer}.hook_mlp_out"


def make_clt(activation: str = "relu", n_layers: int = N_LAYERS, d_model: int = D_MODEL, seed: int = 0,
             norm_scale: float = 1.0) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    cfg = DictionaryConfig(d_in=d_model, d_sae=D_SAE, kind="cross_layer_transcoder", n_layers=n_layers,
                           activation=activation, k=K if activation in ("topk", "batchtopk") else None,
                           hook_in=HOOK_IN, hook_out=HOOK_OUT, model_name="stories260k", norm_scale=norm_scale)
    clt = Dictionary.from_config(cfg)
    assert isinstance(clt, CrossLayerTranscoder)
    with torch.no_grad():
        for param in clt.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
        if clt.threshold is not None:
            clt.set_threshold(torch.rand_like(clt.threshold) * 0.4)
    return clt


def reference_activation(pre: torch.Tensor, activation: str, threshold, layer: int) -> torch.Tensor:
    """One token's activation of one layer, written out element by element."""
    out = torch.zeros_like(pre)
    if activation == "topk":
        kept = sorted(range(len(pre)), key=lambda i: -float(pre[i]))[:K]
        for i in kept:
            out[i] = max(float(pre[i]), 0.0)
        return out
    for i in range(len(pre)):
        value = float(pre[i])
        if activation == "relu":
            out[i] = max(value, 0.0)
        else:  # jumprelu: per-feature threshold; batchtopk at inference: the layer's one threshold
            t = float(threshold[layer, i]) if activation == "jumprelu" else float(threshold[layer])
            out[i] = value if value > t and value > 0 else 0.0
    return out


def reference_forward(W_enc, b_enc, decoders, b_dec, activation, threshold, x, norm_scale=1.0):
    """Loops over tokens, source and output layers: MLP output M = sum_{L<=M} acts_L @ W_dec_L[:, M-L] + b_dec[M].

    ``W_enc [n, d, f]`` (x @ W_enc), ``decoders[L] [f, n-L, d]``; ``x [tokens, n, d]``."""
    tokens, n, _ = x.shape
    acts = torch.zeros(tokens, n, W_enc.shape[-1], dtype=torch.float64)
    out = torch.zeros(tokens, n, b_dec.shape[-1], dtype=torch.float64)
    for t in range(tokens):
        for layer in range(n):
            pre = (x[t, layer].double() * norm_scale) @ W_enc[layer].double() + b_enc[layer].double()
            acts[t, layer] = reference_activation(pre, activation, threshold, layer)
        for out_layer in range(n):
            total = b_dec[out_layer].double().clone()
            for layer in range(out_layer + 1):
                total += acts[t, layer] @ decoders[layer][:, out_layer - layer].double()
            out[t, out_layer] = total / norm_scale
    return out, acts


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_outputs_match_a_hand_written_reference(activation):
    clt = make_clt(activation, norm_scale=1.7)
    x = torch.randn(6, N_LAYERS, D_MODEL)
    with torch.no_grad():
        reconstruction, feature_acts = clt(x)
        decoders = [clt.decoder(layer) for layer in range(N_LAYERS)]
        expected, expected_acts = reference_forward(clt.W_enc, clt.b_enc, decoders, clt.b_dec, activation,
                                                    clt.threshold, x, norm_scale=1.7)
        assert feature_acts.shape == (6, N_LAYERS, D_SAE) and reconstruction.shape == (6, N_LAYERS, D_MODEL)
        torch.testing.assert_close(feature_acts.double(), expected_acts, atol=1e-5, rtol=0)
        torch.testing.assert_close(reconstruction.double(), expected, atol=1e-5, rtol=0)
        for layer in range(N_LAYERS):  # the per-layer API a patched forward uses, layer by layer
            torch.testing.assert_close(clt.encode_layer(x[:, layer], layer), feature_acts[:, layer])
            torch.testing.assert_close(clt.decode_layer(feature_acts[:, : layer + 1], layer), reconstruction[:, layer])
        # folding the norm scale changes the weights, not the outputs
        folded = clt.fold_norm_scale()
        assert folded.cfg.norm_scale == 1.0
        torch.testing.assert_close(folded(x)[0], reconstruction, atol=1e-5, rtol=1e-5)
    if activation == "topk":  # every token keeps k latents per layer
        assert bool(((feature_acts > 0).sum(-1) <= K).all())


def test_decoder_memory_is_the_triangle_of_layers():
    clt = make_clt()
    by_hand = sum(D_SAE * (N_LAYERS - layer) * D_MODEL for layer in range(N_LAYERS)) * 4  # float32
    assert clt.decoder_bytes == by_hand == clt.W_dec.numel() * 4
    assert [tuple(clt.decoder(layer).shape) for layer in range(N_LAYERS)] == [
        (D_SAE, N_LAYERS - layer, D_MODEL) for layer in range(N_LAYERS)]
    # the per-layer views tile W_dec exactly: writing through them fills every column once
    with torch.no_grad():
        clt.W_dec.zero_()
        for layer in range(N_LAYERS):
            clt.decoder(layer).add_(layer + 1)
    assert bool((clt.W_dec > 0).all()) and float(clt.W_dec.detach().sum()) == sum(
        (layer + 1) * D_SAE * (N_LAYERS - layer) * D_MODEL for layer in range(N_LAYERS))
    assert clt.hooks_in[2] == "blocks.2.ln2.hook_normalized" and clt.hooks_out[3] == "blocks.3.hook_mlp_out"


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "topk", "batchtopk"])
def test_native_round_trip(tmp_path, activation):
    clt = make_clt(activation)
    clt.save(str(tmp_path / "clt"))
    assert detect_format(tmp_path / "clt") == "native"
    (loaded,) = fc.load_dictionaries(str(tmp_path / "clt"))
    assert isinstance(loaded, CrossLayerTranscoder) and loaded.cfg.n_layers == N_LAYERS
    x = torch.randn(5, N_LAYERS, D_MODEL)
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], clt(x)[0])
    # saved again over itself as a unit: one config, one weights file, nothing temporary left
    loaded.save(str(tmp_path / "clt"))
    assert sorted(p.name for p in (tmp_path / "clt").iterdir()) == ["cfg.json", "dictionary.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clt"]


def circuit_tracer_reference(directory, x: torch.Tensor):
    """circuit-tracer's computation from its files: encode = einsum(x, W_enc_i) + b_enc_i then ReLU or
    x * (x > threshold_i); decode: MLP output M = sum_{i<=M} acts_i @ W_dec_i[:, M-i] + b_dec_M."""
    n = len(list(directory.glob("W_enc_*.safetensors")))
    enc = [load_file(directory / f"W_enc_{i}.safetensors") for i in range(n)]
    dec = [load_file(directory / f"W_dec_{i}.safetensors")[f"W_dec_{i}"] for i in range(n)]
    acts = []
    for i in range(n):
        pre = torch.einsum("...d,fd->...f", x[..., i, :], enc[i][f"W_enc_{i}"]) + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]) if f"threshold_{i}" in enc[i] else pre.relu())
    out = [sum(acts[i] @ dec[i][:, m - i] for i in range(m + 1)) + enc[m][f"b_dec_{m}"] for m in range(n)]
    return torch.stack(out, -2), torch.stack(acts, -2)


@pytest.mark.parametrize("activation", ["relu", "jumprelu", "batchtopk"])
def test_circuit_tracer_layout_written(tmp_path, activation):
    clt = make_clt(activation, norm_scale=0.5)
    save_dictionary(clt, tmp_path / "ct", format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "cross_layer_transcoder" and config["model_name"] == "stories260k"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("ln2.hook_normalized", "hook_mlp_out")
    names = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert names == sorted(["config.yaml", *(f"W_{w}_{i}.safetensors" for w in ("enc", "dec") for i in range(N_LAYERS))])
    for i in range(N_LAYERS):
        enc = load_file(tmp_path / "ct" / f"W_enc_{i}.safetensors")
        assert enc[f"W_enc_{i}"].shape == (D_SAE, D_MODEL) and enc[f"b_dec_{i}"].shape == (D_MODEL,)
        assert (f"threshold_{i}" in enc) == (activation != "relu")
        assert load_file(tmp_path / "ct" / f"W_dec_{i}.safetensors")[f"W_dec_{i}"].shape == (D_SAE, N_LAYERS - i, D_MODEL)
    x = torch.randn(7, N_LAYERS, D_MODEL)
    expected, expected_acts = circuit_tracer_reference(tmp_path / "ct", x)
    with torch.no_grad():
        ours, ours_acts = clt(x)
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours_acts * 0.5, expected_acts * 0.5, atol=1e-5, rtol=1e-5)
        (loaded,) = fc.load_dictionaries(str(tmp_path / "ct"))
        assert loaded.cfg.activation == ("relu" if activation == "relu" else "jumprelu")
        torch.testing.assert_close(loaded(x)[0], expected, atol=1e-5, rtol=1e-5)


def write_circuit_tracer_files(directory, n_layers: int = N_LAYERS, jump_relu: bool = True) -> None:
    """A CLT as circuit-tracer's ``to_safetensors`` and cache write it, built here from its documented keys."""
    directory.mkdir()
    for i in range(n_layers):
        enc = {f"W_enc_{i}": torch.randn(D_SAE, D_MODEL) * 0.3, f"b_enc_{i}": torch.randn(D_SAE) * 0.3,
               f"b_dec_{i}": torch.randn(D_MODEL)}
        if jump_relu:
            enc[f"threshold_{i}"] = torch.rand(D_SAE) * 0.3
        save_file(enc, directory / f"W_enc_{i}.safetensors")
        save_file({f"W_dec_{i}": torch.randn(D_SAE, n_layers - i, D_MODEL) * 0.3}, directory / f"W_dec_{i}.safetensors")
    (directory / "config.yaml").write_text(yaml.dump({
        "model_kind": "cross_layer_transcoder", "feature_input_hook": "hook_resid_mid",
        "feature_output_hook": "hook_mlp_out", "scan": "someone/clt", "model_name": "stories260k"}))


@pytest.mark.parametrize("jump_relu", [False, True])
def test_circuit_tracer_layout_read(tmp_path, jump_relu):
    write_circuit_tracer_files(tmp_path / "ct", jump_relu=jump_relu)
    clt = load_dictionary(tmp_path / "ct")
    assert isinstance(clt, CrossLayerTranscoder)
    assert clt.hooks_in[1] == "blocks.1.hook_resid_mid" and clt.cfg.extra["circuit_tracer_scan"] == "someone/clt"
    x = torch.randn(9, N_LAYERS, D_MODEL)
    expected, expected_acts = circuit_tracer_reference(tmp_path / "ct", x)
    with torch.no_grad():
        reconstruction, acts = clt(x)
    torch.testing.assert_close(acts, expected_acts, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(reconstruction, expected, atol=1e-5, rtol=1e-5)
    # and back: the files written are the files read (exactly)
    save_dictionary(clt, tmp_path / "again", format="circuit-tracer")
    for i in range(N_LAYERS):
        for name in (f"W_enc_{i}.safetensors", f"W_dec_{i}.safetensors"):
            original, written = load_file(tmp_path / "ct" / name), load_file(tmp_path / "again" / name)
            assert original.keys() == written.keys()
            assert all(torch.equal(original[key], written[key]) for key in original)


def test_convert_cli_native_to_circuit_tracer_and_back(tmp_path):
    clt = make_clt("jumprelu")
    clt.save(str(tmp_path / "native"))
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "ct"), "--to", "circuit-tracer"]) == 0
    assert main(["convert", str(tmp_path / "ct"), str(tmp_path / "back"), "--to", "native"]) == 0
    assert detect_format(tmp_path / "ct") == "circuit_tracer" and detect_format(tmp_path / "back") == "native"
    x = torch.randn(4, N_LAYERS, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(load_dictionary(tmp_path / "back")(x)[0], clt(x)[0], atol=1e-6, rtol=1e-6)


# -- bad input ------------------------------------------------------------------------------------


def test_missing_layer_files_are_named(tmp_path):
    write_circuit_tracer_files(tmp_path / "ct")
    (tmp_path / "ct" / "W_enc_2.safetensors").unlink()
    with pytest.raises(ValueError, match=r"of 4 layers but lacks \['W_enc_2.safetensors'\]"):
        fc.load_dictionaries(str(tmp_path / "ct"))
    # the last layer gone entirely: W_dec_0 still says the CLT writes to 4 layers
    write_circuit_tracer_files(tmp_path / "ct2")
    (tmp_path / "ct2" / "W_enc_3.safetensors").unlink()
    (tmp_path / "ct2" / "W_dec_3.safetensors").unlink()
    with pytest.raises(ValueError, match=r"of 4 layers but lacks \['W_enc_3.safetensors', 'W_dec_3.safetensors'\]"):
        fc.load_dictionaries(str(tmp_path / "ct2"))
    # layer files without their config.yaml are a broken CLT, not "no dictionary here"
    (tmp_path / "set").mkdir()
    write_circuit_tracer_files(tmp_path / "set" / "ct3")
    (tmp_path / "set" / "ct3" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="have no circuit-tracer config.yaml beside them"):
        fc.load_dictionaries(str(tmp_path / "set"))


def test_wrong_decoder_shape_and_nonfinite_weights_refused(tmp_path):
    write_circuit_tracer_files(tmp_path / "ct")
    save_file({"W_dec_1": torch.randn(D_SAE, N_LAYERS, D_MODEL)}, tmp_path / "ct" / "W_dec_1.safetensors")
    with pytest.raises(ValueError, match=r"'W_dec_1'.*shape \(20, 4, 12\), expected \(20, 3, 12\)"):
        load_dictionary(tmp_path / "ct")
    write_circuit_tracer_files(tmp_path / "nan")
    decoder = torch.randn(D_SAE, N_LAYERS - 2, D_MODEL)
    decoder[3, 1, 2] = float("nan")
    save_file({"W_dec_2": decoder}, tmp_path / "nan" / "W_dec_2.safetensors")
    with pytest.raises(ValueError, match="'W_dec_2'.*NaN or infinite"):
        load_dictionary(tmp_path / "nan")
    clt = make_clt()
    clt.save(str(tmp_path / "good"))
    with torch.no_grad():
        clt.W_dec[0, 0, 0] = float("inf")
    for format, target in (("native", "good"), ("circuit-tracer", "ct")):
        before = {p.name: p.read_bytes() for p in (tmp_path / target).iterdir()}
        with pytest.raises(ValueError, match="NaN or infinite"):
            save_dictionary(clt, tmp_path / target, format=format)
        assert {p.name: p.read_bytes() for p in (tmp_path / target).iterdir()} == before  # nothing lost


def test_formats_that_cannot_hold_a_clt_say_so(tmp_path):
    with pytest.raises(ValueError, match="TopK CLT cannot be written in its layout"):
        save_dictionary(make_clt("topk"), tmp_path / "topk", format="circuit-tracer")
    transcoder = Dictionary.from_config(DictionaryConfig(d_in=D_MODEL, d_sae=D_SAE, kind="transcoder",
                                                         hook_in="blocks.0.ln2.hook_normalized",
                                                         hook_out="blocks.0.hook_mlp_out"))
    with pytest.raises(ValueError, match="Save the CLT to its own directory"):
        save_dictionary([make_clt(), transcoder], tmp_path / "mixed", format="circuit-tracer")
    with pytest.raises(ValueError, match="sae-lens has no architecture for a cross_layer_transcoder"):
        save_dictionary(make_clt(), tmp_path / "saelens", format="saelens")
    assert not (tmp_path / "topk").exists() and not (tmp_path / "mixed").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="needs n_layers"):
        DictionaryConfig(d_in=8, d_sae=8, kind="cross_layer_transcoder", hook_in=HOOK_IN, hook_out=HOOK_OUT)
    with pytest.raises(ValueError, match=r"template with one \{layer\}"):
        DictionaryConfig(d_in=8, d_sae=8, kind="cross_layer_transcoder", n_layers=2,
                         hook_in="blocks.0.ln2.hook_normalized", hook_out=HOOK_OUT)
    with pytest.raises(ValueError, match="n_layers=3 is for cross-layer transcoders"):
        DictionaryConfig(d_in=8, d_sae=8, kind="transcoder", n_layers=3)
    with pytest.raises(ValueError, match=r"takes inputs \[\.\.\., 4, 12\]"):
        make_clt()(torch.randn(3, D_MODEL))


def test_clt_against_the_model(tiny_llama):
    n, d = tiny_llama.cfg.n_layers, tiny_llama.cfg.d_model
    clt = make_clt(n_layers=n, d_model=d)
    with pytest.warns(UserWarning, match="record model 'stories260k'"):  # fits, trained on another model's name
        check_dictionaries_match_model(tiny_llama, [clt])
    with pytest.raises(ValueError, match=f"spans {n + 1} layers but the model has {n}"):
        check_dictionaries_match_model(tiny_llama, [make_clt(n_layers=n + 1, d_model=d)])
    with pytest.raises(ValueError, match=f"reads width {D_MODEL} at 'blocks.0.ln2.hook_normalized'"):
        check_dictionaries_match_model(tiny_llama, [make_clt(n_layers=n)])
    transcoder = Dictionary.from_config(DictionaryConfig(d_in=d, d_sae=D_SAE, kind="transcoder",
                                                         hook_in="blocks.1.ln2.hook_normalized",
                                                         hook_out="blocks.1.hook_mlp_out"))
    with pytest.raises(ValueError, match="writes MLP output 1, which the cross-layer transcoder already reconstructs"):
        check_dictionaries_match_model(tiny_llama, [clt, transcoder])
    with pytest.raises(ValueError, match="2 cross-layer transcoders given"):
        check_dictionaries_match_model(tiny_llama, [clt, make_clt(n_layers=n, d_model=d, seed=1)])
    sae = Dictionary.from_config(DictionaryConfig(d_in=d, d_sae=D_SAE, hook_in="blocks.1.hook_resid_post"))
    with pytest.warns(UserWarning, match="record model 'stories260k'"):  # an SAE elsewhere is fine
        check_dictionaries_match_model(tiny_llama, [clt, sae])


CLT_REGISTRY = """
releases:
  tiny-clt:
    repo_id: someone/tiny-clt
    model: stories260k
    format: circuit-tracer
    kind: cross_layer_transcoder
    dictionaries:
      - {id: clt, path: "clt-jumprelu"}
"""


def test_hub_release_of_a_circuit_tracer_clt(tmp_path, hub_cache):  # noqa: F811
    from test_hub_loading import write_cached_snapshot

    from featcircuits.hub.loading import HubFileError

    (tmp_path / "registry.yaml").write_text(CLT_REGISTRY)
    write_circuit_tracer_files(tmp_path / "files")
    files = {f"clt-jumprelu/{p.name}": p for p in (tmp_path / "files").iterdir()}
    write_cached_snapshot(hub_cache, "someone/tiny-clt", "c" * 40, files)
    (clt,) = fc.load_dictionaries("tiny-clt", registry=tmp_path / "registry.yaml")
    assert isinstance(clt, CrossLayerTranscoder) and clt.cfg.layer is None
    assert clt.cfg.extra["release"] == "tiny-clt" and clt.cfg.extra["revision"] == "main"
    x = torch.randn(5, N_LAYERS, D_MODEL)
    expected, _ = circuit_tracer_reference(tmp_path / "files", x)
    with torch.no_grad():
        torch.testing.assert_close(clt(x)[0], expected, atol=1e-5, rtol=1e-5)
    # a layer file the cache lacks (offline) is named
    del files["clt-jumprelu/W_enc_2.safetensors"]
    write_cached_snapshot(hub_cache, "someone/tiny-clt", "e" * 40, files, refs=("partial",))
    with pytest.raises(HubFileError, match="no file 'clt-jumprelu/W_enc_2.safetensors'"):
        fc.load_dictionaries("tiny-clt", revision="partial", registry=tmp_path / "registry.yaml")
