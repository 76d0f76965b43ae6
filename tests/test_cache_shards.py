"""The activation cache at scale: background shard writer (bounded, failures surfaced, resumable after a
kill) and the block reader (every row once per epoch, mixed across shards, seeded, resumable, read ahead)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from featcircuits.training import shard_writer
from featcircuits.training.cache import CacheSource, read_manifest, write_cache

ROWS = 50  # rows per chunk ("sequence") of the stand-in source
HOOKS = {"a": 4, "b": 4}


class SequenceSource:
    """A model stand-in whose chunk ``p`` depends on ``p`` alone (as a resumed model forward does): column 0
    of ``a`` holds ``p``, column 1 the row within the chunk; ``b = 2 a + 1`` pairs the hooks row by row."""

    def __init__(self, delay: float = 0.0) -> None:
        self.position, self.delay = 0, delay

    def next_chunk(self) -> dict[str, torch.Tensor]:
        if self.delay:
            time.sleep(self.delay)
        a = torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(self.position))
        a[:, 0], a[:, 1] = float(self.position), torch.arange(ROWS, dtype=torch.float32)
        self.position += 1
        return {"a": a, "b": 2 * a + 1}


def all_rows(n_sequences: int) -> torch.Tensor:
    source = SequenceSource()
    return torch.cat([source.next_chunk()["a"] for _ in range(n_sequences)])


def cached_rows(path, hook="a") -> torch.Tensor:
    """The cache's rows in shard order, read by the safetensors library (an independent reader)."""
    manifest = read_manifest(path)
    return torch.cat([load_file(str(path / shard["file"]))[hook] for shard in manifest["shards"]])


def sorted_rows(rows: torch.Tensor) -> torch.Tensor:
    key = rows[:, 0] * 1000 + rows[:, 1]  # (sequence, row) identifies a row
    return rows[key.argsort()]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shards_are_safetensors_holding_the_source_rows_in_order(tmp_path, dtype):
    manifest = write_cache(SequenceSource(), tmp_path, ["a", "b"], HOOKS, 9, dtype=dtype, rows_per_shard=120)
    assert [shard["rows"] for shard in manifest["shards"]] == [150, 150, 150]  # whole sequences per shard
    assert manifest["complete"] and manifest["writer"]["bytes"] > 9 * ROWS * 8 * (2 if dtype == "bfloat16" else 4)
    expected = all_rows(9).to(getattr(torch, dtype))
    assert torch.equal(cached_rows(tmp_path), expected)
    assert torch.equal(cached_rows(tmp_path, "b"), (2 * all_rows(9) + 1).to(getattr(torch, dtype)))
    source = CacheSource(tmp_path, ["a"], block_rows=40, chunk_rows=120)
    served = take(source, source.total_rows)["a"]  # one epoch, served as float32 for training
    assert served.dtype == torch.float32 and torch.equal(sorted_rows(served), sorted_rows(expected.float()))


def test_the_model_runs_ahead_of_a_slow_disk_but_only_max_queued_shards_ahead(tmp_path, monkeypatch):
    gate, real_write = threading.Event(), shard_writer.write_shard

    def held_write(path, parts):
        gate.wait()  # the disk is stuck until the test opens the gate
        return real_write(path, parts)

    monkeypatch.setattr(shard_writer, "write_shard", held_write)
    source = SequenceSource()
    run = threading.Thread(target=write_cache, args=(source, tmp_path, ["a", "b"], HOOKS, 20),
                           kwargs={"rows_per_shard": ROWS, "max_queued": 2})
    run.start()
    # One shard in the writer's hands, two queued, one being handed over: the model ran 4 chunks with no
    # shard written yet, and then waits (bounded memory) rather than filling more.
    deadline = time.monotonic() + 30
    while source.position < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    assert source.position == 4 and not (tmp_path / "shard_00000.safetensors").exists()
    gate.set()
    run.join(30)
    assert read_manifest(tmp_path)["complete"] and torch.equal(cached_rows(tmp_path), all_rows(20))


def test_a_writer_failure_is_raised_naming_the_shard_and_the_rerun_resumes(tmp_path, monkeypatch):
    real_write = shard_writer.write_shard

    def disk_full_on_third(path, parts):
        if path.name == "shard_00002.safetensors":
            raise OSError(28, "No space left on device")
        return real_write(path, parts)

    monkeypatch.setattr(shard_writer, "write_shard", disk_full_on_third)
    with pytest.raises(OSError, match=r"shard_00002.safetensors failed .*No space left.*The 2 complete shards "
                                      r"before it stay listed.*rerun the same command to resume"):
        write_cache(SequenceSource(), tmp_path, ["a", "b"], HOOKS, 12, rows_per_shard=100)
    manifest = read_manifest(tmp_path)
    assert [shard["file"] for shard in manifest["shards"]] == ["shard_00000.safetensors", "shard_00001.safetensors"]
    assert manifest["sequences_done"] == 4 and not manifest["complete"]
    monkeypatch.setattr(shard_writer, "write_shard", real_write)
    source = SequenceSource()
    write_cache(source, tmp_path, ["a", "b"], HOOKS, 12, rows_per_shard=100)
    assert torch.equal(cached_rows(tmp_path), all_rows(12))


def test_a_model_failure_keeps_the_shards_already_handed_to_the_writer(tmp_path):
    class FailingSource(SequenceSource):
        def next_chunk(self):
            if self.position == 7:
                raise ValueError("the model broke")
            return super().next_chunk()

    with pytest.raises(ValueError, match="the model broke"):
        write_cache(FailingSource(), tmp_path, ["a", "b"], HOOKS, 12, rows_per_shard=100)
    assert read_manifest(tmp_path)["sequences_done"] == 6  # three shards of two sequences, all written


_KILLED_RUN = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from test_cache_shards import SequenceSource, HOOKS
from featcircuits.training.cache import write_cache
write_cache(SequenceSource(delay=0.05), {out!r}, ["a", "b"], HOOKS, 60, rows_per_shard=100)
"""


def test_a_cache_run_killed_mid_write_resumes_to_the_uninterrupted_cache(tmp_path):
    out = tmp_path / "cache"
    code = _KILLED_RUN.format(tests=os.path.dirname(__file__), out=str(out))
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert process.poll() is None, "the cache run ended before it could be killed"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    partial = read_manifest(out)
    assert not partial["complete"] and 3 <= len(partial["shards"]) < 30
    (out / ".shard_00029.safetensors.left-by-a-kill.tmp").write_bytes(b"partial")
    write_cache(SequenceSource(), out, ["a", "b"], HOOKS, 60, rows_per_shard=100)
    assert torch.equal(cached_rows(out), all_rows(60))
    assert not list(out.glob(".*.tmp"))  # the resumed run swept what the killed one left


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    write_cache(SequenceSource(), path, ["a", "b"], HOOKS, 24, rows_per_shard=150)  # 8 shards of 150 rows
    return path


def take(source: CacheSource, n_rows: int) -> dict[str, torch.Tensor]:
    parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in source.hooks}
    while sum(len(part) for part in parts["a"]) < n_rows:
        for hook, rows in source.next_chunk().items():
            parts[hook].append(rows)
    return {hook: torch.cat(rows)[:n_rows] for hook, rows in parts.items()}


def test_an_epoch_serves_every_row_once_paired_and_mixed_across_shards(cache_dir):
    source = CacheSource(cache_dir, ["a", "b"], seed=3, block_rows=25, chunk_rows=100)
    first = source.next_chunk()
    assert len(first["a"]) == 100  # a chunk is the requested size, not a shard
    shards_in_chunk = (first["a"][:, 0] // 3).unique()  # three sequences per shard
    assert len(shards_in_chunk) >= 3
    rest = take(source, 1200 - 100)
    epoch = {hook: torch.cat([first[hook], rest[hook]]) for hook in first}
    assert source.state_dict()["epoch"] == 0 and source.state_dict()["position"] == 48  # 1200 rows / 25
    assert torch.equal(sorted_rows(epoch["a"]), sorted_rows(cached_rows(cache_dir)))
    assert torch.equal(epoch["b"], 2 * epoch["a"] + 1)  # the hooks stay paired row by row
    assert not torch.equal(epoch["a"], cached_rows(cache_dir))  # shuffled
    second = take(source, 1200)["a"]
    assert torch.equal(sorted_rows(second), sorted_rows(epoch["a"])) and not torch.equal(second, epoch["a"])


def test_the_stream_is_seeded_the_same_with_or_without_read_ahead_or_parallel_reads_and_resumes_exactly(cache_dir):
    def stream(seed, read_ahead, io_threads=4):
        return take(CacheSource(cache_dir, ["a"], seed=seed, block_rows=25, chunk_rows=100, read_ahead=read_ahead,
                                io_threads=io_threads), 3000)["a"]

    reference = stream(0, 2)
    assert torch.equal(stream(0, 0, io_threads=1), reference) and not torch.equal(stream(1, 2), reference)
    first = CacheSource(cache_dir, ["a"], seed=0, block_rows=25, chunk_rows=100)
    head = take(first, 1700)["a"]  # into the second epoch, with chunks read ahead beyond it
    resumed = CacheSource(cache_dir, ["a"], seed=0, block_rows=25, chunk_rows=100)
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(torch.cat([head, take(resumed, 1300)["a"]]), reference)
    with pytest.raises(ValueError, match="blocks of 25 rows, 4 per chunk, but this reader uses 50"):
        CacheSource(cache_dir, ["a"], block_rows=50, chunk_rows=100).load_state_dict(first.state_dict())


def test_a_truncated_or_missing_shard_is_named(cache_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(cache_dir, broken)
    shard = broken / "shard_00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    source = CacheSource(broken, ["a"], block_rows=150, chunk_rows=1200)
    for _ in range(2):  # asked again after the failure: the same error, not a wait on a reader that stopped
        with pytest.raises(ValueError, match=r"shard_00003.safetensors is unreadable \(truncated"):
            take(source, 1200)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard_00003.safetensors listed in the manifest is missing"):
        take(CacheSource(broken, ["a"], block_rows=150, chunk_rows=1200, read_ahead=0), 1200)
    with pytest.raises(ValueError, match="must be positive"):
        CacheSource(cache_dir, ["a"], block_rows=0)


def test_a_chunk_keeps_its_size_whatever_the_shard_size(tmp_path):
    write_cache(SequenceSource(), tmp_path, ["a", "b"], HOOKS, 40, rows_per_shard=10_000)  # one 2000-row shard
    source = CacheSource(tmp_path, ["a", "b"], chunk_rows=512)
    assert source.block_rows == 512 and sorted(len(source.next_chunk()["a"]) for _ in range(4)) == [464, 512, 512, 512]
    assert CacheSource(tmp_path, ["a", "b"]).block_rows == 2**20 // 16  # 1 MiB runs of 16-byte rows


def test_the_cache_command_reports_a_full_disk_in_one_line_and_a_rerun_completes(tmp_path, monkeypatch, capsys):
    from conftest import STORIES260K, TINYSTORIES

    from featcircuits.cli import main as cli_main

    real_write = shard_writer.write_shard

    def disk_full_on_second(path, parts):
        if path.name == "shard_00001.safetensors":
            raise OSError(28, "No space left on device")
        return real_write(path, parts)

    args = ["cache", "--model", str(STORIES260K), "--hook", "blocks.0.hook_resid_post", "--dataset",
            str(TINYSTORIES / "valid_head.txt"), "--out", str(tmp_path / "cache"), "--tokens", "4096",
            "--context-size", "64", "--rows-per-shard", "1000", "--model-batch-size", "8"]
    monkeypatch.setattr(shard_writer, "write_shard", disk_full_on_second)
    assert cli_main(args) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "featcircuits cache: error: Writing activation cache shard" in error
    assert "shard_00001.safetensors failed" in error and "No space left on device" in error
    first = (tmp_path / "cache" / "shard_00000.safetensors").stat().st_ino
    monkeypatch.setattr(shard_writer, "write_shard", real_write)
    assert cli_main(args) == 0
    assert "cached 4032 rows" in capsys.readouterr().out  # 64 rows of 63 tokens (BOS dropped)
    assert (tmp_path / "cache" / "shard_00000.safetensors").stat().st_ino == first  # kept, not written again
