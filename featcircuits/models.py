"""Load a transformer as a TransformerLens ``HookedTransformer`` and name its hook points.

Three sources are accepted by :func:`load_model`:

* a local Hugging Face checkpoint directory of a family in :mod:`featcircuits.model_families`
  (GPT-2, GPT-NeoX/Pythia, Llama 2/3, Mistral, Qwen2, Qwen3, Gemma, Gemma-2, text-only Gemma-3), whose
  ``config.json`` is mapped to a :class:`HookedTransformerConfig` the way TransformerLens maps that
  architecture, whose weights go through TransformerLens' converter for it, and whose tokenizer is read
  from the same directory;
* a ``HookedTransformerConfig`` (or a dict of its fields) for tiny test models;
* any model name TransformerLens knows (needs a network or a filled Hugging Face cache).

Weights are loaded without TransformerLens' weight processing (no LayerNorm folding, no centring),
so every hook point carries the model's own activations: dictionaries trained on them transfer to
any other loader of the same checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from featcircuits.model_families import FAMILIES, check_supported, complete_hf_config, family_for

__all__ = [
    "load_model",
    "hf_config_to_hooked_config",
    "resid_pre",
    "resid_mid",
    "resid_post",
    "mlp_in",
    "mlp_out",
    "attn_out",
    "check_hook_name",
]


def hf_config_to_hooked_config(
    hf_config: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """Map a Hugging Face ``config.json`` (as a dict) to a ``HookedTransformerConfig``.

    The dict is first completed with its family's ``transformers`` defaults (so a field a checkpoint leaves out
    reads as what the HF model computes with), then mapped by the family's function in
    :mod:`featcircuits.model_families`. Raises a ``ValueError`` for a family featcircuits does not map and a
    ``NotImplementedError`` when the installed transformer_lens cannot represent the family.
    """
    family = family_for(hf_config.get("model_type"))
    fields = family.map_config(complete_hf_config(hf_config))
    fields["original_architecture"] = family.architecture
    fields["tokenizer_prepends_bos"] = True
    check_supported(family, fields)
    return HookedTransformerConfig(**fields, device=str(device), dtype=dtype)


def _convert_weights(hf_model: torch.nn.Module, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """TransformerLens' own converter for the family, unchanged (Gemma's embedding scale and 1 + w norms,
    Qwen2's attention biases and the q/k norms all come from it)."""
    from transformer_lens.pretrained import weight_conversions

    family = next(f for f in FAMILIES.values() if f.architecture == cfg.original_architecture)
    return getattr(weight_conversions, family.converter)(hf_model, cfg)


def _quietly_from_pretrained(auto_class, path: Path, dtype: torch.dtype):
    """``auto_class.from_pretrained`` without transformers' per-load progress bar (a local read of a few
    files; featcircuits' own bars say what is slow)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(str(path), dtype=dtype)
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _load_local_checkpoint(path: Path, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = path / "config.json"
    hf_config = json.loads(config_path.read_text())
    cfg = hf_config_to_hooked_config(hf_config, device=device, dtype=dtype)
    hf_model = _quietly_from_pretrained(AutoModelForCausalLM, path, dtype)
    state_dict = _convert_weights(hf_model, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    cfg.init_weights = False  # every parameter is overwritten from the checkpoint
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    del hf_model
    model.cfg.model_name = path.name
    return model.to(device).eval()


def load_model(
    name_or_path: str | Path | HookedTransformerConfig | dict[str, Any],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int | None = None,
) -> HookedTransformer:
    """Return a ``HookedTransformer`` in eval mode.

    Args:
        name_or_path: a local Hugging Face checkpoint directory, a ``HookedTransformerConfig`` (or a dict
            of its fields) for a randomly initialised test model, or a TransformerLens model name.
        device: where the weights live.
        dtype: parameter dtype.
        seed: initialisation seed for config-built models.
    """
    if isinstance(name_or_path, dict):
        name_or_path = HookedTransformerConfig(**{"device": str(device), "dtype": dtype, **name_or_path})
    if isinstance(name_or_path, HookedTransformerConfig):
        if seed is not None:
            torch.manual_seed(seed)
        return HookedTransformer(name_or_path).to(device).eval()
    path = Path(name_or_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} is a directory without config.json; point load_model at a Hugging Face checkpoint "
                "directory (config.json, model.safetensors, tokenizer.json)."
            )
        return _load_local_checkpoint(path, device, dtype)
    if path.suffix or "/" in str(name_or_path) and str(name_or_path).startswith((".", "/")):
        raise FileNotFoundError(f"No model directory at {path}; give an existing checkpoint directory.")
    return HookedTransformer.from_pretrained_no_processing(str(name_or_path), device=str(device), dtype=dtype).eval()


# ---- hook names ---------------------------------------------------------------------------------


def resid_pre(layer: int) -> str:
    """Residual stream entering block ``layer``: ``[batch, pos, d_model]``."""
    return f"blocks.{layer}.hook_resid_pre"


def resid_mid(layer: int) -> str:
    """Residual stream between attention and MLP of block ``layer``."""
    return f"blocks.{layer}.hook_resid_mid"


def resid_post(layer: int) -> str:
    """Residual stream leaving block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def mlp_in(layer: int) -> str:
    """The normalised residual stream the MLP of block ``layer`` reads (what a transcoder encodes).

    transformer_lens hooks the normalised vector before the norm's own elementwise weight (and LayerNorm's
    bias): the MLP reads ``hook_normalized * ln2.w (+ ln2.b)``. Checkpoints loaded here keep those weights
    unfolded, so a transcoder on this hook learns them as part of its encoder."""
    return f"blocks.{layer}.ln2.hook_normalized"


def mlp_out(layer: int) -> str:
    """The MLP output of block ``layer`` as added to the residual stream (what a transcoder predicts)."""
    return f"blocks.{layer}.hook_mlp_out"


def attn_out(layer: int) -> str:
    """The attention output of block ``layer`` as added to the residual stream."""
    return f"blocks.{layer}.hook_attn_out"


def check_hook_name(model: HookedTransformer, hook_name: str) -> None:
    """Raise a ``KeyError`` naming ``hook_name`` and listing close valid names when the model lacks it."""
    if hook_name in model.hook_dict:
        return
    import difflib

    valid = list(model.hook_dict)
    close = difflib.get_close_matches(hook_name, valid, n=5, cutoff=0.5)
    hint = f" Closest: {close}." if close else ""
    raise KeyError(
        f"Hook {hook_name!r} is not a hook point of this model ({model.cfg.model_name}).{hint} "
        f"Valid hook names include: {valid[:12]} ... ({len(valid)} in all; see model.hook_dict)."
    )
