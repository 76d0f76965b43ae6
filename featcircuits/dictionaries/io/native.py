"""featcircuits' own layout: ``cfg.json`` (a DictionaryConfig) + ``dictionary.safetensors``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base import Dictionary
from ..config import DictionaryConfig
from .common import (
    DICTIONARY_NONFINITE_FIX,
    atomic_directory,
    check_finite,
    read_json,
    read_tensors,
    write_json,
    write_tensors,
)

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "dictionary.safetensors"
FORMAT_TAG = "featcircuits"
# Fields that decide what the dictionary computes and where it is spliced: every native save writes them,
# so a file without one is incomplete, never something to fill with a default (a ReLU for a TopK...).
REQUIRED_FIELDS = ("d_in", "d_sae", "d_out", "kind", "activation", "hook_in", "hook_out")


def owns(name: str) -> bool:
    """Whether a file name in a dictionary directory is one this format writes (and so replaces)."""
    return name in (CONFIG_FILE, WEIGHTS_FILE)


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).exists() and read_json(path / CONFIG_FILE).get("format") == FORMAT_TAG


def expected_shapes(cfg: DictionaryConfig) -> tuple[dict, dict]:
    if cfg.kind == "cross_layer_transcoder":
        return _cross_layer_shapes(cfg), {}
    required = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    if cfg.kind == "skip_transcoder":
        required["W_skip"] = (cfg.d_in, cfg.d_out)
    if cfg.activation == "jumprelu":
        required["threshold"] = (cfg.d_sae,)
    if cfg.activation == "batchtopk":
        required["threshold"] = ()
    return required, {}


def _cross_layer_shapes(cfg: DictionaryConfig) -> dict:
    n = cfg.n_layers
    assert n is not None  # DictionaryConfig checks it for this kind
    required = {
        "W_enc": (n, cfg.d_in, cfg.d_sae),
        "b_enc": (n, cfg.d_sae),
        "W_dec": (cfg.d_sae, n * (n + 1) // 2, cfg.d_out),
        "b_dec": (n, cfg.d_out),
    }
    if cfg.activation == "jumprelu":
        required["threshold"] = (n, cfg.d_sae)
    if cfg.activation == "batchtopk":
        required["threshold"] = (n,)
    return required


def state_for_saving(dictionary: Dictionary) -> dict[str, torch.Tensor]:
    tensors = {
        "W_enc": dictionary.W_enc,
        "b_enc": dictionary.b_enc,
        "W_dec": dictionary.W_dec,
        "b_dec": dictionary.b_dec,
    }
    if dictionary.W_skip is not None:
        tensors["W_skip"] = dictionary.W_skip
    if dictionary.threshold is not None:
        tensors["threshold"] = dictionary.threshold
    return tensors


def dictionary_from_tensors(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], device) -> Dictionary:
    dictionary = Dictionary.from_config(cfg, device=device)
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name == "threshold":
                dictionary.set_threshold(tensor)
            else:
                getattr(dictionary, name).copy_(tensor.to(dictionary.dtype))
    return dictionary


def save(dictionaries: list[Dictionary], path: Path) -> None:
    if len(dictionaries) != 1:
        raise ValueError("The native format holds one dictionary per directory; save each to its own directory.")
    (dictionary,) = dictionaries
    from ..._version import __version__

    tensors = state_for_saving(dictionary)
    check_finite(tensors, f"the {dictionary.cfg.kind} for {dictionary.cfg.hook_in!r}",
                 f"refusing to write it to {path} (anything there is unchanged); retrain with a lower learning rate.")
    # Weights and config are written into a fresh directory that then replaces ``path`` whole: a crash
    # between the two writes cannot pair new weights with an old config.
    with atomic_directory(path, owns) as tmp:
        write_tensors(tmp / WEIGHTS_FILE, tensors)
        write_json(tmp / CONFIG_FILE, {"format": FORMAT_TAG, "featcircuits_version": __version__,
                                       **dictionary.cfg.to_dict()})


def load(path: Path, device: str | torch.device = "cpu") -> list[Dictionary]:
    source = path / CONFIG_FILE
    data = read_json(source)
    data.pop("format", None)
    data.pop("featcircuits_version", None)
    missing = [name for name in REQUIRED_FIELDS if name not in data]
    if data.get("activation") in ("topk", "batchtopk") and data.get("k") is None:
        missing.append("k")
    if data.get("kind") == "cross_layer_transcoder" and data.get("n_layers") is None:
        missing.append("n_layers")
    if missing:
        raise ValueError(f"{source} lacks field(s) {missing}, which every featcircuits save writes: the config is "
                         "incomplete (hand-edited or truncated). Save the dictionary again, or add the fields.")
    cfg = DictionaryConfig.from_dict(data, source=str(source))
    required, optional = expected_shapes(cfg)
    tensors = read_tensors(path / WEIGHTS_FILE, required, optional, nonfinite_fix=DICTIONARY_NONFINITE_FIX)
    return [dictionary_from_tensors(cfg, tensors, device)]
