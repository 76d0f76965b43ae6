"""Checkpoints load with ``weights_only=True``: a planted pickle payload in ``--out`` is refused, never run."""

from __future__ import annotations

import pickle

import pytest
import torch
from conftest import STORIES260K, TINYSTORIES

from featcircuits.cli import main as cli_main
from featcircuits.training import TrainConfig, run_training


class _Payload:
    """Unpickling this calls ``open(marker, "w")``: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump({"step": 1, "evil": _Payload(str(marker))}, handle)
    with pytest.raises(Exception):  # noqa: B017 - the payload is live: a full unpickling would run it
        torch.load(path, weights_only=True)
    assert not marker.exists()


def test_resume_refuses_a_planted_pickle_payload(tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    _plant(out / "checkpoint" / "rank0.pt", marker)
    code = cli_main(["train", "--model", str(STORIES260K), "--hook", "blocks.0.hook_resid_post", "--dataset",
                     str(TINYSTORIES / "valid_head.txt"), "--out", str(out), "--tokens", "512", "--batch-size", "256",
                     "--d-sae", "32", "--k", "4", "--context-size", "32", "--no-progress", "--resume"])
    assert code == 2
    error = capsys.readouterr().err
    assert "rank0.pt holds objects other than tensors" in error and "was not loaded" in error
    assert not marker.exists()


def test_checkpoints_hold_only_plain_data_and_resume(tmp_path):
    config = dict(model=str(STORIES260K), hooks=["blocks.0.hook_resid_post"], dataset=str(TINYSTORIES / "valid_head.txt"),
                  out=str(tmp_path / "run"), d_sae=32, k=4, total_tokens=256 * 6, batch_size=256, context_size=32,
                  progress=False, device="cpu", checkpoint_every=3)
    run_training(TrainConfig(**config))
    state = torch.load(tmp_path / "run" / "checkpoint" / "rank0.pt", weights_only=True)
    assert state["step"] == 6
    resumed = run_training(TrainConfig(**{**config, "total_tokens": 256 * 6, "resume": True}))
    assert resumed["steps"] == 6


def test_bundled_model_trainer_refuses_a_planted_checkpoint(tmp_path):
    from train.bundled_model.train_model import TrainConfig as ModelTrainConfig
    from train.bundled_model.train_model import _resumable_checkpoint

    marker = tmp_path / "pwned"
    _plant(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(pickle.UnpicklingError):
        _resumable_checkpoint(tmp_path / "checkpoint.pt", tmp_path / "stable.pt", ModelTrainConfig())
    assert not marker.exists()
