"""Data-parallel training with torchrun (2 gloo processes on CPU) matches one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import TINYSTORIES

from featcircuits import load_dictionary
from featcircuits.training import TrainConfig, run_training, write_cache
from featcircuits.training.sources import ModelSource
from featcircuits.training.tokens import special_token_ids, tokenize_text_file

HOOK_IN, HOOK_OUT = "blocks.2.ln2.hook_normalized", "blocks.2.hook_mlp_out"


@pytest.fixture(scope="module")
def stories_cache(stories_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    tokens = tokenize_text_file(TINYSTORIES / "valid_head.txt", stories_model.tokenizer, 64)[:40]
    hooks = [HOOK_IN, HOOK_OUT]
    source = ModelSource(stories_model, tokens, hooks, 20, special_token_ids(stories_model.tokenizer), shuffle=False)
    write_cache(source, out, hooks, source.widths(), len(tokens), rows_per_shard=1000,
                metadata={"model_name": stories_model.cfg.model_name})
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(config_path, n_procs: int) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n_procs}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "featcircuits.cli", "train", str(config_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def _two_ranks_and_one_process(fields: dict, tmp_path) -> dict[str, float]:
    """Train ``fields`` with 2 gloo ranks and in this process; max |difference| of each parameter."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps({**fields, "out": str(tmp_path / "two")}))
    completed = _torchrun(config_path, 2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(TrainConfig(**fields, out=str(tmp_path / "one")))
    finally:
        torch.set_num_threads(previous)
    one = load_dictionary(tmp_path / "one" / HOOK_IN)
    two = load_dictionary(tmp_path / "two" / HOOK_IN)
    return {param: (getattr(one, param) - getattr(two, param)).abs().max().item()
            for param in ("W_enc", "b_enc", "W_dec", "b_dec")}


def test_two_gloo_ranks_match_one_process(stories_cache, tmp_path):
    fields = dict(
        hooks=[HOOK_IN], hooks_out=[HOOK_OUT], dataset=str(stories_cache), architecture="topk", k=8, d_sae=96,
        total_tokens=512 * 12, batch_size=512, lr=1e-3, buffer_bytes=2048 * 128 * 4, device="cpu",
        progress=False, log_every=4, lr_decay_fraction=0.0,
    )
    for param, difference in _two_ranks_and_one_process(fields, tmp_path).items():
        # Averaging two half-batch gradients reorders float sums; nothing else may differ.
        assert difference < 1e-4, (param, difference)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 12


def test_two_gloo_ranks_from_text_match_one_process(stories_path, tmp_path):
    """Straight from text: each rank runs the model on its share of every model batch (5 sequences: shares of
    3 and 2, so the padded gather is exercised) and the gathered rows feed identical buffers; each rank trains
    on its half of the global batch. Several buffer refills and an epoch boundary happen within the run."""
    fields = dict(
        model=str(stories_path), dataset=str(TINYSTORIES / "valid_head.txt"), hooks=[HOOK_IN], hooks_out=[HOOK_OUT],
        architecture="topk", k=8, d_sae=96, total_tokens=512 * 16, batch_size=512, lr=1e-3, context_size=64,
        model_batch_size=5, buffer_bytes=2048 * 128 * 4, device="cpu", progress=False, log_every=8,
        lr_decay_fraction=0.0, eval_sequences=2,
    )
    for param, difference in _two_ranks_and_one_process(fields, tmp_path).items():
        # Same rows, same steps: only float rounding differs (model forwards over 3 or 2 sequences instead of 5,
        # half-batch gradients averaged instead of one sum), ~1e-7 per step, 16 Adam steps of lr 1e-3 stay far
        # below 1e-4; a different row anywhere in a batch moves weights by ~lr = 1e-3.
        assert difference < 1e-4, (param, difference)
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 16


def test_dictionaries_distributed_across_ranks(stories_cache, tmp_path):
    """Two dictionaries on two ranks: each rank trains one from whole batches; rank 0 writes both metrics."""
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(dict(
        hooks=[HOOK_IN, HOOK_OUT], dataset=str(stories_cache), architecture="topk", k=4, d_sae=64,
        total_tokens=256 * 6, batch_size=256, buffer_bytes=1024 * 128 * 4, device="cpu", progress=False,
        distribute_dictionaries=True, out=str(tmp_path / "out"),
    )))
    completed = _torchrun(config_path, 2)
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sorted(metrics["dictionaries"]) == sorted([HOOK_IN, HOOK_OUT])
    for hook in (HOOK_IN, HOOK_OUT):
        dictionary = load_dictionary(tmp_path / "out" / hook)
        assert dictionary.cfg.hook_in == hook and dictionary.cfg.kind == "sae"
        assert metrics["dictionaries"][hook]["fvu"] < 1.0
