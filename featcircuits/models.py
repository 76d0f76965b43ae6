"""Load a transformer as a TransformerLens ``HookedTransformer`` and name its hook points.

Three sources are accepted by :func:`load_model`:

* a local Hugging Face checkpoint directory (Llama, GPT-2 and GPT-NeoX families), whose
  ``config.json`` is mapped to a :class:`HookedTransformerConfig` here and whose tokenizer is read
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


def _llama_config(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
    n_kv = hf.get("num_key_value_heads") or n_heads
    rope = hf.get("rope_parameters") or {}
    return dict(
        d_model=hf["hidden_size"],
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        d_vocab=hf["vocab_size"],
        eps=hf.get("rms_norm_eps", 1e-6),
        act_fn=hf.get("hidden_act", "silu"),
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(hf.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        # HF Llama rotates (i, i + d_head/2) pairs, not adjacent ones.
        rotary_adjacent_pairs=False,
        original_architecture="LlamaForCausalLM",
    )


def _gpt2_config(hf: dict[str, Any]) -> dict[str, Any]:
    d_model = hf["n_embd"]
    return dict(
        d_model=d_model,
        d_head=d_model // hf["n_head"],
        n_heads=hf["n_head"],
        d_mlp=hf.get("n_inner") or 4 * d_model,
        n_layers=hf["n_layer"],
        n_ctx=hf["n_positions"],
        d_vocab=hf["vocab_size"],
        eps=hf.get("layer_norm_epsilon", 1e-5),
        act_fn=hf.get("activation_function", "gelu_new"),
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
    )


def _neox_config(hf: dict[str, Any]) -> dict[str, Any]:
    n_heads = hf["num_attention_heads"]
    d_head = hf["hidden_size"] // n_heads
    rope = hf.get("rope_parameters") or {}
    rotary_pct = hf.get("rotary_pct", rope.get("partial_rotary_factor", 1.0))
    return dict(
        d_model=hf["hidden_size"],
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_ctx=hf.get("max_position_embeddings", 2048),
        d_vocab=hf["vocab_size"],
        eps=hf.get("layer_norm_eps", 1e-5),
        act_fn=hf.get("hidden_act", "gelu"),
        normalization_type="LN",
        positional_embedding_type="rotary",
        rotary_dim=int(rotary_pct * d_head),
        rotary_base=float(hf.get("rotary_emb_base") or hf.get("rope_theta") or rope.get("rope_theta", 10000)),
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=hf.get("use_parallel_residual", True),
        original_architecture="GPTNeoXForCausalLM",
    )


_CONFIG_MAPPERS = {
    "llama": _llama_config,
    "gpt2": _gpt2_config,
    "gpt_neox": _neox_config,
}


def hf_config_to_hooked_config(
    hf_config: dict[str, Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HookedTransformerConfig:
    """Map a Hugging Face ``config.json`` (as a dict) to a ``HookedTransformerConfig``."""
    model_type = hf_config.get("model_type")
    if model_type not in _CONFIG_MAPPERS:
        raise ValueError(
            f"config.json has model_type={model_type!r}; featcircuits loads local checkpoints of the "
            f"{sorted(_CONFIG_MAPPERS)} families. Load other models by their TransformerLens name instead."
        )
    fields = _CONFIG_MAPPERS[model_type](hf_config)
    fields["tokenizer_prepends_bos"] = True
    return HookedTransformerConfig(**fields, device=str(device), dtype=dtype)


def _convert_weights(hf_model: torch.nn.Module, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    from transformer_lens.pretrained.weight_conversions import (
        convert_gpt2_weights,
        convert_llama_weights,
        convert_neox_weights,
    )

    converter = {
        "LlamaForCausalLM": convert_llama_weights,
        "GPT2LMHeadModel": convert_gpt2_weights,
        "GPTNeoXForCausalLM": convert_neox_weights,
    }[cfg.original_architecture]
    return converter(hf_model, cfg)


def _load_local_checkpoint(path: Path, device: str | torch.device, dtype: torch.dtype) -> HookedTransformer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = path / "config.json"
    hf_config = json.loads(config_path.read_text())
    cfg = hf_config_to_hooked_config(hf_config, device=device, dtype=dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    state_dict = _convert_weights(hf_model, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
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
    """The normalised input the MLP of block ``layer`` reads (what a transcoder encodes)."""
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
