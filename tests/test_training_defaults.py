"""Defaults that scale with the run: batch size from the token budget, learning rate from the width (sparsify's
fit of Gao et al.), warm-up from the steps; a run records what it chose and explicit values are kept."""

from __future__ import annotations

import json
import math

import pytest
from conftest import STORIES260K, TINYSTORIES

from featcircuits.cli import main as cli_main
from featcircuits.training import TrainConfig, run_training
from featcircuits.training.defaults import LR_SCALE, default_batch_size, default_lr, default_warmup_steps


def test_batch_size_gives_short_runs_about_a_thousand_steps():
    assert default_batch_size(300_000) == 256  # 1171 steps where a 4096 batch gave 73
    assert default_batch_size(2_000_000) == 2048
    assert default_batch_size(500_000_000) == 4096  # long runs keep the usual batch
    assert default_batch_size(10_000) == 256
    for tokens in (300_000, 600_000, 1_000_000, 2_000_000, 4_000_000):
        assert 700 <= tokens // default_batch_size(tokens) <= 1500
    assert TrainConfig(total_tokens=300_000).n_steps == 1171


def test_lr_follows_the_width_law_of_sparsify():
    for n_latents in (512, 2**14, 2**17):
        sparsify = 2e-4 / (n_latents / 2**14) ** 0.5  # sparsify/trainer.py's default for TopK SAEs
        assert math.isclose(default_lr(n_latents), LR_SCALE * sparsify)
    assert math.isclose(default_lr(4096) / default_lr(1024), 0.5)
    assert math.isclose(default_lr(1024, batch_size=1024) / default_lr(1024, batch_size=256), 2.0)  # sqrt(batch)


def test_warmup_is_a_share_of_the_steps():
    assert default_warmup_steps(1171) == 59
    assert default_warmup_steps(10) == 1
    assert default_warmup_steps(10**6) == 1000


def _config(out, **overrides) -> TrainConfig:
    fields = dict(model=str(STORIES260K), hooks=["blocks.1.hook_resid_post"], dataset=str(TINYSTORIES / "valid_head.txt"),
                  out=str(out), d_sae=64, k=4, total_tokens=1536, context_size=32, eval_sequences=2, progress=False,
                  device="cpu")
    fields.update(overrides)
    return TrainConfig(**fields)


def test_a_run_records_the_values_it_chose_and_keeps_explicit_ones(tmp_path):
    run_training(_config(tmp_path / "auto"))
    chosen = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert chosen["batch_size"] == 256 and chosen["lr_warmup_steps"] == default_warmup_steps(6)
    assert math.isclose(chosen["lr"], default_lr(64))
    run_training(_config(tmp_path / "explicit", batch_size=512, lr=1e-3, lr_warmup_steps=0))
    kept = json.loads((tmp_path / "explicit" / "config.json").read_text())
    assert (kept["batch_size"], kept["lr"], kept["lr_warmup_steps"]) == (512, 1e-3, 0)
    assert json.loads((tmp_path / "explicit" / "metrics.json").read_text())["steps"] == 3


@pytest.mark.parametrize("value", ["0", "-0.001", "nan"])
def test_an_explicit_lr_flag_must_be_usable(tmp_path, capsys, value):
    code = cli_main(["train", "--model", str(STORIES260K), "--hook", "blocks.1.hook_resid_post", "--dataset",
                     str(TINYSTORIES / "valid_head.txt"), "--tokens", "1024", "--lr", value, "--out", str(tmp_path / "r")])
    assert code == 2 and "trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bad_warmup_is_refused():
    with pytest.raises(ValueError, match="lr_warmup_steps=-2"):
        _config("x", lr_warmup_steps=-2).validate()
