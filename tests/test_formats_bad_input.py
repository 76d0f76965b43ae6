"""Bad files give errors that name the file (or tensor) and what was expected; failing saves lose nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from featcircuits.dictionaries import Dictionary, DictionaryConfig
from featcircuits.dictionaries.io import (
    common,
    load_dictionaries,
    load_dictionary,
    saelens,
    save_dictionary,
)

D_IN, D_SAE = 8, 32


def dictionary(seed: int = 0, **overrides) -> Dictionary:
    torch.manual_seed(seed)
    cfg = dict(d_in=D_IN, d_sae=D_SAE, activation="topk", k=4, hook_in="blocks.0.hook_resid_post", model_name="m")
    result = Dictionary.from_config(DictionaryConfig(**{**cfg, **overrides}))
    with torch.no_grad():
        for param in result.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return result


def transcoder_set(seed: int = 0, n_layers: int = 2) -> list[Dictionary]:
    return [dictionary(seed + layer, kind="transcoder", activation="relu", k=None, layer=layer,
                       hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out")
            for layer in range(n_layers)]


@pytest.fixture(params=["native", "saelens", "circuit_tracer"])
def saved(request, tmp_path) -> tuple[str, Path, Path]:
    """(format, directory, its weights file) for one freshly written dictionary."""
    name = request.param
    if name == "circuit_tracer":
        save_dictionary(transcoder_set(n_layers=1), tmp_path, format=name)
        return name, tmp_path, tmp_path / "layer_0.safetensors"
    save_dictionary(dictionary(), tmp_path, format=name)
    weights = {"native": "dictionary.safetensors", "saelens": "sae_weights.safetensors"}[name]
    return name, tmp_path, tmp_path / weights


def rewrite_tensors(weights: Path, change) -> None:
    tensors = load_file(weights)
    change(tensors)
    save_file(tensors, weights)


def test_missing_tensor_is_named(saved):
    _, path, weights = saved
    rewrite_tensors(weights, lambda tensors: tensors.pop("b_enc"))
    with pytest.raises(KeyError) as err:
        load_dictionary(path)
    assert str(weights) in str(err.value) and "lacks tensor 'b_enc'" in str(err.value)


def test_wrong_shape_is_named_with_the_expected_shape(saved):
    fmt, path, weights = saved
    def widen(tensors):
        tensors["W_dec"] = torch.zeros(D_SAE, D_IN + 1)
    rewrite_tensors(weights, widen)
    with pytest.raises(ValueError) as err:
        load_dictionary(path)
    message = str(err.value)
    assert str(weights) in message and "'W_dec'" in message and f"shape {(D_SAE, D_IN + 1)}" in message
    if fmt != "circuit_tracer":  # circuit-tracer's width is fixed by b_dec, which still says D_IN
        assert f"expected {(D_SAE, D_IN)}" in message


def test_truncated_safetensors_is_named(saved):
    _, path, weights = saved
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_dictionary(path)
    assert str(weights) in str(err.value)


def test_corrupt_safetensors_is_named(saved):
    _, path, weights = saved
    weights.write_bytes(os.urandom(weights.stat().st_size))
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        load_dictionary(path)
    assert str(weights) in str(err.value)


@pytest.mark.parametrize("fmt", ["native", "saelens"])
def test_cfg_json_with_unknown_architecture(tmp_path, fmt):
    save_dictionary(dictionary(), tmp_path, format=fmt)
    config_file = tmp_path / "cfg.json"
    config = json.loads(config_file.read_text())
    config["architecture" if fmt == "saelens" else "activation"] = "mystery"
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'mystery'") as err:
        load_dictionary(tmp_path)
    message = str(err.value)
    assert str(config_file) in message
    assert ("'topk'" in message) and ("'jumprelu'" in message)  # what was expected instead


def test_sparsify_cfg_json_with_unknown_activation(tmp_path):
    hookpoint = tmp_path / "layers.1"
    hookpoint.mkdir()
    (hookpoint / "cfg.json").write_text(json.dumps({"activation": "mystery", "k": 4, "num_latents": D_SAE, "d_in": D_IN}))
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, hookpoint / "sae.safetensors")
    with pytest.raises(ValueError, match=r"cfg\.json has activation 'mystery'.*'topk'") as err:
        load_dictionary(hookpoint)
    assert str(hookpoint / "cfg.json") in str(err.value)


def test_corrupt_config_files_are_named(tmp_path):
    save_dictionary(dictionary(), tmp_path / "a", format="saelens")
    (tmp_path / "a" / "cfg.json").write_text('{"d_in": 8, "d_sae"')
    with pytest.raises(ValueError, match="not valid JSON.*corrupt or truncated") as err:
        load_dictionary(tmp_path / "a")
    assert str(tmp_path / "a" / "cfg.json") in str(err.value)
    save_dictionary(transcoder_set(), tmp_path / "b", format="circuit-tracer")
    (tmp_path / "b" / "config.yaml").write_text("transcoders: [layer_0.safetensors\nfeature_input_hook: {")
    with pytest.raises(ValueError, match="not valid YAML.*corrupt or truncated") as err:
        load_dictionaries(tmp_path / "b")
    assert str(tmp_path / "b" / "config.yaml") in str(err.value)


def test_directory_with_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("not a dictionary")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError) as err:
        load_dictionary(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "no dictionary in a known format" in message
    assert "notes.txt" in message and "cfg.json" in message  # what it found and what it looked for


def test_circuit_tracer_yaml_missing_keys_and_files(tmp_path):
    save_dictionary(transcoder_set(), tmp_path, format="circuit-tracer")
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    (tmp_path / "layer_1.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="layer_1.safetensors"):
        load_dictionaries(tmp_path)
    del config["feature_output_hook"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=r"config\.yaml lacks key\(s\) \['feature_output_hook'\]"):
        load_dictionaries(tmp_path)


# -- nothing already written is lost ----------------------------------------------------------


def failing_save_file(tensors, filename, metadata=None):
    """Writes half a file, then fails, as a full disk or a crash would."""
    Path(filename).write_bytes(b"partial")
    raise OSError("No space left on device")


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_saelens_dictionary_survives_a_failing_overwrite(tmp_path, monkeypatch):
    old = dictionary(seed=1)
    save_dictionary(old, tmp_path, format="saelens")
    before = snapshot(tmp_path)
    monkeypatch.setattr(saelens, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_dictionary(dictionary(seed=2), tmp_path, format="saelens")
    assert snapshot(tmp_path) == before  # no partial file, no stray temporary
    x = torch.randn(5, D_IN)
    assert torch.equal(load_dictionary(tmp_path)(x).reconstruction, old(x).reconstruction)


def test_circuit_tracer_set_survives_a_failure_on_its_last_layer(tmp_path, monkeypatch):
    old = transcoder_set(seed=1, n_layers=3)
    save_dictionary(old, tmp_path, format="circuit-tracer")
    before = snapshot(tmp_path)
    calls = []

    def fail_on_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            failing_save_file(tensors, filename)
        save_file(tensors, filename, metadata)

    monkeypatch.setattr(common, "save_file", fail_on_third)  # circuit-tracer layouts write through common
    with pytest.raises(OSError):
        save_dictionary(transcoder_set(seed=5, n_layers=3), tmp_path, format="circuit-tracer")
    assert len(calls) == 3 and snapshot(tmp_path) == before  # layers 0 and 1 were not swapped in alone
    x = torch.randn(5, D_IN)
    for original, loaded in zip(old, load_dictionaries(tmp_path), strict=True):
        assert torch.equal(loaded(x).reconstruction, original(x).reconstruction)


def test_unwritable_dictionary_leaves_the_old_one(tmp_path):
    """Validation happens before any file is touched: a refused save changes nothing."""
    save_dictionary(dictionary(), tmp_path, format="saelens")
    before = snapshot(tmp_path)
    topk_transcoder = dictionary(kind="transcoder", d_out=D_IN + 2)
    with pytest.raises(ValueError, match="sae-lens has no architecture"):
        save_dictionary(topk_transcoder, tmp_path, format="saelens")
    with pytest.raises(ValueError, match="read-only"):
        save_dictionary(dictionary(), tmp_path, format="sparsify")
    assert snapshot(tmp_path) == before
