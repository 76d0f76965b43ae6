"""Tiny random Hugging Face checkpoints of every model family load_model reads, built with ``transformers``.

Each checkpoint: 2 layers, d_model 32, 4 query heads (sharing fewer key/value heads where the family has
grouped-query attention), vocab 512, saved with ``save_pretrained`` beside stories260k's tokenizer (vocab 512).
The configs set what would make a dropped field visible in the logits: small soft caps, short sliding windows,
a head size other than d_model / n_heads, a query scale other than the head size, rotary scaling, and random
values in every weight that ``transformers`` initialises to a constant (norm weights, biases).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

STORIES260K = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260k"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
VOCAB = 512
INIT = 0.2  # large enough that logits are far from 0 and a wrong detail shows

_COMMON = dict(vocab_size=VOCAB, initializer_range=INIT, bos_token_id=1, eos_token_id=2, pad_token_id=None)
_LLAMA_LIKE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=48, max_position_embeddings=128, **_COMMON)
_GEMMA_LIKE = dict(_LLAMA_LIKE, head_dim=16, intermediate_size=64, tie_word_embeddings=True)

# family name -> (transformers model_type, config fields)
FAMILY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_COMMON)),
    "gpt_neox": ("gpt_neox", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, rotary_pct=0.5, **_COMMON)),
    # Llama 2 (multi-head, untied) and Llama 3 (grouped K/V, llama3 rotary scaling that moves 3 of 4 frequencies)
    "llama2": ("llama", dict(_LLAMA_LIKE, num_key_value_heads=4, tie_word_embeddings=False)),
    "llama3": ("llama", dict(_LLAMA_LIKE, tie_word_embeddings=True, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "mistral": ("mistral", dict(_LLAMA_LIKE, head_dim=8, sliding_window=5, tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(_LLAMA_LIKE, tie_word_embeddings=True)),
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=16, tie_word_embeddings=True)),
    "gemma": ("gemma", dict(_GEMMA_LIKE, num_key_value_heads=1, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("gemma2", dict(_GEMMA_LIKE, query_pre_attn_scalar=24, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"],
                              attn_logit_softcapping=2.5, final_logit_softcapping=2.0)),
    "gemma3": ("gemma3_text", dict(_GEMMA_LIKE, query_pre_attn_scalar=24, sliding_window=4,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters=dict(
                                       sliding_attention=dict(rope_type="default", rope_theta=10000.0),
                                       full_attention=dict(rope_type="linear", factor=4.0, rope_theta=1000000.0)))),
}
FAMILIES = list(FAMILY_CONFIGS)


def hf_config(family: str):
    """The ``transformers`` config of ``family``'s tiny checkpoint."""
    from transformers import AutoConfig

    model_type, fields = FAMILY_CONFIGS[family]
    return AutoConfig.for_model(model_type, **fields)


@torch.no_grad()
def build_checkpoint(family: str, directory: Path, seed: int = 0) -> Path:
    """Save a tiny random ``family`` checkpoint (float32) and stories260k's tokenizer in ``directory``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family), dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    for parameter in model.parameters():
        # norms start at 1 (Gemma's at 0, read as 1 + w) and biases at 0: make them random, so that a norm
        # weight or bias the conversion drops or mis-offsets changes the logits
        if parameter.dim() == 1:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * INIT)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(STORIES260K / name, directory / name)
    return directory


def reference_model(directory: Path):
    """The checkpoint read back by ``transformers`` itself (eager attention, float32, eval)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32,
                                                attn_implementation="eager").eval()
