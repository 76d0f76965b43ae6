"""NaN and infinity never pass as results: diverged training fails instead of saving, every loader refuses
non-finite weights naming the file and tensor, and JSON files stay strict JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import STORIES260K, relu_transcoders
from safetensors.torch import load_file, save_file

from featcircuits.cli import main as cli_main
from featcircuits.dictionaries import Dictionary, DictionaryConfig
from featcircuits.dictionaries.io import load_dictionaries, save_dictionary
from featcircuits.dictionaries.io.common import write_json
from featcircuits.hub.readers import dictionary_from_gemma_scope_npz, dictionary_from_saelens_folder
from featcircuits.training import TrainConfig, run_training

D_IN, D_SAE = 8, 16
DATASET = STORIES260K.parent.parent / "data" / "tinystories" / "train_head.txt"
HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_write_json_never_emits_nan(tmp_path):
    data = {"fvu": float("nan"), "curve": [1.0, float("inf"), -float("inf")], "np": np.float32("nan"),
            "torch": torch.tensor(float("nan")), "fine": 0.5, "nested": {"kl": float("nan")}}
    write_json(tmp_path / "m.json", data)
    loaded = strict_loads((tmp_path / "m.json").read_text())  # the old writer wrote bare NaN / Infinity
    assert loaded == {"fvu": None, "curve": [1.0, None, None], "np": None, "torch": None, "fine": 0.5,
                      "nested": {"kl": None}}


# -- loaders ---------------------------------------------------------------------------------------


def dictionary(**overrides) -> Dictionary:
    fields = dict(d_in=D_IN, d_sae=D_SAE, kind="transcoder", activation="relu", hook_in="blocks.0.ln2.hook_normalized",
                  hook_out="blocks.0.hook_mlp_out", layer=0, model_name="m")
    return Dictionary.from_config(DictionaryConfig(**{**fields, **overrides}))


def poison(weights, tensor: str) -> None:
    tensors = load_file(weights)
    tensors[tensor][0].fill_(float("nan"))
    save_file(tensors, str(weights))


@pytest.mark.parametrize("format, weights, tensor", [
    ("native", "dictionary.safetensors", "W_dec"),
    ("saelens", "sae_weights.safetensors", "b_enc"),
    ("circuit_tracer", "layer_0.safetensors", "W_enc"),
])
def test_format_loaders_reject_nonfinite_weights(tmp_path, format, weights, tensor):
    save_dictionary([dictionary()] if format == "circuit_tracer" else dictionary(), tmp_path, format=format)
    poison(tmp_path / weights, tensor)
    with pytest.raises(ValueError, match=rf"Tensor '{tensor}' in .*{weights} holds \d+ NaN") as err:
        load_dictionaries(tmp_path)
    assert "lower learning rate" in str(err.value)


def test_sparsify_loader_rejects_nonfinite_weights(tmp_path):
    hookpoint = tmp_path / "layers.0.mlp"
    hookpoint.mkdir()
    (hookpoint / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 4, "num_latents": D_SAE, "d_in": D_IN,
                                                   "transcode": True}))
    save_file({"encoder.weight": torch.zeros(D_SAE, D_IN), "encoder.bias": torch.full((D_SAE,), float("inf")),
               "W_dec": torch.zeros(D_SAE, D_IN), "b_dec": torch.zeros(D_IN)}, str(hookpoint / "sae.safetensors"))
    with pytest.raises(ValueError, match=r"Tensor 'encoder.bias' in .*sae.safetensors holds 16 NaN or infinite"):
        load_dictionaries(tmp_path)


def test_hub_readers_reject_nonfinite_weights(tmp_path):
    save_dictionary(dictionary(kind="sae", hook_out="", d_out=None), tmp_path / "sl", format="saelens")
    poison(tmp_path / "sl" / "sae_weights.safetensors", "W_enc")
    with pytest.raises(ValueError, match=r"Tensor 'W_enc' in .*sl holds"):
        dictionary_from_saelens_folder(tmp_path / "sl")
    params = {"W_enc": np.zeros((D_IN, D_SAE), np.float32), "W_dec": np.zeros((D_SAE, D_IN), np.float32),
              "b_enc": np.zeros(D_SAE, np.float32), "b_dec": np.zeros(D_IN, np.float32),
              "threshold": np.full(D_SAE, np.nan, np.float32)}
    np.savez(tmp_path / "params.npz", **params)
    with pytest.raises(ValueError, match=r"Tensor 'threshold' in .*params.npz holds 16 NaN"):
        dictionary_from_gemma_scope_npz(tmp_path / "params.npz", "blocks.0.hook_resid_post", "blocks.0.hook_resid_post")


def test_nonfinite_dictionary_is_not_saved(tmp_path):
    save_dictionary(dictionary(), tmp_path / "d")
    before = (tmp_path / "d" / "dictionary.safetensors").read_bytes()
    broken = dictionary()
    with torch.no_grad():
        broken.W_dec.fill_(float("nan"))
    for format in ("native", "saelens", "circuit_tracer"):
        with pytest.raises(ValueError, match="NaN or infinite.*refusing to write"):
            save_dictionary([broken] if format == "circuit_tracer" else broken, tmp_path / "d", format=format)
    assert (tmp_path / "d" / "dictionary.safetensors").read_bytes() == before


def test_graph_command_names_the_nonfinite_tensor(tmp_path, stories_model, capsys):
    for d in relu_transcoders(stories_model, d_sae=8):
        save_dictionary(d, tmp_path / "tc" / d.cfg.hook_in)
    poison(tmp_path / "tc" / "blocks.2.ln2.hook_normalized" / "dictionary.safetensors", "W_dec")
    code = cli_main(["graph", "--model", str(STORIES260K), "--dictionaries", str(tmp_path / "tc"),
                     "--prompt", "Once upon a time", "--out", str(tmp_path / "g.json")])
    err = capsys.readouterr().err
    assert code == 2 and "Tensor 'W_dec'" in err and "blocks.2.ln2.hook_normalized" in err, err
    assert "cycle" not in err and not (tmp_path / "g.json").exists()


# -- training ----------------------------------------------------------------------------------------


def diverging_config(out, architecture: str, lr: float) -> TrainConfig:
    return TrainConfig(model=str(STORIES260K), hooks=[HOOK_IN], hooks_out=[HOOK_OUT], kind="transcoder",
                       architecture=architecture, k=8, d_sae=64, lr=lr, total_tokens=4096, batch_size=256,
                       dataset=str(DATASET), out=str(out), progress=False)


def test_relu_at_absurd_lr_fails_and_keeps_the_earlier_dictionary(tmp_path, capsys):
    out = tmp_path / "run"
    earlier = dictionary(hook_in=HOOK_IN, hook_out=HOOK_OUT, d_in=64, layer=1)
    save_dictionary(earlier, out / HOOK_IN)
    before = (out / HOOK_IN / "dictionary.safetensors").read_bytes()
    code = cli_main(["train", "--model", str(STORIES260K), "--hook", HOOK_IN, "--hook-out", HOOK_OUT,
                     "--kind", "transcoder", "--architecture", "relu", "--lr", "1e30", "--tokens", "4096",
                     "--batch-size", "256", "--d-sae", "64", "--dataset", str(DATASET), "--out", str(out),
                     "--no-progress"])
    err = capsys.readouterr().err
    # The old code exited 0 with every decoder weight NaN and bare NaN in metrics.json.
    assert code == 2, err
    assert "Training diverged" in err and HOOK_IN in err and "lower learning rate" in err and "non-finite" in err
    assert (out / HOOK_IN / "dictionary.safetensors").read_bytes() == before
    assert not (out / "metrics.json").exists()


def test_topk_with_absurd_fvu_fails(tmp_path):
    with pytest.raises(ValueError, match=r"Training diverged.*ended at FVU .* above 1000.*lower learning rate") as err:
        run_training(diverging_config(tmp_path / "run", "topk", 1e12))  # the old code saved it at FVU 4e23
    assert isinstance(err.value, FloatingPointError)
    assert not (tmp_path / "run" / HOOK_IN).exists()


def test_sane_run_still_saves_strict_json(tmp_path):
    run_training(diverging_config(tmp_path / "run", "topk", 1e-3))
    metrics = strict_loads((tmp_path / "run" / "metrics.json").read_text())
    assert math.isfinite(metrics["fvu"]) and metrics["fvu"] < 10
