"""Readers for the files public releases ship, turning each into a featcircuits ``Dictionary``.

* SAELens components (a ``cfg.json`` dict, pre-6.0 or 6.x, and a state dict) -> Dictionary;
* Gemma Scope ``params.npz`` (JumpReLU; read the way circuit-tracer reads its "gemma" transcoder set);
* the ``.pt`` checkpoints of jacobdunefsky/transcoder_circuits (``{"cfg": ..., "state_dict": ...}``), read
  with torch's ``weights_only`` unpickler and inert stand-ins for the training-config classes, so no code
  from the file runs.

Every reader checks tensor shapes against the config and names the file in its errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dictionaries.base import Dictionary
from ..dictionaries.config import DictionaryConfig
from ..dictionaries.io.common import DICTIONARY_NONFINITE_FIX, check_finite

__all__ = [
    "dictionary_from_saelens_components",
    "dictionary_from_saelens_folder",
    "dictionary_from_gemma_scope_npz",
    "dictionary_from_transcoder_circuits_pt",
]

# sae-lens architecture -> (featcircuits kind, activation)
_SAELENS_ARCHITECTURES = {
    "standard": ("sae", "relu"),
    "jumprelu": ("sae", "jumprelu"),
    "topk": ("sae", "topk"),
    "transcoder": ("transcoder", "relu"),
    "skip_transcoder": ("skip_transcoder", "relu"),
    "jumprelu_transcoder": ("transcoder", "jumprelu"),
    "jumprelu_skip_transcoder": ("skip_transcoder", "jumprelu"),
}


def _build(cfg: DictionaryConfig, tensors: dict[str, torch.Tensor], source: str, device: str | torch.device) -> Dictionary:
    """A Dictionary of ``cfg`` filled from ``tensors`` (our names and layouts), shapes and finiteness checked."""
    dictionary = Dictionary.from_config(cfg, device=device)
    targets = {"W_enc": dictionary.W_enc, "b_enc": dictionary.b_enc, "W_dec": dictionary.W_dec, "b_dec": dictionary.b_dec}
    if dictionary.W_skip is not None:
        targets["W_skip"] = dictionary.W_skip
    if dictionary.threshold is not None:
        targets["threshold"] = dictionary.threshold
    with torch.no_grad():
        for name, target in targets.items():
            if name not in tensors:
                raise KeyError(f"{source} lacks tensor {name!r} (it holds {sorted(tensors)}); the file is incomplete.")
            tensor = tensors[name]
            if tuple(tensor.shape) != tuple(target.shape):
                raise ValueError(
                    f"Tensor {name!r} in {source} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)} "
                    "from its config; the weights and config do not belong together."
                )
            check_finite({name: tensor}, source, DICTIONARY_NONFINITE_FIX)
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return dictionary


def dictionary_from_saelens_components(
    cfg_dict: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    source: str = "SAELens dictionary",
    device: str | torch.device = "cpu",
    **provenance: Any,
) -> Dictionary:
    """A Dictionary from a SAELens config dict and state dict (what sae-lens's loaders return)."""
    metadata = cfg_dict.get("metadata") or {}
    architecture = cfg_dict.get("architecture")
    if architecture is None:  # pre-6.0 configs: activation_fn(_str) decides
        activation_fn = cfg_dict.get("activation_fn") or cfg_dict.get("activation_fn_str") or "relu"
        architecture = "topk" if activation_fn == "topk" else "standard"
    if architecture not in _SAELENS_ARCHITECTURES:
        raise ValueError(
            f"{source} is a SAELens {architecture!r} dictionary; featcircuits reads {sorted(_SAELENS_ARCHITECTURES)}."
        )
    kind, activation = _SAELENS_ARCHITECTURES[architecture]
    normalize = cfg_dict.get("normalize_activations") or "none"
    if normalize != "none":
        raise ValueError(
            f"{source} normalizes its inputs ({normalize!r}) with a factor not stored in the file; fold the "
            "scaling factor into the weights (sae-lens: fold_activation_norm_scaling_factor) and save it again."
        )
    if cfg_dict.get("rescale_acts_by_decoder_norm"):
        raise ValueError(f"{source} rescales TopK activations by decoder norms; fold them first (sae-lens fold_W_dec_norm).")
    k = cfg_dict.get("k") or (cfg_dict.get("activation_fn_kwargs") or {}).get("k")
    hook_in = cfg_dict.get("hook_name") or metadata.get("hook_name") or cfg_dict.get("hook_point") or ""
    hook_out = cfg_dict.get("hook_name_out") or metadata.get("hook_name_out") or hook_in
    tensors = dict(state_dict)
    if "log_threshold" in tensors and "threshold" not in tensors:
        tensors["threshold"] = tensors.pop("log_threshold").exp()
    if "W_skip" in tensors:
        tensors["W_skip"] = tensors["W_skip"].T  # sae-lens stores [d_out, d_in] and applies x @ W_skip.T
    apply_b_dec = bool(cfg_dict.get("apply_b_dec_to_input", kind == "sae"))
    d_in, d_sae = int(cfg_dict["d_in"]), int(cfg_dict["d_sae"])
    if kind != "sae" and apply_b_dec:
        # featcircuits' transcoders never subtract b_dec; fold it into b_enc, exactly.
        tensors["b_enc"] = tensors["b_enc"] - tensors["b_dec"].to(tensors["W_enc"].dtype) @ tensors["W_enc"]
        apply_b_dec = False
    cfg = DictionaryConfig(
        d_in=d_in,
        d_sae=d_sae,
        d_out=int(cfg_dict.get("d_out") or d_in),
        kind=kind,
        activation=activation,
        k=int(k) if activation == "topk" and k else None,
        hook_in=hook_in,
        hook_out=hook_out,
        layer=cfg_dict.get("hook_point_layer"),
        model_name=cfg_dict.get("model_name") or metadata.get("model_name") or "",
        apply_b_dec_to_input=apply_b_dec,
        dataset=cfg_dict.get("dataset_path") or metadata.get("dataset_path") or "",
        training_tokens=int(cfg_dict.get("training_tokens") or metadata.get("training_tokens") or 0),
        extra={"source": source, "saelens_architecture": architecture, **provenance},
    )
    return _build(cfg, tensors, source, device)


def dictionary_from_saelens_folder(folder: str | Path, device: str | torch.device = "cpu", **provenance: Any) -> Dictionary:
    """Read a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) without importing sae-lens."""
    from ..dictionaries.io.common import read_json, read_tensors

    folder = Path(folder)
    cfg_dict = read_json(folder / "cfg.json")
    tensors = read_tensors(folder / "sae_weights.safetensors", expected={}, optional={
        name: None for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "log_threshold", "W_skip")
    })
    return dictionary_from_saelens_components(cfg_dict, tensors, str(folder), device, **provenance)


def dictionary_from_gemma_scope_npz(
    path: str | Path,
    hook_in: str,
    hook_out: str,
    layer: int | None = None,
    model_name: str = "",
    device: str | torch.device = "cpu",
    **provenance: Any,
) -> Dictionary:
    """A JumpReLU transcoder (or SAE when ``hook_in == hook_out``) from a Gemma Scope ``params.npz``.

    The file holds ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_out]``, ``b_enc``, ``b_dec``, ``threshold``;
    inputs are not centred by ``b_dec``.
    """
    try:
        with np.load(path) as params:
            tensors = {key: torch.from_numpy(np.asarray(params[key])) for key in params.files}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err}); it is truncated or corrupt.") from None
    if "W_enc" not in tensors:
        raise KeyError(f"{path} lacks 'W_enc' (it holds {sorted(tensors)}); it is not a Gemma Scope params.npz.")
    d_in, d_sae = tensors["W_enc"].shape
    cfg = DictionaryConfig(
        d_in=int(d_in), d_sae=int(d_sae), d_out=int(tensors["W_dec"].shape[-1]) if "W_dec" in tensors else None,
        kind="sae" if hook_in == hook_out else "transcoder", activation="jumprelu",
        hook_in=hook_in, hook_out=hook_out, layer=layer, model_name=model_name,
        extra={"source": str(path), **provenance},
    )
    return _build(cfg, tensors, str(path), device)


class _InertConfig:
    """Stand-in for the training-config classes pickled into transcoder_circuits checkpoints: it only
    collects the attributes it is given, so unpickling runs none of the original code."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.__dict__.update(state)


def dictionary_from_transcoder_circuits_pt(
    path: str | Path,
    hook_in: str = "",
    hook_out: str = "",
    layer: int | None = None,
    model_name: str = "",
    device: str | torch.device = "cpu",
    **provenance: Any,
) -> Dictionary:
    """A transcoder from a jacobdunefsky/transcoder_circuits checkpoint.

    Their forward is ``relu((x - b_dec) @ W_enc + b_enc) @ W_dec + b_dec_out`` (transcoder) or ``+ b_dec``
    (SAE); for a transcoder the input centring is folded into ``b_enc`` (exact).
    """
    path = str(path)
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        stand_ins = [(_InertConfig, name) for name in unsafe]
        with torch.serialization.safe_globals(stand_ins):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError) as err:
        raise ValueError(f"{path} could not be read as a torch checkpoint ({err}); it is truncated or corrupt.") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise KeyError(f"{path} holds no 'state_dict'; it is not a transcoder_circuits checkpoint.")
    state = {key: value for key, value in checkpoint["state_dict"].items() if isinstance(value, torch.Tensor)}
    train_cfg = checkpoint.get("cfg")
    cfg_attrs = dict(getattr(train_cfg, "__dict__", {}) or {})
    is_transcoder = "b_dec_out" in state
    hook_in = hook_in or str(cfg_attrs.get("hook_point", ""))
    hook_out = hook_out or str(cfg_attrs.get("out_hook_point", "") or hook_in)
    tensors = {key: state[key] for key in ("W_enc", "b_enc", "W_dec", "b_dec") if key in state}
    if is_transcoder:
        tensors["b_enc"] = state["b_enc"] - state["b_dec"] @ state["W_enc"]
        tensors["b_dec"] = state["b_dec_out"]
    d_in, d_sae = state["W_enc"].shape
    cfg = DictionaryConfig(
        d_in=int(d_in), d_sae=int(d_sae), d_out=int(state["W_dec"].shape[1]),
        kind="transcoder" if is_transcoder else "sae", activation="relu",
        hook_in=hook_in, hook_out=hook_out, layer=layer if layer is not None else cfg_attrs.get("hook_point_layer"),
        model_name=model_name or str(cfg_attrs.get("model_name", "")), apply_b_dec_to_input=not is_transcoder,
        dataset=str(cfg_attrs.get("dataset_path", "") or ""),
        extra={"source": path, **provenance},
    )
    return _build(cfg, tensors, path, device)

