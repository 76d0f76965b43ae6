"""circuit-tracer's per-layer transcoder set: ``config.yaml`` + one safetensors file per layer.

The layout is the one circuit-tracer's loaders read (decoderesearch/circuit-tracer, formerly
safety-research/circuit-tracer, commit 4bb8c0ea10bde09727e14565ec8469656880da53:
``circuit_tracer/transcoder/single_layer_transcoder.py`` ``load_transcoder``/``load_transcoder_set``,
``circuit_tracer/utils/hf_utils.py`` ``load_transcoders``, ``circuit_tracer/utils/caching.py``
``load_transcoders_from_cache``)::

    config.yaml       model_kind: transcoder_set, model_name, feature_input_hook (e.g. "ln2.hook_normalized"),
                      feature_output_hook (e.g. "hook_mlp_out"), scan, activation (relu | topk | jumprelu), k,
                      transcoders: [layer_0.safetensors, ...]   (list index = layer)
    layer_L.safetensors
                      W_enc [d_sae, d_model]   (used as F.linear(x, W_enc, b_enc); the transpose of ours)
                      W_dec [d_sae, d_model], b_enc [d_sae], b_dec [d_model]
                      W_skip [d_model, d_model]  optional, used as x @ W_skip.T
                      activation_function.threshold [d_sae]  (JumpReLU), k (scalar, TopK), both optional

Hooks in the yaml are relative to ``blocks.L.``. circuit-tracer needs a transcoder for every layer
0..n-1 with one width; its JumpReLU is ``x * (x > threshold)`` (equal to ours for thresholds >= 0, which we
check), and its TopK keeps the k largest pre-activations without a ReLU (ours zeroes negative ones; the two
agree whenever a token has at least k positive pre-activations). Older files (``transcoders`` as a list of
``{id, layer, filepath}``, or no list beside ``layer_*.safetensors`` as in circuit-tracer's cache) are read too.
A ``config.yaml`` with ``model_kind: cross_layer_transcoder`` is a cross-layer transcoder: see circuit_tracer_clt.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

from ..base import Dictionary
from ..config import DictionaryConfig
from ..cross_layer import CrossLayerTranscoder
from . import circuit_tracer_clt
from .common import DICTIONARY_NONFINITE_FIX, read_tensors, write_layer_files

CONFIG_FILE = "config.yaml"
THRESHOLD = "activation_function.threshold"
_LAYER_PREFIX = re.compile(r"^blocks\.(\d+)\.(.+)$")
_LAYER_FILE = re.compile(r"^layer_(\d+)\.safetensors$")


def owns(name: str) -> bool:
    """Whether a file name in a transcoder-set directory is one a save replaces (stale layers too: circuit-
    tracer's cache loader would pick up the layers of a previous, larger set; a CLT's files likewise)."""
    return name == CONFIG_FILE or bool(_LAYER_FILE.match(name)) or circuit_tracer_clt.is_layer_file(name)


def detect(path: Path) -> bool:
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        config = yaml.safe_load((path / CONFIG_FILE).read_text())
    except yaml.YAMLError:
        return True  # ours to read: load() then reports the corrupt file by name
    return isinstance(config, dict) and ("transcoders" in config or config.get("model_kind") in (
        "transcoder_set", circuit_tracer_clt.MODEL_KIND))


# -- reading ----------------------------------------------------------------------------------


def read_config(path: Path) -> dict[str, Any]:
    source = path / CONFIG_FILE
    try:
        config = yaml.safe_load(source.read_text())
    except yaml.YAMLError as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{source} is not valid YAML ({reason}); the file is corrupt or truncated.") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source} should be a mapping with feature_input_hook, feature_output_hook, transcoders.")
    kind = config.get("model_kind", "transcoder_set")
    if kind not in ("transcoder_set", circuit_tracer_clt.MODEL_KIND):
        raise ValueError(f"{source} has model_kind={kind!r}; featcircuits reads per-layer transcoder sets "
                         f"(model_kind: transcoder_set) and cross-layer transcoders ({circuit_tracer_clt.MODEL_KIND}).")
    missing = [key for key in ("feature_input_hook", "feature_output_hook") if key not in config]
    if missing:
        raise ValueError(f"{source} lacks key(s) {missing}; circuit-tracer needs them to place the transcoders.")
    return config


def layer_files(path: Path, config: dict[str, Any]) -> dict[int, Path]:
    """Layer index -> local weights file, as the config names them (relative names are under ``path``)."""
    source = path / CONFIG_FILE
    entries = config.get("transcoders")
    if entries is None:  # circuit-tracer's cache layout: layer_L.safetensors beside the yaml
        found = {int(m.group(1)): p for p in path.iterdir() if (m := _LAYER_FILE.match(p.name))}
    else:
        found = {}
        for index, entry in enumerate(entries):
            layer, name = (entry.get("layer", index), entry.get("filepath")) if isinstance(entry, dict) else (index, entry)
            if not isinstance(name, str):
                raise ValueError(f"{source}: transcoders[{index}] names no file ({entry!r}).")
            if name.startswith("hf://"):
                raise ValueError(f"{source} names {name}, a Hub file; featcircuits reads local files only. Download "
                                 "the set first (circuit-tracer's save_transcoders_to_cache, or huggingface-cli).")
            if name.endswith(".npz"):
                raise ValueError(f"{source} names {name}, a GemmaScope .npz file; featcircuits reads safetensors.")
            found[int(layer)] = Path(name) if Path(name).is_absolute() else path / name
    if not found:
        raise ValueError(f"{source} names no transcoder files and {path} has no layer_*.safetensors.")
    return dict(sorted(found.items()))


def _activation(config: dict[str, Any], file: Path, names: set[str], source: Path) -> tuple[str, int | None]:
    activation = config.get("activation")
    if activation is None:  # circuit-tracer infers JumpReLU from the threshold tensor, else ReLU
        activation = "jumprelu" if THRESHOLD in names else "relu"
    if activation not in ("relu", "topk", "jumprelu"):
        raise ValueError(f"{source} has unknown activation {activation!r}; expected relu, topk or jumprelu.")
    k = config.get("k")
    if activation == "topk" and k is None:
        if "k" not in names:
            raise ValueError(f"{source} asks for activation topk but gives no k (in the yaml or as tensor 'k' in {file}).")
        k = int(read_tensors(file, {"k": ()})["k"])
    return activation, (int(k) if activation == "topk" else None)


def load(path: Path, device: str | torch.device = "cpu") -> list[Dictionary]:
    config = read_config(path)
    if config.get("model_kind") == circuit_tracer_clt.MODEL_KIND:
        return circuit_tracer_clt.load(path, config, device)
    source = path / CONFIG_FILE
    dictionaries = []
    for layer, file in layer_files(path, config).items():
        dims = read_tensors(file, {"b_enc": None, "b_dec": None})
        d_sae, d_model = dims["b_enc"].shape[0], dims["b_dec"].shape[0]
        with safe_open(str(file), framework="pt") as handle:
            names = set(handle.keys())
        activation, k = _activation(config, file, names, source)
        required = {"W_enc": (d_sae, d_model), "W_dec": (d_sae, d_model), "b_enc": (d_sae,), "b_dec": (d_model,)}
        optional = {"W_skip": (d_model, d_model), "k": ()}
        if activation == "jumprelu":
            required[THRESHOLD] = (d_sae,)
        unknown = sorted(names - set(required) - set(optional) - {THRESHOLD})
        if unknown:
            raise ValueError(f"{file} holds tensor(s) {unknown} that featcircuits does not know how to use.")
        tensors = read_tensors(file, required, optional, device=device, nonfinite_fix=DICTIONARY_NONFINITE_FIX)
        if activation == "jumprelu" and bool((tensors[THRESHOLD] < 0).any()):
            raise ValueError(f"{file} has negative JumpReLU thresholds: circuit-tracer's x*(x>t) then lets negative "
                             "activations through, which featcircuits' JumpReLU (zero below 0) does not represent.")
        cfg = DictionaryConfig(
            d_in=d_model,
            d_sae=d_sae,
            d_out=d_model,
            kind="skip_transcoder" if "W_skip" in tensors else "transcoder",
            activation=activation,
            k=k,
            hook_in=f"blocks.{layer}.{config['feature_input_hook']}",
            hook_out=f"blocks.{layer}.{config['feature_output_hook']}",
            layer=layer,
            model_name=config.get("model_name") or "",
            dtype=str(tensors["W_enc"].dtype).removeprefix("torch."),
            extra={"circuit_tracer_scan": config.get("scan")} if config.get("scan") else {},
        )
        dictionary = Dictionary.from_config(cfg, device=device)
        with torch.no_grad():
            dictionary.W_enc.copy_(tensors["W_enc"].T)
            dictionary.W_dec.copy_(tensors["W_dec"])
            dictionary.b_enc.copy_(tensors["b_enc"])
            dictionary.b_dec.copy_(tensors["b_dec"])
            if dictionary.W_skip is not None:
                dictionary.W_skip.copy_(tensors["W_skip"].T)
            if activation == "jumprelu":
                dictionary.threshold.copy_(tensors[THRESHOLD])
        dictionaries.append(dictionary)
    return dictionaries


# -- writing ----------------------------------------------------------------------------------


def _relative_hook(cfg: DictionaryConfig, hook: str, which: str) -> tuple[int, str]:
    match = _LAYER_PREFIX.match(hook)
    if not match:
        raise ValueError(f"circuit-tracer places transcoders by 'blocks.L.<hook>' names; the {which} hook of this "
                         f"{cfg.kind} is {hook!r}. Set the dictionary's hook_in/hook_out to TransformerLens names.")
    return int(match.group(1)), match.group(2)


def _check_set(dictionaries: list[Dictionary]) -> tuple[list[Dictionary], str, str]:
    """Validate that the dictionaries form a circuit-tracer transcoder set; return them ordered by layer."""
    by_layer: dict[int, Dictionary] = {}
    hooks = set()
    for dictionary in dictionaries:
        cfg = dictionary.cfg
        if cfg.kind == "sae" or cfg.d_in != cfg.d_out:
            raise ValueError(f"circuit-tracer holds transcoders from the residual stream back to it (d_in == d_out); "
                             f"got a {cfg.kind} {cfg.hook_in!r} -> {cfg.hook_out!r} with d_in={cfg.d_in}, "
                             f"d_out={cfg.d_out}. Save SAEs in the native or saelens format.")
        layer, hook_in = _relative_hook(cfg, cfg.hook_in, "input")
        layer_out, hook_out = _relative_hook(cfg, cfg.hook_out, "output")
        if layer_out != layer:
            raise ValueError(f"circuit-tracer transcoders read and write the same layer; got {cfg.hook_in!r} -> {cfg.hook_out!r}.")
        if layer in by_layer:
            raise ValueError(f"Two transcoders for layer {layer}; circuit-tracer holds one per layer.")
        by_layer[layer] = dictionary
        hooks.add((hook_in, hook_out))
    if sorted(by_layer) != list(range(len(by_layer))):
        raise ValueError(f"circuit-tracer needs a transcoder for every layer 0..n-1; got layers {sorted(by_layer)}.")
    if len(hooks) != 1:
        raise ValueError(f"circuit-tracer uses one feature_input_hook/feature_output_hook for all layers; got {sorted(hooks)}.")
    ordered = [by_layer[layer] for layer in range(len(by_layer))]
    shared = {(d.cfg.d_sae, d.cfg.activation, d.cfg.k, d.cfg.kind) for d in ordered}
    if len(shared) != 1:
        raise ValueError(f"circuit-tracer's transcoder set shares one width, activation and skip setting; got {sorted(map(str, shared))}.")
    (hook_in, hook_out), = hooks
    return ordered, hook_in, hook_out


def layer_tensors(dictionary: Dictionary) -> dict[str, torch.Tensor]:
    """One layer's file contents in circuit-tracer's orientation."""
    tensors = {"W_enc": dictionary.W_enc.T, "W_dec": dictionary.W_dec, "b_enc": dictionary.b_enc, "b_dec": dictionary.b_dec}
    if dictionary.W_skip is not None:
        tensors["W_skip"] = dictionary.W_skip.T
    activation = dictionary.cfg.activation
    if activation in ("jumprelu", "batchtopk"):
        threshold = dictionary.threshold.expand(dictionary.cfg.d_sae)
        if bool((threshold < 0).any()):
            raise ValueError(f"The transcoder at {dictionary.cfg.hook_in!r} has negative thresholds, which circuit-tracer's "
                             "JumpReLU (x * (x > t)) would let through as negative activations.")
        tensors[THRESHOLD] = threshold
    # k goes in config.yaml only: circuit-tracer's load_transcoder loads every tensor of the file into the
    # module strictly, and a tensor named "k" is not one of its parameters.
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def save(dictionaries: list[Dictionary], path: Path) -> None:
    clts = [d for d in dictionaries if isinstance(d, CrossLayerTranscoder)]
    if clts:
        if len(dictionaries) != 1:
            raise ValueError(f"circuit-tracer holds either one cross-layer transcoder or a per-layer transcoder set in a "
                             f"directory; got {len(clts)} CLT(s) among {len(dictionaries)} dictionaries. Save the CLT "
                             "to its own directory.")
        return circuit_tracer_clt.save(clts[0], path)
    ordered, hook_in, hook_out = _check_set(dictionaries)
    # circuit-tracer reads raw activations: fold any normalisation scale into copies.
    ordered = [copy.deepcopy(d).fold_norm_scale() if d.cfg.norm_scale != 1.0 else d for d in ordered]
    first = ordered[0].cfg
    activation = {"batchtopk": "jumprelu"}.get(first.activation, first.activation)
    files = {layer: f"layer_{layer}.safetensors" for layer in range(len(ordered))}
    config: dict[str, Any] = {
        "model_kind": "transcoder_set",
        "model_name": first.model_name or None,
        "feature_input_hook": hook_in,
        "feature_output_hook": hook_out,
        "scan": first.extra.get("circuit_tracer_scan") or f"{(first.model_name or 'model').split('/')[-1]}/featcircuits",
        "activation": activation,
        "transcoders": list(files.values()),
    }
    if activation == "topk":
        config["k"] = first.k
    contents = {files[layer]: layer_tensors(d) for layer, d in enumerate(ordered)}
    write_layer_files(path, owns, contents, CONFIG_FILE, yaml.safe_dump(config, sort_keys=False), "the set")
