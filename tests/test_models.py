"""load_model against independent references: llama2.c's greedy generation and transformers' forward."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from featcircuits import load_model
from featcircuits.models import attn_out, check_hook_name, mlp_in, mlp_out, resid_post, resid_pre


def test_stories260k_reproduces_reference_generation(stories_model, stories_path):
    reference = json.loads((stories_path / "reference_generation.json").read_text())
    prompt_ids = stories_model.to_tokens(reference["prompt"])[0].tolist()
    assert prompt_ids == reference["prompt_token_ids"]
    new_ids = reference["greedy_new_token_ids"]
    # Greedy decoding reproduces the reference token for token exactly when, fed the reference sequence,
    # the argmax at every position is the next reference token: one forward checks all 100 steps.
    sequence = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        predicted = stories_model(sequence[:, :-1])[0, len(prompt_ids) - 1:].argmax(-1)
    assert predicted.tolist() == new_ids


def test_stories260k_logits_match_transformers(stories_model, stories_path):
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(str(stories_path)).eval()
    ids = torch.randint(3, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 1
    with torch.no_grad():
        diff = (hf_model(ids).logits - stories_model(ids)).abs().max().item()
    assert diff < 1e-4


def _tiny_hf_checkpoint(tmp_path, stories_path, config):
    """A randomly initialised transformers model saved in HF layout, with the stories tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(stories_path / name, tmp_path / name)
    return model


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama_untied_mha"])
def test_local_checkpoint_families_match_transformers(tmp_path, stories_path, family):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    config = {
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=512),
        "gpt_neox": GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64, vocab_size=512, rotary_pct=0.5),
        "llama_untied_mha": LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=4, intermediate_size=48, max_position_embeddings=64,
                                        vocab_size=512, tie_word_embeddings=False),
    }[family]
    hf_model = _tiny_hf_checkpoint(tmp_path, stories_path, config)
    model = load_model(tmp_path)
    ids = torch.randint(3, 512, (2, 20))
    with torch.no_grad():
        assert (hf_model(ids).logits - model(ids)).abs().max().item() < 1e-4
    assert model.to_tokens("Once upon a time")[0].tolist() == [1, 403, 407, 261, 378]


def test_config_model_and_hook_helpers(tiny_llama):
    _, cache = tiny_llama.run_with_cache(torch.tensor([[1, 5, 7, 9]]))
    for hook in (resid_pre(1), mlp_in(0), mlp_out(1), attn_out(0), resid_post(1)):
        assert cache[hook].shape == (1, 4, 32)
    # The MLP reads exactly mlp_in and writes exactly mlp_out.
    block = tiny_llama.blocks[0]
    assert torch.allclose(block.mlp(cache[mlp_in(0)]), cache[mlp_out(0)], atol=1e-6)


def test_unknown_hook_lists_valid_names(tiny_gpt2):
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_mlp_ou.*Closest.*blocks\.0\.hook_mlp_out"):
        check_hook_name(tiny_gpt2, "blocks.0.hook_mlp_ou")


def test_missing_directory_and_unknown_family(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type='mamba'"):
        load_model(tmp_path)
