"""The end of a run names every poor dictionary with what to change (stderr and metrics.json), and no good one."""

from __future__ import annotations

import json

from conftest import STORIES260K, TINYSTORIES

from featcircuits.cli import main as cli_main
from featcircuits.training.defaults import default_lr
from featcircuits.training.diagnosis import (
    POOR_CE_RECOVERED,
    POOR_DEAD_FRACTION,
    POOR_FVU,
    diagnose,
    fvu_drop,
)

TEXT = TINYSTORIES / "valid_head.txt"


def _train(out, hook, *flags) -> int:
    return cli_main(["train", "--model", str(STORIES260K), "--hook", hook, "--dataset", str(TEXT), "--k", "8",
                     "--d-sae", "512", "--context-size", "64", "--out", str(out), "--no-progress",
                     "--set", "eval_sequences=8", "--set", "log_every=10", *flags])


def test_an_undertrained_run_is_named_with_more_tokens(tmp_path, capsys):
    assert _train(tmp_path / "short", "blocks.3.hook_resid_post", "--tokens", "512", "--lr", "1e-5") == 0
    captured = capsys.readouterr()
    metrics = json.loads((tmp_path / "short" / "metrics.json").read_text())
    verdict = metrics["diagnosis"]["blocks.3.hook_resid_post"]
    assert metrics["dictionaries"]["blocks.3.hook_resid_post"]["fvu"] > POOR_FVU
    assert any(problem.startswith("FVU") for problem in verdict["problems"])
    assert any("more tokens" in advice for advice in verdict["advice"])
    assert any("width default learning rate" in advice for advice in verdict["advice"])  # 1e-5 is far below it
    assert "dictionary blocks.3.hook_resid_post is poor (FVU" in captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["poor"] == metrics["diagnosis"]
    assert metrics["diagnosis_thresholds"]["fvu_above"] == POOR_FVU


def test_a_good_run_is_not_named(tmp_path, capsys):
    # The token embedding (blocks.0.hook_resid_pre) is easy: 160 steps reach a held-out FVU of a few percent.
    assert _train(tmp_path / "good", "blocks.0.hook_resid_pre", "--tokens", "10240", "--batch-size", "64") == 0
    captured = capsys.readouterr()
    metrics = json.loads((tmp_path / "good" / "metrics.json").read_text())
    result = metrics["dictionaries"]["blocks.0.hook_resid_pre"]
    assert result["fvu"] < POOR_FVU and result["ce_loss_recovered"] > POOR_CE_RECOVERED
    assert metrics["diagnosis"] == {} and "is poor" not in captured.err


def _verdict(fvu=0.1, ce=0.95, dead=0.0, lr=None, steps=1000, drop=0.01, architecture="topk"):
    metrics = {"fvu": fvu, "ce_loss_recovered": ce, "dead_fraction": dead}
    return diagnose(metrics, lr=default_lr(1024) if lr is None else lr, d_sae=1024, k=16, architecture=architecture,
                    steps=steps, total_tokens=2_000_000, drop=drop)


def test_thresholds_and_what_each_problem_asks_for():
    assert _verdict() is None
    assert _verdict(fvu=POOR_FVU - 0.01, ce=POOR_CE_RECOVERED + 0.01, dead=POOR_DEAD_FRACTION) is None
    converged = _verdict(fvu=0.45)
    assert converged["problems"] == ["FVU 0.450 > 0.3"]
    assert converged["advice"] == ["the run has converged at this size: more latents (e.g. --d-sae 2048) or a larger "
                                   "k (e.g. --k 32)"]
    improving = _verdict(ce=0.6, drop=0.2)
    assert improving["problems"] == ["CE loss recovered 0.600 < 0.8"]
    assert improving["advice"][0].startswith("train on more tokens (e.g. --tokens 8000000)")
    dead = _verdict(dead=0.3)
    assert dead["problems"] == ["dead fraction 0.300 > 0.1"] and "lower learning rate" in dead["advice"][0]
    too_fast = _verdict(fvu=0.5, lr=10 * default_lr(1024))
    assert any("width default learning rate" in advice for advice in too_fast["advice"])
    relu = _verdict(fvu=0.5, architecture="relu")
    assert "weaker sparsity coefficient" in relu["advice"][-1]
    assert _verdict(fvu=float("nan"), ce=float("nan")) is None  # no evaluation: nothing to judge by


def test_fvu_drop_reads_the_second_half_of_the_history():
    # Each record averages the steps since the previous one: the one at step 50 covers steps 11-50, not the
    # second half; those at 80 and 100 do.
    history = [{"step": s, "a/fvu": f} for s, f in [(10, 0.9), (50, 0.5), (80, 0.45), (100, 0.4)]]
    assert abs(fvu_drop(history, "a", 100) - (0.45 - 0.4) / 0.45) < 1e-9
    assert fvu_drop(history[:3], "a", 100) is None
