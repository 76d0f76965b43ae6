"""featcircuits.data: every dataset form streams into packed rows; bad input is named; a streamed run resumes exactly.

The Hugging Face path is exercised through a local dataset *repository directory* (``data/train-00000-of-00001
.parquet``, ``data/validation-...``): ``datasets.load_dataset(folder, split=..., streaming=True)`` is the very call
a Hub id goes through (the id then resolves to the Hub cache instead of a folder).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import STORIES260K, TINYSTORIES

from featcircuits.cli import main as cli_main
from featcircuits.data import TokenRows, open_documents
from featcircuits.data.records import HubDataset
from featcircuits.dictionaries import load_dictionary
from featcircuits.training import TrainConfig, run_training
from featcircuits.training.cache import read_manifest

HOOK_IN, HOOK_OUT = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES260K))


def _stories(n_chars: int = 60_000) -> list[str]:
    text = (TINYSTORIES / "train_head.txt").read_text()[:n_chars]
    return [story.strip() for story in text.split("\n\n") if story.strip()]


def _rows(dataset, tokenizer, context_size=32, n=10_000, **options) -> torch.Tensor:
    return TokenRows(open_documents(dataset, **options), tokenizer, context_size, repeat=False).next_rows(n)


def _config(dataset, out, **overrides) -> TrainConfig:
    fields = dict(model=str(STORIES260K), hooks=[HOOK_IN], hooks_out=[HOOK_OUT], dataset=str(dataset), out=str(out),
                  d_sae=64, k=4, total_tokens=1024, batch_size=256, context_size=32, eval_sequences=2,
                  progress=False, device="cpu")
    fields.update(overrides)
    return TrainConfig(**fields)


# -- every form gives the same packed rows --------------------------------------------------------


def test_text_jsonl_parquet_arrow_and_repository_give_packed_bos_rows(tokenizer, tmp_path):
    stories = _stories()
    (tmp_path / "text.txt").write_text("\n\n".join(stories))
    (tmp_path / "dir" / "sub").mkdir(parents=True)
    half = len(stories) // 2
    (tmp_path / "dir" / "a.txt").write_text("\n\n".join(stories[:half]))
    (tmp_path / "dir" / "sub" / "b.txt").write_text("\n\n".join(stories[half:]))
    with open(tmp_path / "data.jsonl", "w") as handle:
        for story in stories:
            handle.write(json.dumps({"text": story, "id": 1}) + "\n")
    table = pa.table({"story": stories})
    pq.write_table(table, tmp_path / "data.parquet")
    with pa.ipc.new_stream(tmp_path / "data.arrow", table.schema) as writer:
        writer.write_table(table)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": stories}), repo / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.table({"text": stories[:3]}), repo / "data" / "validation-00000-of-00001.parquet")

    reference = _rows(tmp_path / "text.txt", tokenizer)
    bos = tokenizer.bos_token_id
    assert reference.shape[1] == 32 and len(reference) > 100 and (reference[:, 0] == bos).all()
    # records are documents: the same stream of tokens as the text up to the separators between stories
    for dataset, options in [(tmp_path / "dir", {}), (tmp_path / "data.jsonl", {}),
                             (tmp_path / "data.parquet", {"text_column": "story"}),
                             (tmp_path / "data.arrow", {"text_column": "story"}), (repo, {})]:
        rows = _rows(dataset, tokenizer, **options)
        assert rows.shape[1] == 32 and (rows[:, 0] == bos).all(), dataset
        assert abs(len(rows) - len(reference)) <= 0.05 * len(reference), dataset
    assert isinstance(open_documents(repo), HubDataset)
    assert len(_rows(repo, tokenizer, split="validation")) < 20  # the split is honoured


def test_pretokenized_rows_are_kept_and_short_rows_packed_with_a_warning(tokenizer, tmp_path):
    text_rows = _rows(TINYSTORIES / "valid_head.txt", tokenizer, context_size=32, n=40)
    pq.write_table(pa.table({"input_ids": text_rows.tolist()}), tmp_path / "packed.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rows of exactly context_size: no warning
        assert torch.equal(_rows(tmp_path / "packed.parquet", tokenizer, context_size=32), text_rows)
    pq.write_table(pa.table({"tokens": text_rows[:, :16].tolist()}), tmp_path / "short.parquet")
    with pytest.warns(UserWarning, match="rows of 16 ids are shorter than context_size=32.*packed together"):
        short = _rows(tmp_path / "short.parquet", tokenizer, context_size=32)
    assert torch.equal(short[:, 1:].reshape(-1)[:15 * 4], text_rows[:, 1:16].reshape(-1)[:15 * 4])


def test_reading_stops_at_the_rows_asked_for(tokenizer, tmp_path):
    big = tmp_path / "big.txt"
    story = (TINYSTORIES / "train_head.txt").read_text()
    with open(big, "w") as handle:
        for _ in range(40):  # ~8 MB
            handle.write(story + "\n\n")
    rows = TokenRows(open_documents(big), tokenizer, 128, repeat=False)
    started = time.perf_counter()
    assert rows.next_rows(160).shape == (160, 128)
    assert time.perf_counter() - started < 2.0
    assert rows.documents_done <= 8  # a few 64 kB pieces, not the file


def test_epochs_reopen_the_stream_and_resume_mid_epoch(tokenizer, tmp_path):
    documents = open_documents(TINYSTORIES / "valid_head.txt")
    one_epoch = TokenRows(documents, tokenizer, 32, repeat=False).next_rows(10_000)
    stream = TokenRows(documents, tokenizer, 32, skip_rows=2)
    first = stream.next_rows(len(one_epoch) - 2 + 5)
    assert torch.equal(first[: len(one_epoch) - 2], one_epoch[2:]) and stream.epoch == 1
    assert torch.equal(first[len(one_epoch) - 2 :], one_epoch[2:7])  # the held-out rows are skipped every epoch
    state = stream.state_dict()
    expected = stream.next_rows(30)
    resumed = TokenRows(documents, tokenizer, 32, skip_rows=2)
    resumed.load_state_dict(torch.load(_save(state, tmp_path), weights_only=True))
    assert torch.equal(resumed.next_rows(30), expected)


def _save(state, tmp_path):
    torch.save(state, tmp_path / "state.pt")
    return tmp_path / "state.pt"


# -- bad input ----------------------------------------------------------------------------------


def test_dataset_id_missing_from_the_offline_cache_says_how_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"not in the local cache.*huggingface-cli download --repo-type dataset "
                                         r"nobody/no-such-dataset"):
        open_documents("nobody/no-such-dataset")


def test_missing_column_lists_the_columns(tmp_path):
    with open(tmp_path / "data.jsonl", "w") as handle:
        handle.write(json.dumps({"body": "Once upon a time.", "label": 3}) + "\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*columns are \['body', 'label'\].*--text-column"):
        open_documents(tmp_path / "data.jsonl")
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    pq.write_table(pa.table({"body": ["Once upon a time."]}), repo / "train-00000-of-00001.parquet")
    with pytest.raises(ValueError, match=r"no column 'content'.*\['body'\]"):
        open_documents(tmp_path / "repo", text_column="content")


def test_token_ids_outside_the_vocabulary_are_refused(tokenizer, tmp_path):
    pq.write_table(pa.table({"input_ids": [[1, 5, 7] * 20, [1, 900, 3] * 20]}), tmp_path / "gpt2.parquet")
    rows = TokenRows(open_documents(tmp_path / "gpt2.parquet"), tokenizer, 16, vocab_size=512)
    with pytest.raises(ValueError, match=r"document 1 holds token id 900, outside the model's vocabulary of 512"):
        rows.next_rows(100)


def test_binary_and_non_utf8_text(tokenizer, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01\x02" * 1000)
    with pytest.raises(ValueError, match="binary"):
        open_documents(tmp_path / "weights.bin")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes(("Once upon a time, caf\xe9 and na\xefve. " * 100).encode("latin-1"))
    with pytest.warns(UserWarning, match=r"200 byte sequence\(s\) are not valid UTF-8"):
        _rows(latin, tokenizer)


def test_directory_without_text_files_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"holds no text files.*\['.safetensors'\]"):
        open_documents(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_documents(tmp_path / "missing.jsonl")


def test_stream_too_short_without_epochs_names_the_tokens_available(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("\n\n".join(_stories(6_000)))
    with pytest.raises(ValueError, match=r"ended after \d+ usable tokens \(\d+ rows of context_size=32\), but the run "
                                         r"trains on 40960 tokens and repeat_dataset is off"):
        run_training(_config(text, tmp_path / "out", total_tokens=40960, repeat_dataset=False))
    result = run_training(_config(text, tmp_path / "epochs", total_tokens=4096))
    assert result["steps"] == 16
    assert "4096 tokens from a dataset of" in capsys.readouterr().out


def test_cache_refuses_a_non_positive_model_batch_size(tmp_path, capsys):
    for value in ("0", "-3"):
        with pytest.raises(SystemExit):
            cli_main(["cache", "--model", str(STORIES260K), "--hook", HOOK_IN, "--dataset",
                      str(TINYSTORIES / "valid_head.txt"), "--out", str(tmp_path / "c"), "--model-batch-size", value])
        assert f"--model-batch-size: must be a positive integer, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="model_batch_size"):
        TrainConfig(hooks=[HOOK_IN], dataset="x", model_batch_size=0).validate()


def test_cache_from_jsonl_holds_out_rows_for_the_evaluation(tmp_path):
    with open(tmp_path / "data.jsonl", "w") as handle:
        for story in _stories(20_000):
            handle.write(json.dumps({"text": story}) + "\n")
    code = cli_main(["cache", "--model", str(STORIES260K), "--hook", HOOK_IN, "--hook", HOOK_OUT, "--dataset",
                     str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "cache"), "--context-size", "32",
                     "--eval-sequences", "4", "--rows-per-shard", "500"])
    assert code == 0
    manifest = read_manifest(tmp_path / "cache")
    assert manifest["complete"] and manifest["held_out_sequences"] == 4 and len(manifest["shards"]) > 1
    result = run_training(_config(tmp_path / "cache", tmp_path / "out", eval_sequences=4))
    assert result["per_dictionary"][HOOK_IN]["ce_loss_recovered"] is not None


# -- exact resume of a streamed run ----------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_sigkill_then_resume_of_a_streamed_jsonl_run_matches_uninterrupted(tmp_path):
    dataset = tmp_path / "stories.jsonl"
    with open(dataset, "w") as handle:
        for story in _stories(120_000):
            handle.write(json.dumps({"text": story}) + "\n")
    # ~30k tokens of text for 41k training tokens: the run crosses an epoch boundary too
    overrides = dict(total_tokens=256 * 160, context_size=64, checkpoint_every=10, log_every=10, lr=3e-3, d_sae=128,
                     k=8, buffer_bytes=2048 * 128 * 4, dead_after_tokens=2000, eval_sequences=2, model_batch_size=8)
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(_config(dataset, tmp_path / "interrupted", **overrides).to_dict()))
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(_config(dataset, tmp_path / "uninterrupted", **overrides))
    finally:
        torch.set_num_threads(previous)

    checkpoint = tmp_path / "interrupted" / "checkpoint" / "rank0.pt"
    command = [sys.executable, "-m", "featcircuits.cli", "train", str(config_path)]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "the run ended before writing a checkpoint"
    assert not (tmp_path / "interrupted" / "metrics.json").exists(), "the run finished before it was killed"
    state = torch.load(checkpoint, weights_only=True)
    assert 0 < state["step"] < 160 and state["store"]["source"]["rows"]["rows_done"] > 0

    resumed = subprocess.run([*command, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reference = load_dictionary(tmp_path / "uninterrupted" / HOOK_IN)
    result = load_dictionary(tmp_path / "interrupted" / HOOK_IN)
    for param in ("W_enc", "b_enc", "W_dec", "b_dec"):
        difference = (getattr(reference, param) - getattr(result, param)).abs().max().item()
        assert difference <= 1e-6, (param, difference)
