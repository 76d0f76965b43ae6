"""Each Hugging Face model family that :func:`featcircuits.load_model` reads from a local checkpoint directory.

One small function per family maps a ``config.json`` (already completed with the family's defaults by
``transformers``, see :func:`complete_hf_config`) to ``HookedTransformerConfig`` fields, setting what
TransformerLens' own ``convert_hf_model_config`` sets for that architecture: Gemma's embedding scale (applied by the
weight converter), Gemma-2's attention and output soft caps and its norms after attention and MLP, alternating
local/global attention windows, grouped key/value heads, Qwen2's attention biases (weight converter), Qwen3's and
Gemma-3's q/k norms, Gemma-3's separate rotary base for local layers, ``default_prepend_bos``. Each is registered
in :data:`FAMILIES` under its ``model_type`` with the name of TransformerLens' weight converter for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["Family", "FAMILIES", "complete_hf_config", "family_for"]

ConfigMapper = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class Family:
    """A model family: its readable name, its ``architectures`` entry, TransformerLens' weight converter for it
    (a name in ``transformer_lens.pretrained.weight_conversions``) and its config mapper."""

    name: str
    architecture: str
    converter: str
    map_config: ConfigMapper


FAMILIES: dict[str, Family] = {}

# model_types that are known, but not loadable from a local directory here, with what to do instead.
_NOT_LOADABLE = {
    "gemma3": "this is the multimodal Gemma3ForConditionalGeneration; featcircuits reads text-only Gemma-3 "
              "checkpoints (model_type 'gemma3_text', Gemma3ForCausalLM, e.g. gemma-3-270m / gemma-3-1b). Load the "
              "multimodal models by their TransformerLens name (load_model('google/gemma-3-4b-it')) instead",
}


def _family(model_type: str, name: str, architecture: str, converter: str) -> Callable[[ConfigMapper], ConfigMapper]:
    def register(map_config: ConfigMapper) -> ConfigMapper:
        FAMILIES[model_type] = Family(name, architecture, converter, map_config)
        return map_config
    return register


def complete_hf_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """``hf_config`` with every field its family's ``transformers`` config class defaults, and legacy fields
    (``rope_theta``/``rope_scaling``, ``rope_local_base_freq``, ``rotary_pct``) moved to where current
    ``transformers`` keeps them (``rope_parameters``), so a mapper reads the values the HF model computes with."""
    from transformers import AutoConfig

    fields = {key: value for key, value in hf_config.items() if key != "model_type"}
    return AutoConfig.for_model(hf_config["model_type"], **fields).to_dict()


def family_for(model_type: str | None) -> Family:
    """The registered family of a ``config.json`` ``model_type``, or a ``ValueError`` naming it and what to do."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type in _NOT_LOADABLE:
        raise ValueError(f"config.json has model_type={model_type!r}: {_NOT_LOADABLE[model_type]}.")
    known = ", ".join(f"{family.name} ({key})" for key, family in FAMILIES.items())
    raise ValueError(
        f"config.json has model_type={model_type!r}; featcircuits loads local checkpoints of these families: "
        f"{known}. Load other models by their TransformerLens name instead (load_model('<hub name>'))."
    )


def check_supported(family: Family, fields: dict[str, Any]) -> None:
    """Raise a ``NotImplementedError`` naming the family when the installed transformer_lens lacks its weight
    converter or a config field the family needs."""
    import transformer_lens
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained import weight_conversions

    known = {field.name for field in dataclasses.fields(HookedTransformerConfig)}
    missing = sorted(set(fields) - known)
    if not hasattr(weight_conversions, family.converter):
        missing.insert(0, f"weight_conversions.{family.converter}")
    if missing:
        version = getattr(transformer_lens, "__version__", "unknown")
        raise NotImplementedError(
            f"The installed transformer-lens ({version}) does not support the {family.name} family "
            f"({family.architecture}): it lacks {missing}. Upgrade it (pip install -U transformer-lens) "
            "or load a checkpoint of another family."
        )


# ---- shared pieces ------------------------------------------------------------------------------


def _refuse(hf: dict[str, Any], family: str, *flags: str) -> None:
    """TransformerLens' converters for these families drop these weights; refuse rather than load a wrong model."""
    for flag in flags:
        if hf.get(flag):
            raise ValueError(f"This {family} checkpoint sets {flag}=True, which TransformerLens' {family} weight "
                             "converter does not read; featcircuits cannot load it faithfully.")


def _rope(params: dict[str, Any] | None, family: str) -> dict[str, Any]:
    """Rotary fields for one ``rope_parameters`` entry (default, linear or llama3 scaling)."""
    params = params or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    fields: dict[str, Any] = {"rotary_base": float(params.get("rope_theta", 10000.0))}
    if rope_type == "linear":
        fields["rotary_scaling_factor"] = float(params["factor"])
    elif rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_by_parts_factor=float(params["factor"]),
            NTK_by_parts_low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            NTK_by_parts_high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            NTK_original_ctx_len=int(params["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(f"This {family} checkpoint uses rope_type={rope_type!r}; featcircuits maps default, linear "
                         "and llama3 rotary embeddings only.")
    return fields


def _windows(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """Local/global attention per layer from ``layer_types`` (sliding windows), as TransformerLens' attn_types."""
    layer_types = hf.get("layer_types") or []
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"This {family} checkpoint has layer types {sorted(unknown)}; featcircuits maps sliding "
                         "and full attention layers only.")
    if "sliding_attention" not in layer_types:
        return {}
    return dict(use_local_attn=True, window_size=int(hf["sliding_window"]),
                attn_types=["local" if kind == "sliding_attention" else "global" for kind in layer_types])


def _rms_gated(hf: dict[str, Any], *, n_ctx_cap: int | None = None, gqa_always: bool = False) -> dict[str, Any]:
    """Fields shared by the Llama-like families: RMSNorm, gated MLP, rotary on (i, i + d_head/2) pairs."""
    n_heads = hf["num_attention_heads"]
    d_head = hf.get("head_dim") or hf["hidden_size"] // n_heads
    n_kv = hf.get("num_key_value_heads") or n_heads
    n_ctx = hf.get("max_position_embeddings") or 2048
    return dict(
        d_model=hf["hidden_size"],
        d_head=d_head,
        n_heads=n_heads,
        n_key_value_heads=n_kv if gqa_always or n_kv != n_heads else None,
        d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"],
        n_ctx=min(n_ctx, n_ctx_cap) if n_ctx_cap else n_ctx,
        d_vocab=hf["vocab_size"],
        eps=hf.get("rms_norm_eps", 1e-6),
        act_fn=hf.get("hidden_act", "silu"),
        normalization_type="RMS",
        final_rms=True,
        gated_mlp=True,
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        # HF rotates (i, i + d_head/2) pairs, not adjacent ones.
        rotary_adjacent_pairs=False,
    )


# ---- the families -------------------------------------------------------------------------------


@_family("llama", "Llama", "LlamaForCausalLM", "convert_llama_weights")
def llama_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse(hf, "Llama", "attention_bias", "mlp_bias")
    return dict(**_rms_gated(hf), **_rope(hf.get("rope_parameters"), "Llama"))


@_family("mistral", "Mistral", "MistralForCausalLM", "convert_mistral_weights")
def mistral_config(hf: dict[str, Any]) -> dict[str, Any]:
    # TransformerLens caps Mistral's context at 2048 positions (rotary tables are n_ctx long, per layer).
    fields = dict(**_rms_gated(hf, n_ctx_cap=2048, gqa_always=True), **_rope(hf.get("rope_parameters"), "Mistral"))
    window = hf.get("sliding_window")
    if window:
        fields.update(use_local_attn=True, window_size=int(window), attn_types=["local"] * hf["num_hidden_layers"])
    return fields


@_family("qwen2", "Qwen2", "Qwen2ForCausalLM", "convert_qwen2_weights")
def qwen2_config(hf: dict[str, Any]) -> dict[str, Any]:
    # Qwen2's q/k/v biases are read by the weight converter; it always writes grouped (underscored) K/V weights.
    return dict(**_rms_gated(hf, gqa_always=True), **_rope(hf.get("rope_parameters"), "Qwen2"),
                **_windows(hf, "Qwen2"), default_prepend_bos=False)


@_family("qwen3", "Qwen3", "Qwen3ForCausalLM", "convert_qwen3_weights")
def qwen3_config(hf: dict[str, Any]) -> dict[str, Any]:
    _refuse(hf, "Qwen3", "attention_bias")
    return dict(**_rms_gated(hf, n_ctx_cap=2048), **_rope(hf.get("rope_parameters"), "Qwen3"),
                **_windows(hf, "Qwen3"), use_qk_norm=True, default_prepend_bos=False)


def _gemma_common(hf: dict[str, Any], family: str, act_fn: str) -> dict[str, Any]:
    """Gemma 1/2/3: RMSNorm (1 + w, added by the converter), embeddings scaled by sqrt(d_model) (converter),
    GeGLU MLP, grouped K/V weights always, context capped at 8192 as TransformerLens does."""
    _refuse(hf, family, "attention_bias")
    if hf.get("use_bidirectional_attention"):
        raise ValueError(f"This {family} checkpoint uses bidirectional attention; featcircuits loads causal "
                         "language models only.")
    fields = _rms_gated(hf, n_ctx_cap=8192, gqa_always=True)
    fields["act_fn"] = act_fn
    return fields


def _soft_caps(hf: dict[str, Any]) -> dict[str, Any]:
    fields = {}
    if hf.get("attn_logit_softcapping"):
        fields["attn_scores_soft_cap"] = float(hf["attn_logit_softcapping"])
    if hf.get("final_logit_softcapping"):
        fields["output_logits_soft_cap"] = float(hf["final_logit_softcapping"])
    return fields


@_family("gemma", "Gemma", "GemmaForCausalLM", "convert_gemma_weights")
def gemma_config(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(**_gemma_common(hf, "Gemma", hf.get("hidden_act") or "gelu_pytorch_tanh"),
                **_rope(hf.get("rope_parameters"), "Gemma"))


@_family("gemma2", "Gemma-2", "Gemma2ForCausalLM", "convert_gemma_weights")
def gemma2_config(hf: dict[str, Any]) -> dict[str, Any]:
    return dict(
        **_gemma_common(hf, "Gemma-2", hf.get("hidden_activation") or "gelu_pytorch_tanh"),
        **_rope(hf.get("rope_parameters"), "Gemma-2"),
        **_windows(hf, "Gemma-2"),
        **_soft_caps(hf),
        # Scores are scaled by query_pre_attn_scalar ** -0.5, not d_head ** -0.5 (they differ in gemma-2-27b).
        attn_scale=float(hf["query_pre_attn_scalar"]) ** 0.5,
        use_normalization_before_and_after=True,
    )


@_family("gemma3_text", "Gemma-3", "Gemma3ForCausalLM", "convert_gemma_weights")
def gemma3_config(hf: dict[str, Any]) -> dict[str, Any]:
    rope = hf.get("rope_parameters") or {}
    if "full_attention" not in rope:  # one entry for every layer
        rope = {"full_attention": rope, "sliding_attention": rope}
    global_rope = _rope(rope["full_attention"], "Gemma-3")
    local_rope = _rope(rope.get("sliding_attention") or rope["full_attention"], "Gemma-3")
    if set(local_rope) != {"rotary_base"}:
        raise ValueError("This Gemma-3 checkpoint scales the rotary embedding of its sliding-window layers; "
                         "TransformerLens scales global layers only.")
    return dict(
        **_gemma_common(hf, "Gemma-3", hf.get("hidden_activation") or "gelu_pytorch_tanh"),
        **global_rope,
        rotary_base_local=local_rope["rotary_base"],
        **_windows(hf, "Gemma-3"),
        **_soft_caps(hf),
        attn_scale=float(hf["query_pre_attn_scalar"]) ** 0.5,
        use_normalization_before_and_after=True,
        use_qk_norm=True,
    )


@_family("gpt2", "GPT-2", "GPT2LMHeadModel", "convert_gpt2_weights")
def gpt2_config(hf: dict[str, Any]) -> dict[str, Any]:
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
        use_attn_scale=hf.get("scale_attn_weights", True),
        scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
        normalization_type="LN",
        positional_embedding_type="standard",
    )


@_family("gpt_neox", "GPT-NeoX/Pythia", "GPTNeoXForCausalLM", "convert_neox_weights")
def neox_config(hf: dict[str, Any]) -> dict[str, Any]:
    # TransformerLens sets default_prepend_bos=False for NeoX; featcircuits has always prepended BOS to text for
    # local NeoX checkpoints, and keeps doing so.
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
        rotary_dim=round(rotary_pct * d_head),
        rotary_base=float(hf.get("rotary_emb_base") or hf.get("rope_theta") or rope.get("rope_theta", 10000)),
        rotary_adjacent_pairs=False,
        parallel_attn_mlp=hf.get("use_parallel_residual", True),
    )
