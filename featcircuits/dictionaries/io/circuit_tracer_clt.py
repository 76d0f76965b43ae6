"""circuit-tracer's cross-layer transcoder layout: ``config.yaml`` + two safetensors files per layer.

The layout circuit-tracer's ``CrossLayerTranscoder`` reads and writes (decoderesearch/circuit-tracer, commit
4bb8c0ea10bde09727e14565ec8469656880da53 and release 0.5.0: ``circuit_tracer/transcoder/cross_layer_transcoder.py``
``load_clt`` / ``_load_state_dict`` / ``CrossLayerTranscoder.to_safetensors``; ``circuit_tracer/utils/caching.py``
``load_transcoders_from_cache``; ``circuit_tracer/utils/hf_utils.py`` ``load_transcoders``)::

    config.yaml          model_kind: cross_layer_transcoder, feature_input_hook (e.g. "ln2.hook_normalized"),
                         feature_output_hook (e.g. "hook_mlp_out"), model_name, scan
    W_enc_{i}.safetensors  W_enc_{i} [d_sae, d_model]  (pre = einsum("...d,fd->...f", x, W_enc_i) + b_enc_i)
                         b_enc_{i} [d_sae], b_dec_{i} [d_model] (the bias of MLP output i),
                         threshold_{i} [d_sae]  (JumpReLU x * (x > t); absent: ReLU)
    W_dec_{i}.safetensors  W_dec_{i} [d_sae, n_layers - i, d_model]  (layer i's latents into outputs i..n-1)

Hooks are relative to ``blocks.L.``. circuit-tracer counts the ``W_enc_*`` files to find the layer count and has
no TopK CLT and no skip path in this layout (``load_clt`` never reads one). featcircuits writes ReLU, JumpReLU
and BatchTopK (as the JumpReLU of its per-layer inference threshold) CLTs here, and refuses TopK.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, cast

import torch
import yaml
from safetensors import safe_open

from ..base import Dictionary
from ..config import LAYER_FIELD, DictionaryConfig
from ..cross_layer import CrossLayerTranscoder
from .common import DICTIONARY_NONFINITE_FIX, read_tensors, write_layer_files

MODEL_KIND = "cross_layer_transcoder"
CONFIG_FILE = "config.yaml"
ENCODER_FILE = re.compile(r"^W_enc_(\d+)\.safetensors$")
DECODER_FILE = re.compile(r"^W_dec_(\d+)\.safetensors$")
_TEMPLATE = re.compile(r"^blocks\.\{layer\}\.(.+)$")


def owns(name: str) -> bool:
    """Files a CLT save replaces: its config and every layer file (stale ones too: circuit-tracer counts them)."""
    return name == CONFIG_FILE or bool(ENCODER_FILE.match(name) or DECODER_FILE.match(name))


def is_layer_file(name: str) -> bool:
    return bool(ENCODER_FILE.match(name) or DECODER_FILE.match(name))


# -- reading ----------------------------------------------------------------------------------


def _indices(path: Path, pattern: re.Pattern[str]) -> set[int]:
    return {int(m.group(1)) for p in path.iterdir() if (m := pattern.match(p.name))}


def _layer_count(path: Path, source: Path) -> int:
    """The CLT's layer count: the outputs ``W_dec_0`` writes to (it writes to every layer), else the files'
    indices; raises naming every missing layer file."""
    encoders, decoders = _indices(path, ENCODER_FILE), _indices(path, DECODER_FILE)
    if not encoders and not decoders:
        raise ValueError(f"{source} describes a cross-layer transcoder but {path} holds no W_enc_*.safetensors or "
                         "W_dec_*.safetensors files.")
    n_layers = max(encoders | decoders) + 1
    if 0 in decoders:
        shape = read_tensors(path / "W_dec_0.safetensors", {"W_dec_0": None})["W_dec_0"].shape
        if len(shape) != 3:
            raise ValueError(f"Tensor 'W_dec_0' in {path / 'W_dec_0.safetensors'} has shape {tuple(shape)}; circuit-"
                             "tracer's layout is [d_sae, n_layers, d_model].")
        n_layers = max(n_layers, int(shape[1]))
    missing = [f"W_enc_{i}.safetensors" for i in range(n_layers) if i not in encoders] + \
              [f"W_dec_{i}.safetensors" for i in range(n_layers) if i not in decoders]
    if missing:
        raise ValueError(f"{path} holds a circuit-tracer cross-layer transcoder of {n_layers} layers but lacks "
                         f"{missing[:6]}{' ...' if len(missing) > 6 else ''}: the download or copy is incomplete. "
                         "Copy the missing layer files (or download the CLT again); a CLT loads whole.")
    return n_layers


def _activation(config: dict[str, Any], has_threshold: bool, source: Path) -> str:
    named = config.get("activation")
    if named is None:  # circuit-tracer decides by the threshold tensors alone
        return "jumprelu" if has_threshold else "relu"
    activation = {"jump_relu": "jumprelu"}.get(str(named), str(named))
    if activation not in ("relu", "jumprelu"):
        raise ValueError(f"{source} has activation {named!r}; circuit-tracer's cross-layer transcoders are relu or "
                         "jump_relu (its loader would run this one as ReLU).")
    if (activation == "jumprelu") != has_threshold:
        raise ValueError(f"{source} says activation {named!r} but the W_enc files {'lack' if activation == 'jumprelu' else 'hold'} "
                         "threshold_* tensors; the config and the weights do not belong together.")
    return activation


def load(path: Path, config: dict[str, Any], device: str | torch.device = "cpu") -> list[Dictionary]:
    """The CLT in ``path`` (``config`` is its parsed ``config.yaml``)."""
    source = path / CONFIG_FILE
    n_layers = _layer_count(path, source)
    with safe_open(str(path / "W_enc_0.safetensors"), framework="pt") as handle:
        d_sae, d_model = handle.get_slice("W_enc_0").get_shape()
        has_threshold = "threshold_0" in handle.keys()
        dtype = str(handle.get_slice("W_enc_0").get_dtype())
    activation = _activation(config, has_threshold, source)
    cfg = DictionaryConfig(
        d_in=int(d_model), d_sae=int(d_sae), d_out=int(d_model), kind=MODEL_KIND, activation=activation,
        n_layers=n_layers, hook_in=f"blocks.{LAYER_FIELD}.{config['feature_input_hook']}",
        hook_out=f"blocks.{LAYER_FIELD}.{config['feature_output_hook']}", model_name=config.get("model_name") or "",
        dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}.get(dtype, "float32"),
        extra={"circuit_tracer_scan": config.get("scan")} if config.get("scan") else {},
    )
    clt = Dictionary.from_config(cfg, device=device)
    assert isinstance(clt, CrossLayerTranscoder)
    thresholds = []
    with torch.no_grad():
        for layer in range(n_layers):
            names = {f"W_enc_{layer}": (d_sae, d_model), f"b_enc_{layer}": (d_sae,), f"b_dec_{layer}": (d_model,)}
            if activation == "jumprelu":
                names[f"threshold_{layer}"] = (d_sae,)
            file = path / f"W_enc_{layer}.safetensors"
            with safe_open(str(file), framework="pt") as handle:
                unknown = sorted(set(handle.keys()) - set(names))
            if unknown:
                raise ValueError(f"{file} holds tensor(s) {unknown} that circuit-tracer's CLT loader ignores and "
                                 "featcircuits cannot use (a skip path, another activation's parameters).")
            tensors = read_tensors(file, names, device=device, nonfinite_fix=DICTIONARY_NONFINITE_FIX)
            decoder = read_tensors(path / f"W_dec_{layer}.safetensors",
                                   {f"W_dec_{layer}": (d_sae, n_layers - layer, d_model)}, device=device,
                                   nonfinite_fix=DICTIONARY_NONFINITE_FIX)[f"W_dec_{layer}"]
            clt.W_enc[layer].copy_(tensors[f"W_enc_{layer}"].T)
            clt.b_enc[layer].copy_(tensors[f"b_enc_{layer}"])
            clt.b_dec[layer].copy_(tensors[f"b_dec_{layer}"])
            clt.decoder(layer).copy_(decoder)
            if activation == "jumprelu":
                thresholds.append(tensors[f"threshold_{layer}"])
        if thresholds:
            threshold = torch.stack(thresholds)
            if bool((threshold < 0).any()):
                raise ValueError(f"{path} has negative JumpReLU thresholds: circuit-tracer's x*(x>t) then lets negative "
                                 "activations through, which featcircuits' JumpReLU (zero below 0) does not represent.")
            clt.set_threshold(threshold)
    return [clt]


# -- writing ----------------------------------------------------------------------------------


def _relative_hook(template: str, which: str) -> str:
    match = _TEMPLATE.match(template)
    if not match:
        raise ValueError(f"circuit-tracer places a CLT by 'blocks.{LAYER_FIELD}.<hook>' names; the {which} hook is "
                         f"{template!r}. Set the CLT's hook_{'in' if which == 'input' else 'out'} to a TransformerLens "
                         "template such as 'blocks.{layer}.hook_mlp_out'.")
    return match.group(1)


def layer_files(clt: CrossLayerTranscoder) -> dict[str, dict[str, torch.Tensor]]:
    """File name -> tensors in circuit-tracer's orientation, for every layer (norm scale folded first)."""
    if clt.cfg.activation == "topk":
        raise ValueError("circuit-tracer's CrossLayerTranscoder has ReLU and JumpReLU activations only, so a TopK CLT "
                         "cannot be written in its layout. Save it in the native format, or train the CLT with "
                         "architecture batchtopk (written as the JumpReLU of its inference thresholds) or jumprelu.")
    if clt.cfg.norm_scale != 1.0:
        clt = cast(CrossLayerTranscoder, copy.deepcopy(clt).fold_norm_scale())  # circuit-tracer reads raw activations
    threshold = clt.threshold
    if threshold is not None:
        threshold = threshold[:, None].expand(-1, clt.cfg.d_sae) if threshold.dim() == 1 else threshold
        if bool((threshold < 0).any()):
            raise ValueError(f"The CLT {clt.cfg.hook_in!r} has negative thresholds, which circuit-tracer's JumpReLU "
                             "(x * (x > t)) would let through as negative activations.")
    files: dict[str, dict[str, torch.Tensor]] = {}
    for layer in range(clt.n_layers):
        encoder = {f"W_enc_{layer}": clt.W_enc[layer].T, f"b_enc_{layer}": clt.b_enc[layer],
                   f"b_dec_{layer}": clt.b_dec[layer]}
        if threshold is not None:
            encoder[f"threshold_{layer}"] = threshold[layer]
        files[f"W_enc_{layer}.safetensors"] = encoder
        files[f"W_dec_{layer}.safetensors"] = {f"W_dec_{layer}": clt.decoder(layer)}
    return {name: {key: t.detach().contiguous().cpu() for key, t in tensors.items()} for name, tensors in files.items()}


def save(clt: CrossLayerTranscoder, path: Path) -> None:
    cfg = clt.cfg
    config: dict[str, Any] = {
        "model_kind": MODEL_KIND,
        "model_name": cfg.model_name or None,
        "feature_input_hook": _relative_hook(cfg.hook_in, "input"),
        "feature_output_hook": _relative_hook(cfg.hook_out, "output"),
        "scan": cfg.extra.get("circuit_tracer_scan") or f"{(cfg.model_name or 'model').split('/')[-1]}/featcircuits-clt",
        "activation": "relu" if cfg.activation == "relu" else "jump_relu",
    }
    write_layer_files(path, owns, layer_files(clt), CONFIG_FILE, yaml.safe_dump(config, sort_keys=False), "the CLT")
