"""A set of dictionaries loads whole or fails naming what is wrong; one dictionary's files are saved as a unit;
a dictionary recorded for another model warns when used with this one."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import relu_transcoders
from safetensors.torch import save_file

from featcircuits.dictionaries import Dictionary, DictionaryConfig
from featcircuits.dictionaries.io import load_dictionaries, load_dictionary, save_dictionary
from featcircuits.hub.checks import check_dictionaries_match_model

D_IN, D_SAE = 8, 16


def dictionary(seed: int = 0, layer: int = 0, **overrides) -> Dictionary:
    torch.manual_seed(seed)
    fields = dict(d_in=D_IN, d_sae=D_SAE, kind="transcoder", activation="topk", k=4, model_name="m",
                  hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out", layer=layer)
    result = Dictionary.from_config(DictionaryConfig(**{**fields, **overrides}))
    with torch.no_grad():
        for param in result.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return result


def write_set(root: Path, n: int = 5, format: str = "native") -> list[Path]:
    """``n`` per-layer transcoders, one sub-directory each, as ``featcircuits train --out`` lays them out."""
    dirs = []
    for layer in range(n):
        save_dictionary(dictionary(layer, layer), root / f"blocks.{layer}.ln2.hook_normalized", format=format)
        dirs.append(root / f"blocks.{layer}.ln2.hook_normalized")
    return dirs


def same_weights(a: Dictionary, b: Dictionary) -> bool:
    return a.cfg.activation == b.cfg.activation and all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# -- partial sets ----------------------------------------------------------------------------------


def test_complete_set_loads_and_unrelated_folders_are_skipped(tmp_path):
    write_set(tmp_path)
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "rank0.pt").write_bytes(b"x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not a dictionary")
    (tmp_path / "metrics.json").write_text("{}")
    assert len(load_dictionaries(tmp_path)) == 5


def test_sub_directory_without_cfg_json_fails_naming_it(tmp_path):
    dirs = write_set(tmp_path)
    (dirs[3] / "cfg.json").unlink()  # the old code skipped it and ran on 4 of 5 transcoders
    with pytest.raises(ValueError) as err:
        load_dictionaries(tmp_path)
    message = str(err.value)
    assert str(dirs[3]) in message and "dictionary.safetensors has no cfg.json" in message


def test_sub_directory_with_config_but_no_weights_fails(tmp_path):
    dirs = write_set(tmp_path)
    (dirs[1] / "dictionary.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="dictionary.safetensors does not exist") as err:
        load_dictionaries(tmp_path)
    assert str(dirs[1]) in str(err.value)
    (dirs[1] / "cfg.json").write_text(json.dumps({"d_in": D_IN}))  # a config of no known format, alone
    with pytest.raises(ValueError, match="cfg.json has no weights file") as err:
        load_dictionaries(tmp_path)
    assert str(dirs[1]) in str(err.value)


def test_cfg_json_without_format_fails(tmp_path):
    dirs = write_set(tmp_path)
    config = json.loads((dirs[2] / "cfg.json").read_text())
    del config["format"]
    (dirs[2] / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match='lacks "format": "featcircuits"') as err:
        load_dictionaries(tmp_path)
    assert str(dirs[2]) in str(err.value)


@pytest.mark.parametrize("field", ["activation", "kind", "hook_in", "hook_out", "d_out", "k"])
def test_native_config_fields_that_select_behaviour_are_never_defaulted(tmp_path, field):
    save_dictionary(dictionary(), tmp_path, format="native")
    config = json.loads((tmp_path / "cfg.json").read_text())
    del config[field]  # the old code read a TopK transcoder without "activation" as a ReLU (and so on)
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"lacks field\(s\) \['{field}'\]") as err:
        load_dictionary(tmp_path)
    assert str(tmp_path / "cfg.json") in str(err.value)


@pytest.mark.parametrize("change", ["architecture", "hook_name", "k", "d_out"])
def test_saelens_config_fields_are_never_defaulted(tmp_path, change):
    save_dictionary(dictionary(kind="sae", hook_out="", d_out=None) if change == "k"
                    else dictionary(activation="relu", k=None), tmp_path, format="saelens")
    config = json.loads((tmp_path / "cfg.json").read_text())
    if change == "hook_name":
        del config["metadata"]["hook_name"]
    else:
        del config[change]
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=change) as err:
        load_dictionary(tmp_path)
    assert str(tmp_path / "cfg.json") in str(err.value)


def test_sparsify_config_without_k_fails(tmp_path):
    hookpoint = tmp_path / "layers.0"
    hookpoint.mkdir()
    (hookpoint / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": D_SAE, "d_in": D_IN}))
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.zeros(D_SAE),
               "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, str(hookpoint / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"lacks \['k'\]") as err:  # the old code assumed k=32
        load_dictionaries(tmp_path)
    assert str(hookpoint / "cfg.json") in str(err.value)


def test_half_written_files_fail(tmp_path):
    dirs = write_set(tmp_path, n=2)
    shutil.rmtree(dirs[1])
    dirs[1].mkdir()
    (dirs[1] / ".dictionary.safetensors.abc123.tmp").write_bytes(b"\0" * 10)  # a write killed half-way
    with pytest.raises(ValueError, match="temporary files of a write that never finished"):
        load_dictionaries(tmp_path)


def test_killed_convert_leaves_an_error_not_a_smaller_set(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_set(src)
    dst = tmp_path / "dst"
    from featcircuits.cli import main as cli_main
    from featcircuits.dictionaries.io import common

    calls = {"n": 0}
    real_save_file = common.save_file

    def killed_on_fourth(tensors, filename, metadata=None):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # like a kill: no cleanup code for OSError runs
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(common, "save_file", killed_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        cli_main(["convert", str(src), str(dst), "--to", "native"])
    monkeypatch.undo()
    # Whatever the interrupted convert left, loading dst never yields 3 of the 5 transcoders.
    try:
        loaded = load_dictionaries(dst)
    except (ValueError, FileNotFoundError) as err:
        assert "interrupted" in str(err) or "does not exist" in str(err)
    else:
        pytest.fail(f"an interrupted convert loaded as a set of {len(loaded)}")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".dst.tmp-")]
    if leftovers:  # the unfinished set sits beside dst; loading the parent names it
        with pytest.raises(ValueError, match="interrupted save"):
            load_dictionaries(tmp_path)


# -- one dictionary's files are committed together ----------------------------------------------------


@pytest.mark.parametrize("format", ["native", "saelens", "circuit_tracer"])
def test_failed_second_write_keeps_the_old_dictionary_intact(tmp_path, monkeypatch, format):
    kind = {"kind": "sae", "hook_out": "", "d_out": None} if format == "saelens" else {}  # sae-lens: no TopK transcoder
    old = [dictionary(0, activation="relu", k=None, **kind)]
    new = [dictionary(1, activation="topk", k=4, **kind) if format != "circuit_tracer"
           else dictionary(1, activation="relu", k=None)]
    if format == "circuit_tracer":  # one file per layer: the set's second layer is the second file
        old.append(dictionary(2, 1, activation="relu", k=None))
        new.append(dictionary(3, 1, activation="relu", k=None))
    save_dictionary(old if format == "circuit_tracer" else old[0], tmp_path / "d", format=format)
    before = load_dictionaries(tmp_path / "d")
    calls = {"n": 0}

    def second_fails(real):
        def rename(src, dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError("disk full (simulated) on the second rename")
            return real(src, dst)
        return rename

    # The old code committed each file with its own os.replace: a failure after the first paired the new
    # TopK weights with the old ReLU config.
    monkeypatch.setattr(os, "replace", second_fails(os.replace))
    monkeypatch.setattr(os, "rename", second_fails(os.rename))
    with pytest.raises(OSError, match="simulated"):
        save_dictionary(new if format == "circuit_tracer" else new[0], tmp_path / "d", format=format)
    monkeypatch.undo()
    after = load_dictionaries(tmp_path / "d")
    assert all(same_weights(a, b) for a, b in zip(before, after, strict=True))
    assert after[0].cfg.activation == "relu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary left behind


def test_crash_between_directory_renames_is_named_on_load(tmp_path, monkeypatch):
    root = tmp_path / "set"
    dirs = write_set(root, n=2)
    real_rename = os.rename

    def crash_on_rename_in(src, dst):
        if Path(src).name.startswith(f".{dirs[1].name}.tmp-"):
            raise KeyboardInterrupt  # killed after the old version was moved aside
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", crash_on_rename_in)
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(dictionary(7, 1), dirs[1], format="native")
    monkeypatch.undo()
    assert not dirs[1].exists()
    with pytest.raises(ValueError, match="interrupted save") as err:
        load_dictionaries(root)
    assert dirs[1].name in str(err.value)
    with pytest.raises(FileNotFoundError, match=r"interrupted.*\.old-\*"):
        load_dictionaries(dirs[1])


def test_save_keeps_files_it_does_not_own(tmp_path):
    save_dictionary(dictionary(0), tmp_path / "d", format="native")
    (tmp_path / "d" / "README.md").write_text("notes")
    (tmp_path / "d" / "extra").mkdir()
    save_dictionary(dictionary(1), tmp_path / "d", format="native")
    assert (tmp_path / "d" / "README.md").read_text() == "notes" and (tmp_path / "d" / "extra").is_dir()
    assert same_weights(load_dictionary(tmp_path / "d"), dictionary(1))


def test_circuit_tracer_save_drops_stale_layers(tmp_path):
    save_dictionary([dictionary(layer, layer, activation="relu", k=None) for layer in range(3)], tmp_path / "ct",
                    format="circuit_tracer")
    save_dictionary([dictionary(layer, layer, activation="relu", k=None) for layer in range(2)], tmp_path / "ct",
                    format="circuit_tracer")
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.yaml", "layer_0.safetensors",
                                                                    "layer_1.safetensors"]
    assert len(yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())["transcoders"]) == 2


# -- a dictionary for another model --------------------------------------------------------------------


def test_dictionary_of_another_model_with_matching_widths_warns(stories_model):
    dictionaries = relu_transcoders(stories_model, d_sae=8)
    for d in dictionaries:
        d.cfg.model_name = "roneneldan/TinyStories-1M"
    with pytest.warns(UserWarning, match=r"record model 'roneneldan/TinyStories-1M' but are used with 'stories260k'"):
        check_dictionaries_match_model(stories_model, dictionaries)
    for d in dictionaries:
        d.cfg.model_name = "/somewhere/stories260k"  # the same model by another path: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dictionaries_match_model(stories_model, dictionaries)
