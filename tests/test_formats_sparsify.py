"""sparsify format (read only): directories written by EleutherAI sparsify's own ``SparseCoder.save_to_disk``
read back with the activations sparsify computes (exactly) and its reconstructions (up to summation order:
sparsify decodes with an embedding bag over the k active rows, we with a dense matmul)."""

from __future__ import annotations

import json

import pytest
import torch

sparsify = pytest.importorskip("sparsify")

from featcircuits.dictionaries.io import detect_format, load_dictionaries, load_dictionary, save_dictionary  # noqa: E402

D_IN, D_SAE, K = 16, 64, 6


def sparse_coder(**config):
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(num_latents=D_SAE, k=K, **config))
    with torch.no_grad():
        for param in coder.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    return coder


def sparsify_dense_acts(coder, x: torch.Tensor) -> torch.Tensor:
    top_acts, top_indices, _ = coder.encode(x)
    return torch.zeros(x.shape[0], D_SAE).scatter_(-1, top_indices, top_acts)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A sparsify run as its trainer saves it: one directory per hookpoint, config.json at the top."""
    root = tmp_path_factory.mktemp("sparsify_run")
    torch.manual_seed(1)
    coders = {"layers.2": sparse_coder(), "layers.3.mlp": sparse_coder(transcode=True, skip_connection=True)}
    for hookpoint, coder in coders.items():
        coder.save_to_disk(root / hookpoint)
    (root / "config.json").write_text(json.dumps({"model": "karpathy/stories260K", "dataset": "roneneldan/TinyStories"}))
    return root, coders


def test_reads_sparsify_sae_and_transcoder(run_dir):
    root, coders = run_dir
    assert detect_format(root / "layers.2") == "sparsify"
    dictionaries = {d.cfg.extra["sparsify_hookpoint"]: d for d in load_dictionaries(root)}
    assert set(dictionaries) == set(coders)

    sae = dictionaries["layers.2"]
    assert (sae.cfg.kind, sae.cfg.activation, sae.cfg.k) == ("sae", "topk", K)
    assert sae.cfg.hook_in == sae.cfg.hook_out == "blocks.2.hook_resid_post" and sae.cfg.layer == 2
    assert sae.cfg.apply_b_dec_to_input  # sparsify SAEs subtract b_dec before encoding
    assert (sae.cfg.model_name, sae.cfg.dataset) == ("karpathy/stories260K", "roneneldan/TinyStories")

    transcoder = dictionaries["layers.3.mlp"]
    assert (transcoder.cfg.kind, transcoder.cfg.hook_in, transcoder.cfg.hook_out) == (
        "skip_transcoder", "blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert not transcoder.cfg.apply_b_dec_to_input

    x = torch.randn(40, D_IN)  # sparsify's encoder takes [tokens, d_in]
    for hookpoint, ours in dictionaries.items():
        reference = coders[hookpoint]
        reconstruction, feature_acts = ours(x)
        assert torch.equal(feature_acts, sparsify_dense_acts(reference, x))
        assert ((feature_acts > 0).sum(-1) <= K).all() and (feature_acts > 0).any()
        with torch.no_grad():
            expected = reference(x).sae_out
        torch.testing.assert_close(reconstruction, expected, rtol=1e-5, atol=1e-5)


def test_sparsify_is_read_only(run_dir, tmp_path):
    root, _ = run_dir
    sae = load_dictionary(root / "layers.2")
    with pytest.raises(ValueError, match="sparsify is a read-only format"):
        save_dictionary(sae, tmp_path / "out", format="sparsify")
    assert not (tmp_path / "out").exists()
    # What it reads converts to a writable format with the same outputs.
    save_dictionary(sae, tmp_path / "saelens", format="saelens")
    x = torch.randn(8, D_IN)
    assert torch.equal(load_dictionary(tmp_path / "saelens")(x).reconstruction, sae(x).reconstruction)


def test_groupmax_is_refused_with_the_file_named(tmp_path):
    sparse_coder(activation="groupmax").save_to_disk(tmp_path / "layers.0")
    with pytest.raises(ValueError, match=r"layers\.0/cfg\.json has activation 'groupmax'"):
        load_dictionary(tmp_path / "layers.0")


@pytest.mark.parametrize(("hookpoint", "transcode", "expected"), [
    ("layers.4", False, ("blocks.4.hook_resid_post", "blocks.4.hook_resid_post", 4)),
    ("model.layers.4", True, ("blocks.4.hook_resid_pre", "blocks.4.hook_resid_post", 4)),
    ("gpt_neox.layers.0.mlp", True, ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", 0)),
    ("transformer.h.11.attn", False, ("blocks.11.hook_attn_out", "blocks.11.hook_attn_out", 11)),
    ("embed_tokens", False, ("embed_tokens", "embed_tokens", None)),  # kept verbatim, no layer
])
def test_hookpoints_map_to_transformerlens_hooks(hookpoint, transcode, expected):
    from featcircuits.dictionaries.io.sparsify import hooks_for

    assert hooks_for(hookpoint, transcode) == expected
