"""Pretrained releases resolved through huggingface_hub, from a local cache laid out exactly as the Hub
client lays it out (models--org--name/{blobs,snapshots/<commit>,refs}), with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import featcircuits as fc
from featcircuits.dictionaries.io import FORMATS
from featcircuits.hub import check_dictionaries_match_model, get_release
from featcircuits.hub.loading import HubFileError, from_pretrained, load_release
from featcircuits.hub.registry import UnknownReleaseError


def write_cached_snapshot(cache: Path, repo_id: str, commit: str, files: dict[str, Path | bytes],
                          refs: tuple[str, ...] = ("main",)) -> None:
    """Store ``files`` as huggingface_hub does: content-addressed blobs, a snapshot of relative symlinks
    named by commit, and refs naming that commit."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    for name, content in files.items():
        data = content.read_bytes() if isinstance(content, Path) else content
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo_dir / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


def folder_files(folder: Path, prefix: str) -> dict[str, Path]:
    return {f"{prefix}/{p.name}": p for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache under a temporary HF_HOME, offline."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import; the test process may have imported it already.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def random_dictionary(**fields) -> fc.Dictionary:
    cfg = fc.DictionaryConfig(**{"d_in": 8, "d_sae": 24, **fields})
    dictionary = fc.Dictionary.from_config(cfg)
    with torch.no_grad():
        for parameter in dictionary.parameters():
            parameter.normal_()
        if dictionary.threshold is not None:
            dictionary.threshold.abs_()
    return dictionary


def assert_same_function(loaded: fc.Dictionary, original: fc.Dictionary) -> None:
    x = torch.randn(5, original.cfg.d_in)
    expected_out, expected_acts = original(x)
    out, acts = loaded(x)
    torch.testing.assert_close(acts, expected_acts)
    torch.testing.assert_close(out, expected_out)


NATIVE_REGISTRY = """
releases:
  tiny-native:
    repo_id: someone/tiny-dictionaries
    model: tiny-gpt2
    format: native
    kind: sae
    hooks: {in: "blocks.{layer}.hook_resid_pre"}
    layers: [0, 1]
    path_template: "resid_{layer}"
"""


def test_native_release_through_the_cache_with_a_pinned_revision(hub_cache, tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(NATIVE_REGISTRY)
    old = [random_dictionary(hook_in=f"blocks.{layer}.hook_resid_pre", layer=layer) for layer in (0, 1)]
    new = [random_dictionary(hook_in=f"blocks.{layer}.hook_resid_pre", layer=layer) for layer in (0, 1)]
    old_commit, new_commit = "a" * 40, "b" * 40
    for commit, dictionaries, refs in ((old_commit, old, ("v1",)), (new_commit, new, ("main",))):
        files = {}
        for layer, dictionary in enumerate(dictionaries):
            folder = tmp_path / commit[:4] / f"resid_{layer}"
            dictionary.save(str(folder))  # featcircuits' own writer
            files |= folder_files(folder, f"resid_{layer}")
        write_cached_snapshot(hub_cache, "someone/tiny-dictionaries", commit, files, refs)

    latest = load_release("tiny-native", registry=registry)
    assert [d.cfg.hook_in for d in latest] == ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    for loaded, original in zip(latest, new, strict=True):
        assert_same_function(loaded, original)
    # Pinned by commit hash and by tag: the older weights.
    assert_same_function(from_pretrained("tiny-native", "layer_1", revision=old_commit, registry=registry), old[1])
    pinned = from_pretrained("tiny-native", 0, revision="v1", registry=registry)
    assert_same_function(pinned, old[0])
    assert pinned.cfg.extra["revision"] == "v1" and pinned.cfg.extra["repo_id"] == "someone/tiny-dictionaries"


def test_local_release_beside_the_registry_needs_no_hub(tmp_path):
    registry = tmp_path / "registry.yaml"
    registry.write_text(NATIVE_REGISTRY.replace("repo_id: someone/tiny-dictionaries", "local_dir: bundled"))
    saved = [random_dictionary(hook_in=f"blocks.{layer}.hook_resid_pre") for layer in (0, 1)]
    for layer, dictionary in enumerate(saved):
        dictionary.save(str(tmp_path / "bundled" / f"resid_{layer}"))
    for loaded, original in zip(load_release("tiny-native", registry=registry), saved, strict=True):
        assert_same_function(loaded, original)


def test_saelens_release_id_passes_through_to_saelens_registry(hub_cache, tmp_path):
    # gpt2-small-res-jb: repo and folder come from sae-lens's pretrained_saes.yaml.
    sae = random_dictionary(hook_in="blocks.0.hook_resid_pre", model_name="gpt2-small", apply_b_dec_to_input=True)
    FORMATS["saelens"].save([sae], tmp_path / "jb")
    write_cached_snapshot(hub_cache, "jbloom/GPT2-Small-SAEs-Reformatted", "c" * 40,
                          folder_files(tmp_path / "jb", "blocks.0.hook_resid_pre"))
    (loaded,) = fc.load_dictionaries("gpt2-small-res-jb", ids=["blocks.0.hook_resid_pre"])
    assert_same_function(loaded, sae)
    with pytest.warns(DeprecationWarning, match="fc.load_dictionaries"):  # the old spelling still works
        assert_same_function(fc.Dictionary.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre"), sae)
    assert loaded.cfg.hook_in == "blocks.0.hook_resid_pre"
    assert loaded.cfg.extra["published_metrics"]["l0"] == 10.0  # sae-lens's figure for this SAE
    assert loaded.cfg.extra["config_overrides"]["model_from_pretrained_kwargs"]["center_writing_weights"] is True
    # load_dictionaries takes a release name as well as a path; this one lacks layers 1..11 in the cache.
    with pytest.raises(HubFileError, match="blocks.1.hook_resid_pre/cfg.json"):
        fc.load_dictionaries("gpt2-small-res-jb")


def test_saelens_files_from_before_saelens_6_are_upgraded_by_saelens(hub_cache, tmp_path):
    # The jb release predates sae-lens 6: a flat cfg.json with hook_point/hook_point_layer.
    from safetensors.torch import save_file

    folder = tmp_path / "old"
    folder.mkdir()
    weights = {"W_enc": torch.randn(8, 24), "b_enc": torch.randn(24), "W_dec": torch.randn(24, 8), "b_dec": torch.randn(8)}
    save_file(weights, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({
        "model_name": "gpt2-small", "hook_point": "blocks.2.hook_resid_pre", "hook_point_layer": 2,
        "hook_point_head_index": None, "d_in": 8, "d_sae": 24, "dtype": "torch.float32", "device": "cpu",
        "dataset_path": "Skylion007/openwebtext", "context_size": 128}))
    write_cached_snapshot(hub_cache, "jbloom/GPT2-Small-SAEs-Reformatted", "9" * 40,
                          folder_files(folder, "blocks.2.hook_resid_pre"))
    (sae,) = fc.load_dictionaries("gpt2-small-res-jb", ids=["blocks.2.hook_resid_pre"])
    assert (sae.cfg.hook_in, sae.cfg.layer, sae.cfg.dataset) == ("blocks.2.hook_resid_pre", 2, "Skylion007/openwebtext")
    x = torch.randn(5, 8)
    expected = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(sae(x).reconstruction, expected, rtol=1e-5, atol=1e-5)


def test_gemma_transcoder_set_reads_gemma_scope_npz(hub_cache, tmp_path):
    rng = np.random.default_rng(0)
    params = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": rng.normal(size=16),
              "b_dec": rng.normal(size=8), "threshold": np.abs(rng.normal(size=16))}
    params = {key: value.astype(np.float32) for key, value in params.items()}
    np.savez(tmp_path / "params.npz", **params)
    write_cached_snapshot(hub_cache, "google/gemma-scope-2b-pt-transcoders", "d" * 40,
                          {"layer_3/width_16k/average_l0_54/params.npz": tmp_path / "params.npz"})
    (transcoder,) = fc.load_dictionaries("gemma-2-2b-transcoders", ids=["layer_3"])
    assert (transcoder.cfg.kind, transcoder.cfg.activation) == ("transcoder", "jumprelu")
    assert (transcoder.cfg.hook_in, transcoder.cfg.hook_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    x = torch.randn(6, 8)
    p = {key: torch.from_numpy(value) for key, value in params.items()}
    pre = x @ p["W_enc"] + p["b_enc"]
    expected = (pre * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"]  # Gemma Scope's JumpReLU transcoder
    torch.testing.assert_close(transcoder(x).reconstruction, expected)


def test_saelens_conversion_functions_are_used_with_the_pinned_revision(hub_cache, tmp_path, monkeypatch):
    # gemma-scope-2b-pt-transcoders goes through sae-lens's own gemma_2_transcoder loader. That loader
    # hard-codes Gemma-2-2B's width (2304); shrink only its config so a small params.npz stands in.
    import sae_lens.loading.pretrained_sae_loaders as loaders

    real_config = loaders.get_gemma_2_transcoder_config_from_hf

    def small_config(*args, **kwargs):
        return {**real_config(*args, **kwargs), "d_in": 8, "d_out": 8, "d_sae": 16}

    monkeypatch.setattr(loaders, "get_gemma_2_transcoder_config_from_hf", small_config)
    rng = np.random.default_rng(1)
    versions = []
    for commit, refs in (("1" * 40, ("v0",)), ("2" * 40, ("main",))):
        params = {"W_enc": rng.normal(size=(8, 16)), "W_dec": rng.normal(size=(16, 8)), "b_enc": rng.normal(size=16),
                  "b_dec": rng.normal(size=8), "threshold": np.abs(rng.normal(size=16))}
        params = {key: value.astype(np.float32) for key, value in params.items()}
        np.savez(tmp_path / f"{commit[:4]}.npz", **params)
        write_cached_snapshot(hub_cache, "google/gemma-scope-2b-pt-transcoders", commit,
                              {"layer_0/width_16k/average_l0_76/params.npz": tmp_path / f"{commit[:4]}.npz"}, refs)
        versions.append(params)
    x = torch.randn(6, 8)
    for revision, params in ((None, versions[1]), ("v0", versions[0])):
        (transcoder,) = fc.load_dictionaries("gemma-scope-2b-pt-transcoders", ids=["layer_0/width_16k/average_l0_76"],
                                             revision=revision)
        assert (transcoder.cfg.hook_in, transcoder.cfg.hook_out) == ("blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out")
        p = {key: torch.from_numpy(value) for key, value in params.items()}
        pre = x @ p["W_enc"] + p["b_enc"]
        torch.testing.assert_close(transcoder(x).reconstruction, (pre * (pre > p["threshold"])) @ p["W_dec"] + p["b_dec"])


def test_gpt2_transcoders_read_transcoder_circuits_checkpoints(hub_cache, tmp_path):
    # Their checkpoints pickle a training-config object of their own package; build one the same way.
    module = types.ModuleType("sae_training.config")

    class LanguageModelSAERunnerConfig:
        pass

    LanguageModelSAERunnerConfig.__module__ = "sae_training.config"
    LanguageModelSAERunnerConfig.__qualname__ = "LanguageModelSAERunnerConfig"
    module.LanguageModelSAERunnerConfig = LanguageModelSAERunnerConfig
    sys.modules["sae_training"], sys.modules["sae_training.config"] = types.ModuleType("sae_training"), module
    train_cfg = LanguageModelSAERunnerConfig()
    train_cfg.hook_point, train_cfg.out_hook_point = "blocks.4.ln2.hook_normalized", "blocks.4.hook_mlp_out"
    train_cfg.dtype = torch.float32
    state = {"W_enc": torch.randn(8, 20), "b_enc": torch.randn(20), "W_dec": torch.randn(20, 8),
             "b_dec": torch.randn(8), "b_dec_out": torch.randn(8)}
    name = "final_sparse_autoencoder_gpt2-small_blocks.4.ln2.hook_normalized_24576.pt"
    try:
        torch.save({"cfg": train_cfg, "state_dict": state}, tmp_path / name)
    finally:
        del sys.modules["sae_training"], sys.modules["sae_training.config"]
    write_cached_snapshot(hub_cache, "pchlenski/gpt2-transcoders", "e" * 40, {name: tmp_path / name})
    transcoder = fc.Dictionary.from_pretrained("gpt2-small-transcoders", 4)  # a layer number works as an id
    x = torch.randn(6, 8)
    expected = torch.relu((x - state["b_dec"]) @ state["W_enc"] + state["b_enc"]) @ state["W_dec"] + state["b_dec_out"]
    torch.testing.assert_close(transcoder(x).reconstruction, expected, rtol=1e-5, atol=1e-5)
    assert transcoder.cfg.kind == "transcoder" and transcoder.cfg.hook_out == "blocks.4.hook_mlp_out"


def test_registry_releases_are_consistent():
    for name in ("gpt2-small-res-jb", "gpt2-small-transcoders", "gemma-2-2b-transcoders", "gemma-scope-2b-pt-transcoders"):
        release = get_release(name)
        n_layers = 26 if "gemma" in name else 12
        layers = sorted({entry.layer for entry in release.dictionaries.values()})
        assert layers == list(range(n_layers)), name
        hook_in, hook_out = release.hooks_for(next(iter(release.dictionaries.values())))
        assert hook_in.startswith("blocks.0.") and hook_out.startswith("blocks.0."), name
    # Any SAELens id is passed through, with sae-lens's own paths.
    assert get_release("pythia-70m-deduped-res-sm").repo_id == "ctigges/pythia-70m-deduped__res-sm_processed"


def test_unknown_release_and_id_list_close_matches():
    with pytest.raises(UnknownReleaseError, match="Did you mean 'gpt2-small-res-jb'"):
        fc.Dictionary.from_pretrained("gpt2-small-res-j", "blocks.0.hook_resid_pre")
    with pytest.raises(UnknownReleaseError, match="no dictionary 'blocks.0.hook_resid_prе'.*Did you mean 'blocks.0.hook_resid_pre'"):
        fc.Dictionary.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_prе")
    with pytest.raises(FileNotFoundError, match="path does not exist, nor is it a release.*Did you mean 'gemma-2-2b-transcoders'"):
        fc.load_dictionaries("gemma-2-2b-transcoder")


def test_missing_revision_files_and_repo_are_explained(hub_cache, tmp_path):
    sae = random_dictionary(hook_in="blocks.0.hook_resid_pre")
    FORMATS["saelens"].save([sae], tmp_path / "jb")
    files = folder_files(tmp_path / "jb", "blocks.0.hook_resid_pre")
    write_cached_snapshot(hub_cache, "jbloom/GPT2-Small-SAEs-Reformatted", "f" * 40, files)
    with pytest.raises(HubFileError, match=r"Revision 'v2' .* does not exist in the local cache .*cached refs: \['main'\]"):
        fc.Dictionary.from_pretrained("gpt2-small-res-jb", "blocks.0.hook_resid_pre", revision="v2")
    with pytest.raises(HubFileError, match="has no file 'blocks.5.hook_resid_pre/cfg.json'.*lacks the files"):
        fc.Dictionary.from_pretrained("gpt2-small-res-jb", "blocks.5.hook_resid_pre")
    with pytest.raises(HubFileError, match="'pchlenski/gpt2-transcoders' is not in the local Hugging Face cache"):
        fc.Dictionary.from_pretrained("gpt2-small-transcoders", "layer_0")


def test_dictionaries_for_another_model_are_refused(tiny_gpt2):
    fitting = random_dictionary(d_in=32, d_sae=16, hook_in="blocks.1.hook_resid_pre")
    check_dictionaries_match_model(tiny_gpt2, [fitting])
    wide = random_dictionary(d_in=768, d_sae=16, hook_in="blocks.1.hook_resid_pre", model_name="gpt2-small")
    with pytest.raises(ValueError, match="trained on gpt2-small.*width 768.*has width 32.*different model"):
        check_dictionaries_match_model(tiny_gpt2, [fitting, wide])
    deep = random_dictionary(d_in=32, d_sae=16, hook_in="blocks.7.hook_resid_pre", model_name="gpt2-small")
    with pytest.raises(ValueError, match="hook 'blocks.7.hook_resid_pre', which .* does not have"):
        check_dictionaries_match_model(tiny_gpt2, [deep])
