"""`featcircuits train` end to end on stories260k: a transcoder from text, saved, reloaded, better than its start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from conftest import STORIES260K, TINYSTORIES

from featcircuits import load_dictionary
from featcircuits.dictionaries import Dictionary
from featcircuits.training import TrainConfig, apply_overrides
from featcircuits.training.sources import ModelSource
from featcircuits.training.tokens import special_token_ids, tokenize_text_file

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


def _fvu(dictionary: Dictionary, x_in: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        reconstruction = dictionary(x_in)[0]
    return ((reconstruction - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum()).item()


def test_cli_trains_a_transcoder_on_stories260k(stories_model, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text((TINYSTORIES / "train_head.txt").read_text()[:40_000])
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "featcircuits.cli", "train", "--model", str(STORIES260K), "--hook", HOOK_IN,
        "--hook-out", HOOK_OUT, "--architecture", "topk", "--k", "8", "--d-sae", "128", "--tokens", "20480",
        "--dataset", str(text), "--out", str(out), "--no-progress", "--batch-size", "512", "--lr", "3e-3",
        "--set", "context_size=64", "--set", "eval_sequences=4", "--set", "log_every=10",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("l0", "fvu", "dead_fraction", "ce_loss_recovered", "tokens_per_second"):
        assert metrics[key] is not None, key
    assert metrics["steps"] == 40 and metrics["tokens_per_second"] > 0
    assert 0 < metrics["l0"] <= 8

    dictionary = load_dictionary(out / HOOK_IN)
    assert dictionary.cfg.kind == "transcoder" and dictionary.cfg.hook_out == HOOK_OUT
    assert dictionary.cfg.norm_scale == 1.0  # folded on save: it reads raw activations

    # Independent check on held-out text, with activations taken straight from the model.
    tokens = tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 64)[:16]
    source = ModelSource(stories_model, tokens, [HOOK_IN, HOOK_OUT], 16,
                         special_token_ids(stories_model.tokenizer), shuffle=False)
    rows = source.next_chunk()
    trained = _fvu(dictionary, rows[HOOK_IN], rows[HOOK_OUT])
    untrained = _fvu(Dictionary.from_config(dictionary.cfg), rows[HOOK_IN], rows[HOOK_OUT])
    assert trained < 0.95 and trained < 0.5 * untrained, (trained, untrained)
    # The run's own figure for held-out FVU agrees with ours (both are measured on unseen text).
    assert abs(metrics["fvu"] - trained) < 0.15
    assert 0 < metrics["ce_loss_recovered"] <= 1


def test_config_overrides_are_typed():
    config = apply_overrides(TrainConfig(), ["lr=1e-3", "hooks=a,b", "k=16", "unit_norm_decoder=false"])
    assert config.lr == 1e-3 and config.hooks == ["a", "b"] and config.k == 16 and config.unit_norm_decoder is False
