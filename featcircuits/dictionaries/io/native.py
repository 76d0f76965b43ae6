"""featcircuits' own layout: ``cfg.json`` (a DictionaryConfig) + ``dictionary.safetensors``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..base import Dictionary
from ..config import DictionaryConfig
from .common import read_json, read_tensors, write_json, write_tensors

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "dictionary.safetensors"
FORMAT_TAG = "featcircuits"


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).exists() and read_json(path / CONFIG_FILE).get("format") == FORMAT_TAG


def expected_shapes(cfg: DictionaryConfig) -> tuple[dict, dict]:
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
            target = dictionary.threshold if name == "threshold" else getattr(dictionary, name)
            target.copy_(tensor.to(target.dtype))
    return dictionary


def save(dictionaries: list[Dictionary], path: Path) -> None:
    if len(dictionaries) != 1:
        raise ValueError("The native format holds one dictionary per directory; save each to its own directory.")
    (dictionary,) = dictionaries
    from ..._version import __version__

    path.mkdir(parents=True, exist_ok=True)
    write_tensors(path / WEIGHTS_FILE, state_for_saving(dictionary))
    write_json(path / CONFIG_FILE, {"format": FORMAT_TAG, "featcircuits_version": __version__, **dictionary.cfg.to_dict()})


def load(path: Path, device: str | torch.device = "cpu") -> list[Dictionary]:
    data = read_json(path / CONFIG_FILE)
    data.pop("format", None)
    data.pop("featcircuits_version", None)
    cfg = DictionaryConfig.from_dict(data, source=str(path / CONFIG_FILE))
    required, optional = expected_shapes(cfg)
    tensors = read_tensors(path / WEIGHTS_FILE, required, optional)
    return [dictionary_from_tensors(cfg, tensors, device)]
