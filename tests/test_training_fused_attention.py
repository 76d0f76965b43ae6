"""The training source's fused attention gives transformer_lens's own activations, or is not used.

Reference: the same model's ``run_with_cache`` without the fused attention (transformer_lens's forward), on
stories260k and on tiny random checkpoints of every family (grouped K/V, partial and scaled rotary, query
scales, sliding windows, soft caps, query/key norms): where the fused path would differ it must step aside.
"""

from __future__ import annotations

import pytest
import torch

from featcircuits import load_model
from featcircuits.training.sources import ModelSource, fused_attention
from tests.families import FAMILIES, build_checkpoint

# families whose attention has something the fused path does not compute: it must keep transformer_lens's
# (NeoX: attention and MLP in parallel; Mistral, Gemma 2/3: sliding windows; Gemma 2: soft caps; Qwen3: q/k norms)
FALLS_BACK = {"gpt_neox", "mistral", "qwen3", "gemma2", "gemma3"}


def hooks_of(model) -> list[str]:
    last = model.cfg.n_layers - 1
    return ([f"blocks.{layer}.hook_resid_pre" for layer in range(model.cfg.n_layers)]
            + [f"blocks.{last}.hook_resid_post", f"blocks.{last}.hook_attn_out", f"blocks.{last}.hook_mlp_out",
               f"blocks.{last}.ln2.hook_normalized"])


def captured(model, tokens: torch.Tensor, hooks: list[str], fused: bool) -> tuple[dict[str, torch.Tensor], bool]:
    with torch.no_grad():
        if not fused:
            return dict(model.run_with_cache(tokens, names_filter=lambda name: name in hooks)[1]), False
        with fused_attention(model, hooks) as used:
            cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)[1]
        return dict(cache), used


def assert_same_activations(model, tokens: torch.Tensor) -> bool:
    hooks = hooks_of(model)
    reference, _ = captured(model, tokens, hooks, fused=False)
    got, used = captured(model, tokens, hooks, fused=True)
    for hook in hooks:
        torch.testing.assert_close(got[hook], reference[hook], rtol=1e-4, atol=1e-5, msg=hook)
    assert all("forward" not in block.attn.__dict__ for block in model.blocks)  # restored
    return used


def test_stories260k_activations_match_and_the_fused_path_runs(stories_model, single_torch_thread):
    tokens = torch.randint(3, stories_model.cfg.d_vocab, (4, 33), generator=torch.Generator().manual_seed(0))
    assert assert_same_activations(stories_model, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_or_falls_back(family, tmp_path, single_torch_thread):
    model = load_model(build_checkpoint(family, tmp_path / family))
    tokens = torch.randint(3, model.cfg.d_vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    used = assert_same_activations(model, tokens)
    assert used == (family not in FALLS_BACK)


def test_hooks_inside_attention_keep_transformer_lens_forward(stories_model):
    with fused_attention(stories_model, ["blocks.1.attn.hook_pattern"]) as used:
        assert not used
        assert all("forward" not in block.attn.__dict__ for block in stories_model.blocks)


def test_forward_restored_after_an_error(stories_model):
    with pytest.raises(RuntimeError, match="boom"), fused_attention(stories_model, ["blocks.1.hook_resid_pre"]):
        assert "forward" in stories_model.blocks[0].attn.__dict__
        raise RuntimeError("boom")
    assert all("forward" not in block.attn.__dict__ for block in stories_model.blocks)


def test_model_source_rows_equal_transformer_lens_rows(stories_model, single_torch_thread):
    """The source's chunk (special positions dropped) holds exactly the reference forward's rows."""
    tokens = torch.randint(3, stories_model.cfg.d_vocab, (6, 20), generator=torch.Generator().manual_seed(2))
    tokens[:, 0] = 1  # BOS: dropped by the source
    hook = "blocks.2.hook_resid_pre"
    source = ModelSource(stories_model, tokens, [hook], model_batch_size=6, special_ids=[1], shuffle=False)
    rows = source.next_chunk()[hook]
    with torch.no_grad():
        reference = stories_model.run_with_cache(tokens, names_filter=hook)[1][hook][:, 1:].reshape(-1, 64)
    torch.testing.assert_close(rows, reference, rtol=1e-4, atol=1e-5)
