"""Bad input to training: each case stops with an error that names the problem and the fix."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES260K

from featcircuits.cli import main as cli_main
from featcircuits.dictionaries import DictionaryConfig
from featcircuits.training import (
    ActivationStore,
    CacheSource,
    DictionaryTrainer,
    NonFiniteActivationError,
    SuperpositionData,
    SyntheticSource,
    TrainConfig,
    Trainer,
    run_training,
    write_cache,
)


def _text_config(tmp_path, dataset, **overrides) -> TrainConfig:
    fields = dict(model=str(STORIES260K), hooks=["blocks.0.hook_resid_post"], dataset=str(dataset),
                  out=str(tmp_path / "out"), d_sae=32, k=4, total_tokens=512, batch_size=256, context_size=32,
                  progress=False)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_empty_and_too_short_datasets(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        run_training(_text_config(tmp_path, empty))
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(ValueError, match="fewer than one sequence of context_size=32"):
        run_training(_text_config(tmp_path, short))
    few = tmp_path / "few.txt"
    few.write_text("Once upon a time there was a little girl named Lily. " * 12)
    with pytest.raises(ValueError, match="fewer than one batch"):
        run_training(_text_config(tmp_path, few))
    assert not (tmp_path / "out").exists()


def test_missing_hook_is_named(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little girl named Lily. " * 200)
    with pytest.raises(KeyError, match="blocks.9.hook_resid_post"):
        run_training(_text_config(tmp_path, text, hooks=["blocks.9.hook_resid_post"]))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    code = cli_main(["train", "--hook", "x", "--dataset", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"),
                     "--model", str(STORIES260K)])
    assert code == 2
    assert "missing.txt" in capsys.readouterr().err


class _PoisonedSource(SyntheticSource):
    """Synthetic rows whose third chunk holds a NaN."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks = 0

    def next_chunk(self):
        chunk = super().next_chunk()
        self.chunks += 1
        if self.chunks == 3:
            chunk["x"][5, 1] = float("nan")
        return chunk


def test_nan_activations_stop_training_naming_step_and_hook():
    data = SuperpositionData(n_features=16, d=8, seed=0)
    source = _PoisonedSource(data, "x", "x", rows=256)
    config = TrainConfig(hooks=["x"], dataset="synthetic", d_sae=16, k=2, total_tokens=256 * 20, batch_size=128,
                         progress=False)
    store = ActivationStore(source, source.widths(), 128, 512 * 8 * 4, seed=0)
    trainer = DictionaryTrainer(config, DictionaryConfig(d_in=8, d_sae=16, activation="topk", k=2, hook_in="x"),
                                torch.device("cpu"))
    with pytest.raises(NonFiniteActivationError, match=r"hook 'x'.*training step \d+"):
        Trainer(config, [trainer], ["x"], store).run()


class _RowSource:
    """Stand-in for a ModelSource when writing a cache: 50-row chunks of two hooks."""

    def __init__(self) -> None:
        self.position = 0

    def next_chunk(self):
        self.position += 1
        return {"a": torch.randn(50, 4), "b": torch.randn(50, 4)}


def test_cache_for_another_hook_or_model_is_refused(tmp_path):
    write_cache(_RowSource(), tmp_path / "cache", ["a", "b"], {"a": 4, "b": 4}, n_sequences=3, rows_per_shard=60,
                metadata={"model_name": "stories260k"})
    assert CacheSource(tmp_path / "cache", ["a", "b"], model_name="stories260k").total_rows == 150
    with pytest.raises(ValueError, match=r"holds hooks \['a', 'b'\], not \['c'\]"):
        CacheSource(tmp_path / "cache", ["a", "c"])
    with pytest.raises(ValueError, match="written for model 'stories260k', not 'gpt2'"):
        CacheSource(tmp_path / "cache", ["a"], model_name="gpt2")
    with pytest.raises(ValueError, match="different settings"):  # resuming a cache with other hooks
        write_cache(_RowSource(), tmp_path / "cache", ["a"], {"a": 4}, n_sequences=3)
