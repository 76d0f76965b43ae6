"""SAELens' on-disk layout: ``cfg.json`` + ``sae_weights.safetensors`` (sae-lens >= 6).

What ``sae_lens.SAE.load_from_disk`` reads, per architecture (``cfg.json["architecture"]``):

    standard | topk | jumprelu                           SAE; W_enc [d_in, d_sae], b_enc, W_dec [d_sae, d_in], b_dec
    transcoder | jumprelu_transcoder                     same with W_dec [d_sae, d_out], b_dec [d_out]
    skip_transcoder | jumprelu_skip_transcoder           plus W_skip [d_out, d_in] (used as ``x @ W_skip.T``)
    jumprelu*                                            plus threshold [d_sae] (older files: log_threshold)

Hook and model names live in ``cfg.json["metadata"]`` (``hook_name``, ``hook_name_out``, ``model_name``).
A BatchTopK dictionary is written as sae-lens writes its own BatchTopK SAEs for inference: a JumpReLU
whose threshold is the global threshold repeated, with ``metadata.training_architecture = "batchtopk"``;
such files read back as BatchTopK. Options we cannot represent exactly (run-time layer norm, hook_z
reshaping, head indices, gated/abstopk/... architectures) raise an error naming the option instead of
loading something that computes differently.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..base import Dictionary
from ..config import DictionaryConfig
from .common import DICTIONARY_NONFINITE_FIX, atomic_directory, check_finite, read_json, read_tensors

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SCALER_FILE = "activation_scaler.json"

# sae-lens architecture -> (our kind, our activation)
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "standard": ("sae", "relu"),
    "topk": ("sae", "topk"),
    "jumprelu": ("sae", "jumprelu"),
    "transcoder": ("transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}
# (our kind, our activation) -> sae-lens architecture; BatchTopK is saved as its JumpReLU inference form.
_WRITE_ARCHITECTURE = {kind_activation: arch for arch, kind_activation in ARCHITECTURES.items()}
_WRITE_ARCHITECTURE |= {(kind, "batchtopk"): arch for (kind, act), arch in _WRITE_ARCHITECTURE.items() if act == "jumprelu"}

# metadata keys we map onto DictionaryConfig fields; every other metadata key is kept verbatim.
_MAPPED_METADATA = {"model_name", "hook_name", "hook_name_out", "dataset_path", "featcircuits"}
_LAYER = re.compile(r"blocks\.(\d+)\.")


def owns(name: str) -> bool:
    """Whether a file name in a sae-lens directory is one a save replaces (a stale scaler file too)."""
    return name in (CONFIG_FILE, WEIGHTS_FILE, SCALER_FILE)


def detect(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def layer_of(hook_name: str) -> int | None:
    match = _LAYER.search(hook_name or "")
    return int(match.group(1)) if match else None


# -- reading ----------------------------------------------------------------------------------


def _norm_scale(path: Path, data: dict[str, Any]) -> float:
    """The activation scale implied by ``normalize_activations`` (1 when none)."""
    mode = data.get("normalize_activations", "none") or "none"
    if mode == "none":
        return 1.0
    source = path / CONFIG_FILE
    if mode == "expected_average_only_in":
        scaler = path / SCALER_FILE
        if not scaler.is_file():
            raise ValueError(
                f"{source} has normalize_activations='expected_average_only_in' but no {SCALER_FILE} beside it "
                "holds the scaling factor, so the activation scale is unknown. Fold it into the weights with "
                "sae_lens' sae.fold_activation_norm_scaling_factor(factor) and save again."
            )
        scaler_data = read_json(scaler)
        if scaler_data.get("has_whitening"):
            raise ValueError(f"{scaler} asks for activation whitening, which featcircuits cannot represent; "
                             "fold it with sae.fold_activation_whitening(...) and save again.")
        factor = scaler_data.get("scaling_factor")
        return 1.0 if factor is None else float(factor)
    raise ValueError(
        f"{source} has normalize_activations={mode!r}, a run-time normalisation featcircuits cannot represent "
        "(supported: 'none', 'expected_average_only_in' with activation_scaler.json). Fold it into the weights "
        "with sae-lens first, or use the SAE through sae-lens."
    )


def config_from_saelens(path: Path, data: dict[str, Any]) -> DictionaryConfig:
    """Map a sae-lens ``cfg.json`` (version 6 layout) onto a DictionaryConfig."""
    source = path / CONFIG_FILE
    missing = [key for key in ("d_in", "d_sae") if key not in data]
    if missing:
        raise ValueError(f"{source} lacks required field(s) {missing}; it is not a complete sae-lens config.")
    version = str((data.get("metadata") or {}).get("sae_lens_version") or data.get("sae_lens_version") or "")
    major = re.match(r"\d+", version)
    if not major or int(major.group()) < 6:
        raise ValueError(f"{source} was written by sae-lens {version or '< 6'}; load it with sae-lens >= 6 and "
                         "save it again (sae.save_model) to get the current layout.")
    # sae-lens >= 6 writes these; without them the file could be read as another architecture or hook.
    if "architecture" not in data:
        raise ValueError(f"{source} lacks 'architecture', which sae-lens >= 6 always writes; the config is "
                         "incomplete. Save the SAE again with sae-lens (sae.save_model).")
    architecture = data["architecture"]
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{source} has unknown or unsupported architecture {architecture!r}; featcircuits reads "
            f"{sorted(ARCHITECTURES)}. Convert the dictionary to one of those with sae-lens first."
        )
    if data.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{source} sets reshape_activations={data['reshape_activations']!r} (hook_z head reshaping), "
                         "which featcircuits dictionaries do not do; they read flat [..., d_in] activations.")
    meta = dict(data.get("metadata") or {})
    for key in ("hook_head_index", "hook_head_index_out"):
        if meta.get(key) is not None:
            raise ValueError(f"{source} sets metadata.{key}={meta[key]}: single-head dictionaries are not supported.")
    kind, activation = ARCHITECTURES[architecture]
    absent = [name for name, present in (("metadata.hook_name", meta.get("hook_name")),
                                         ("k", activation != "topk" or data.get("k") is not None),
                                         ("d_out", kind == "sae" or data.get("d_out") is not None)) if not present]
    if absent:
        raise ValueError(f"{source} lacks {absent} for its {architecture!r} architecture; sae-lens writes them "
                         "and featcircuits will not guess a hook or width. Save the SAE again with sae-lens.")
    own = dict(meta.get("featcircuits") or {})
    k = data["k"] if activation == "topk" else None
    details = meta.get("training_architecture_details") or {}
    batch_k = details.get("k") if meta.get("training_architecture") == "batchtopk" else None
    if activation == "jumprelu" and batch_k is not None and float(batch_k).is_integer():
        activation, k = "batchtopk", int(batch_k)  # confirmed against the threshold once weights are read
    hook_in = meta.get("hook_name") or ""
    # sae-lens' SAEConfig defaults apply_b_dec_to_input to True; its transcoders forbid it.
    apply_b_dec = bool(data.get("apply_b_dec_to_input", kind == "sae"))
    if apply_b_dec and kind != "sae":
        raise ValueError(f"{source} sets apply_b_dec_to_input for a {architecture}, which sae-lens itself rejects.")
    d_in, d_sae = int(data["d_in"]), int(data["d_sae"])
    extra = dict(own.get("extra") or {})
    extra["saelens_metadata"] = {key: value for key, value in meta.items() if key not in _MAPPED_METADATA}
    if data.get("rescale_acts_by_decoder_norm"):
        extra["saelens_folded_decoder_norm"] = True
    return DictionaryConfig(
        d_in=d_in,
        d_sae=d_sae,
        d_out=int(data["d_out"]) if kind != "sae" else d_in,
        kind=kind,
        activation=activation,
        k=int(k) if k is not None else None,
        hook_in=hook_in,
        hook_out=meta.get("hook_name_out") or hook_in,
        layer=layer_of(hook_in),
        model_name=meta.get("model_name") or "",
        model_revision=own.get("model_revision"),
        apply_b_dec_to_input=apply_b_dec,
        norm_scale=_norm_scale(path, data),
        dataset=meta.get("dataset_path") or "",
        training_tokens=int(own.get("training_tokens") or 0),
        dtype=str(data.get("dtype", "float32")).removeprefix("torch."),
        extra=extra,
    )


def load(path: Path, device: str | torch.device = "cpu") -> list[Dictionary]:
    data = read_json(path / CONFIG_FILE)
    cfg = config_from_saelens(path, data)
    weights = path / WEIGHTS_FILE
    required = {
        "W_enc": (cfg.d_in, cfg.d_sae),
        "b_enc": (cfg.d_sae,),
        "W_dec": (cfg.d_sae, cfg.d_out),
        "b_dec": (cfg.d_out,),
    }
    optional: dict[str, tuple[int, ...]] = {"scaling_factor": (cfg.d_sae,)}
    if cfg.kind == "skip_transcoder":
        required["W_skip"] = (cfg.d_out, cfg.d_in)
    if cfg.activation in ("jumprelu", "batchtopk"):
        optional |= {"threshold": (cfg.d_sae,), "log_threshold": (cfg.d_sae,)}
    tensors = read_tensors(weights, required, optional, device=device, nonfinite_fix=DICTIONARY_NONFINITE_FIX)
    _reject_unknown_tensors(weights, set(required) | set(optional))
    if "scaling_factor" in tensors:
        # A legacy fine-tuning scale; sae-lens itself drops it when it is all ones.
        if not torch.all(tensors.pop("scaling_factor") == 1):
            raise ValueError(f"{weights} holds a finetuning 'scaling_factor' that is not all ones; featcircuits "
                             "cannot represent it. Fold it into W_dec with sae-lens and save again.")
    if cfg.activation in ("jumprelu", "batchtopk"):
        if "threshold" not in tensors:
            if "log_threshold" not in tensors:
                raise KeyError(f"{weights} lacks tensor 'threshold' (or 'log_threshold') that a "
                               f"{data.get('architecture')} dictionary needs.")
            tensors["threshold"] = tensors.pop("log_threshold").exp()
        tensors.pop("log_threshold", None)
        threshold = tensors["threshold"]
        if cfg.activation == "batchtopk":
            if bool(torch.all(threshold == threshold[0])):
                tensors["threshold"] = threshold[0]
            else:  # per-feature thresholds after all: it is a JumpReLU
                cfg.activation, cfg.k = "jumprelu", None
    if cfg.kind == "skip_transcoder":
        tensors["W_skip"] = tensors["W_skip"].T
    if data.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norm(tensors)
    dictionary = Dictionary.from_config(cfg, device=device)
    with torch.no_grad():
        for name, tensor in tensors.items():
            target = dictionary.threshold if name == "threshold" else getattr(dictionary, name)
            target.copy_(tensor.to(target.dtype))
    return [dictionary]


def _reject_unknown_tensors(weights: Path, known: set[str]) -> None:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        unknown = sorted(set(handle.keys()) - known)
    if unknown:
        raise ValueError(f"{weights} holds tensor(s) {unknown} that featcircuits does not know how to use; "
                         "loading without them would compute something different.")


def _fold_decoder_norm(tensors: dict[str, torch.Tensor]) -> None:
    """TopK with ``rescale_acts_by_decoder_norm``: the same function with unit-norm decoder rows.

    sae-lens multiplies pre-activations by ``|W_dec|`` before the top-k and divides by it before decoding;
    scaling W_enc and b_enc up and W_dec down by the norms gives the same activations (up to rounding).
    """
    norms = tensors["W_dec"].norm(dim=-1)
    tensors["W_enc"] = tensors["W_enc"] * norms
    tensors["b_enc"] = tensors["b_enc"] * norms
    tensors["W_dec"] = tensors["W_dec"] / norms[:, None]


# -- writing ----------------------------------------------------------------------------------


def _saelens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "6.0.0"


def config_to_saelens(cfg: DictionaryConfig) -> dict[str, Any]:
    """The ``cfg.json`` sae-lens writes for the equivalent inference SAE (norm scale already folded)."""
    key = (cfg.kind, cfg.activation)
    if key not in _WRITE_ARCHITECTURE:
        raise ValueError(
            f"sae-lens has no architecture for a {cfg.kind} with {cfg.activation} activation "
            f"(it has {sorted(ARCHITECTURES)}); save it in the native or circuit-tracer format instead."
        )
    architecture = _WRITE_ARCHITECTURE[key]
    extra = dict(cfg.extra)
    meta: dict[str, Any] = dict(extra.pop("saelens_metadata", None) or {})
    extra.pop("saelens_folded_decoder_norm", None)
    version = _saelens_version()
    meta.update(sae_lens_version=version, sae_lens_training_version=meta.get("sae_lens_training_version") or version)
    meta.update(model_name=cfg.model_name or None, hook_name=cfg.hook_in or None)
    if cfg.kind != "sae":
        meta["hook_name_out"] = cfg.hook_out or None
    if cfg.dataset:
        meta["dataset_path"] = cfg.dataset
    if cfg.activation == "batchtopk":
        meta["training_architecture"] = "batchtopk"
        meta["training_architecture_details"] = {**(meta.get("training_architecture_details") or {}), "k": cfg.k}
    else:
        meta.pop("training_architecture", None)
        meta.pop("training_architecture_details", None)
    meta["featcircuits"] = {"model_revision": cfg.model_revision, "training_tokens": cfg.training_tokens,
                            "extra": extra}
    data: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": meta,
        "architecture": architecture,
    }
    if cfg.kind != "sae":
        data["d_out"] = cfg.d_out
    if cfg.activation == "topk":
        data.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    return data


def tensors_to_saelens(dictionary: Dictionary) -> dict[str, torch.Tensor]:
    tensors = {"W_enc": dictionary.W_enc, "b_enc": dictionary.b_enc, "W_dec": dictionary.W_dec, "b_dec": dictionary.b_dec}
    if dictionary.W_skip is not None:
        tensors["W_skip"] = dictionary.W_skip.T
    if dictionary.cfg.activation == "jumprelu":
        tensors["threshold"] = dictionary.threshold
    elif dictionary.cfg.activation == "batchtopk":
        tensors["threshold"] = dictionary.threshold.expand(dictionary.cfg.d_sae)
    return {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}


def save(dictionaries: list[Dictionary], path: Path) -> None:
    if len(dictionaries) != 1:
        raise ValueError(f"A sae-lens directory holds one SAE; got {len(dictionaries)}. Save each to its own "
                         "sub-directory of the destination.")
    (dictionary,) = dictionaries
    if dictionary.cfg.norm_scale != 1.0:
        # sae-lens inference SAEs read raw activations: fold the scale into a copy, never the caller's.
        dictionary = copy.deepcopy(dictionary).fold_norm_scale()
    data = config_to_saelens(dictionary.cfg)
    tensors = tensors_to_saelens(dictionary)
    check_finite(tensors, f"the {dictionary.cfg.kind} for {dictionary.cfg.hook_in!r}",
                 f"refusing to write {path / WEIGHTS_FILE} (anything there is unchanged); retrain with a lower "
                 "learning rate.")
    # Both files go into a fresh directory that replaces ``path`` whole, so a failure or crash never pairs
    # the new weights with the old config.
    with atomic_directory(path, owns) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(data, indent=2, default=str, allow_nan=False))
