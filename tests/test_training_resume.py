"""Checkpoint/resume: a run SIGKILLed after a checkpoint and resumed ends with the uninterrupted run's weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINYSTORIES

from featcircuits import load_dictionary
from featcircuits.training import TrainConfig, run_training, write_cache
from featcircuits.training.sources import ModelSource
from featcircuits.training.tokens import special_token_ids, tokenize_text_file

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def stories_cache(stories_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    tokens = tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 64)[:80]
    source = ModelSource(stories_model, tokens, [HOOK_IN, HOOK_OUT], 16, special_token_ids(stories_model.tokenizer),
                         shuffle=False)
    write_cache(source, out, [HOOK_IN, HOOK_OUT], source.widths(), len(tokens), rows_per_shard=1500,
                metadata={"model_name": stories_model.cfg.model_name})
    return out


def _config(cache, out, **overrides) -> TrainConfig:
    fields = dict(
        hooks=[HOOK_IN], hooks_out=[HOOK_OUT], dataset=str(cache), out=str(out), architecture="topk", k=8,
        d_sae=128, total_tokens=256 * 160, batch_size=256, lr=3e-3, buffer_bytes=2048 * 128 * 4,
        checkpoint_every=10, log_every=10, device="cpu", progress=False, dead_after_tokens=2000,
    )
    fields.update(overrides)
    return TrainConfig(**fields)


def _cli(config_path, *extra) -> list[str]:
    return [sys.executable, "-m", "featcircuits.cli", "train", str(config_path), *extra]


def _env() -> dict[str, str]:
    # One thread everywhere: the same reduction order in every process, so results match bit for bit.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkill_then_resume_matches_uninterrupted_run(stories_cache, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(_config(stories_cache, tmp_path / "interrupted").to_dict()))

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(_config(stories_cache, tmp_path / "uninterrupted"))
    finally:
        torch.set_num_threads(previous)

    checkpoint = tmp_path / "interrupted" / "checkpoint" / "rank0.pt"
    process = subprocess.Popen(_cli(config_path), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert checkpoint.exists(), "the run ended before writing a checkpoint"
    assert not (tmp_path / "interrupted" / "metrics.json").exists(), "the run finished before it was killed"
    step_at_kill = torch.load(checkpoint, weights_only=False)["step"]
    assert 0 < step_at_kill < 160

    resumed = subprocess.run(_cli(config_path, "--resume"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    name = HOOK_IN
    reference = load_dictionary(tmp_path / "uninterrupted" / name)
    result = load_dictionary(tmp_path / "interrupted" / name)
    for param in ("W_enc", "b_enc", "W_dec", "b_dec"):
        difference = (getattr(reference, param) - getattr(result, param)).abs().max().item()
        assert difference <= 1e-6, (param, difference)
    metrics = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert metrics["steps"] == 160


def test_resume_with_a_different_config_is_refused(stories_cache, tmp_path):
    config = _config(stories_cache, tmp_path / "run", total_tokens=256 * 10, checkpoint_every=5)
    run_training(config)
    checkpoint = tmp_path / "run" / "checkpoint" / "rank0.pt"
    before = checkpoint.read_bytes()
    with pytest.raises(ValueError, match="different configuration.*lr"):
        run_training(_config(stories_cache, tmp_path / "run", total_tokens=256 * 10, lr=1e-3, resume=True))
    with pytest.raises(ValueError, match="--resume"):  # a fresh run never overwrites a checkpointed one
        run_training(_config(stories_cache, tmp_path / "run", total_tokens=256 * 10))
    assert checkpoint.read_bytes() == before
