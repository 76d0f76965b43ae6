"""Run directories: one run at a time per --out (a lock), no silent overwrite of a finished run, no stale
dictionary after --overwrite, an unwritable --out refused before training, and resume refusing changed settings."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from conftest import STORIES260K, TINYSTORIES, unprivileged

from featcircuits._paths import LOCK_NAME, RunLock
from featcircuits.cli import main
from featcircuits.training import TrainConfig, apply_overrides

HOOK_A, HOOK_B = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text((TINYSTORIES / "train_head.txt").read_text()[:20_000])
    return path


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _train(text, out, hook=HOOK_A, *extra: str) -> list[str]:
    return ["train", "--model", str(STORIES260K), "--hook", hook, "--architecture", "topk", "--k", "4",
            "--d-sae", "32", "--tokens", "1024", "--batch-size", "256", "--dataset", str(text), "--out", str(out),
            "--no-progress", "--set", "context_size=32", "--set", "eval_sequences=2", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_a_second_run_into_a_locked_out_is_refused_naming_lock_and_pid(text, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK_NAME).write_text(f"{other.pid} {os.uname().nodename}\n")
        assert main(_train(text, out)) == 2
        err = _error(capsys)
        assert f"pid {other.pid}" in err and str(out / LOCK_NAME) in err and "in use by another featcircuits run" in err
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing trained, the lock left alone
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_exclusive_and_a_dead_owners_lock_is_taken_over(tmp_path):
    with RunLock(tmp_path), pytest.raises(ValueError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_NAME).exists()  # released
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(f"{dead.pid} {os.uname().nodename}\n")
    with pytest.warns(UserWarning, match="taking over the lock"), RunLock(tmp_path) as lock:
        assert lock.path.read_text().split()[0] == str(os.getpid())


def test_finished_run_is_refused_and_overwrite_removes_the_stale_dictionary(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(text, out, HOOK_A)) == 0
    assert (out / HOOK_A / "cfg.json").is_file() and not (out / LOCK_NAME).exists()
    before = (out / HOOK_A / "cfg.json").read_bytes()
    capsys.readouterr()
    assert main(_train(text, out, HOOK_B)) == 2  # another hook into the same --out: refused, nothing changed
    err = _error(capsys)
    assert "already holds a finished run" in err and "--overwrite" in err
    assert (out / HOOK_A / "cfg.json").read_bytes() == before and not (out / HOOK_B).exists()
    assert main(_train(text, out, HOOK_B, "--overwrite")) == 0
    assert (out / HOOK_B / "cfg.json").is_file()
    assert not (out / HOOK_A).exists()  # the stale dictionary (which push would publish) is gone


def test_an_unwritable_out_is_refused_before_the_model_loads(text, tmp_path, capsys):
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    tmp_path.chmod(0o755)
    started = time.perf_counter()
    try:
        with unprivileged():
            code = main(_train(text, readonly / "run"))
    finally:
        readonly.chmod(0o755)
    assert code == 2 and time.perf_counter() - started < 3
    err = _error(capsys)
    assert str(readonly / "run") in err and "choose a writable location" in err
    assert list(readonly.iterdir()) == []


def test_out_that_is_a_file_is_refused(text, tmp_path, capsys):
    out = tmp_path / "run"
    out.write_text("keep me")
    assert main(_train(text, out)) == 2
    assert "is a file, but a directory is needed" in _error(capsys) and out.read_text() == "keep me"


@pytest.mark.parametrize("override", ["lr_decay_fraction=0.9", "drop_special_tokens=false", "lr_warmup_steps=3",
                                      "init_scale=0.2", "buffer_bytes=1000000"])
def test_resume_refuses_every_setting_that_changes_the_result(override):
    config = TrainConfig(hooks=[HOOK_A], dataset="x", out="o")
    changed = apply_overrides(config, [override])
    key, value = override.split("=")
    saved, now = config.resume_fingerprint(), changed.resume_fingerprint()
    assert saved[key] != now[key] and [k for k in saved if saved[k] != now[k]] == [key]


def test_resume_allows_settings_that_do_not_change_the_result():
    config = TrainConfig(hooks=[HOOK_A], dataset="x", out="o")
    other = apply_overrides(config, ["out=elsewhere", "progress=false", "log_every=7", "wandb=true",
                                     "checkpoint_every=3", "eval_every=2", "resume=true"])
    assert other.resume_fingerprint() == config.resume_fingerprint()


def test_resume_with_a_changed_setting_is_refused_through_the_cli(text, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train(text, out, HOOK_A, "--checkpoint-every", "2")) == 0
    capsys.readouterr()
    assert main(_train(text, out, HOOK_A, "--resume", "--set", "lr_decay_fraction=0.9")) == 2
    err = _error(capsys)
    assert "lr_decay_fraction: checkpoint 0.2 vs now 0.9" in err


@pytest.mark.parametrize(("data", "fragment"), [
    ({"normalize_activations": "false"}, None),
    ({"normalize_activations": "maybe"}, "normalize_activations='maybe' is not a boolean"),
    ({"lr": True}, "lr=True is not a number"),
    ({"batch_size": 256.7}, "batch_size=256.7 is not an integer"),
    ({"k": "eight"}, "k='eight' is not an integer"),
    ({"hooks": 3}, "hooks=3 is not a list"),
])
def test_config_values_are_checked_strictly(data, fragment):
    if fragment is None:
        assert TrainConfig.from_dict(data, source="run.yaml").normalize_activations is False
    else:
        with pytest.raises(ValueError, match=f"run.yaml: {fragment}"):
            TrainConfig.from_dict(data, source="run.yaml")


def test_a_cache_rerun_with_another_size_is_refused_and_the_same_size_says_reused(stories_path, tmp_path, capsys):
    from conftest import TINYSTORIES

    from featcircuits.cli import main

    args = ["cache", "--model", str(stories_path), "--hook", "blocks.1.ln2.hook_normalized",
            "--dataset", str(TINYSTORIES / "train_head.txt"), "--out", str(tmp_path / "cache")]
    assert main([*args, "--tokens", "2048"]) == 0
    first = capsys.readouterr().out
    manifest = (tmp_path / "cache" / "manifest.json").read_bytes()
    assert main([*args, "--tokens", "2048"]) == 0
    assert "cached " in first and "reused the cache of" in capsys.readouterr().out
    assert main([*args, "--tokens", "1024"]) == 2
    error = capsys.readouterr().err
    import json
    import re

    total = json.loads(manifest)["total_sequences"]
    sizes = re.search(r"complete cache of (\d+) sequences, but this run asks for (\d+)", error)
    assert sizes and int(sizes.group(1)) == total and int(sizes.group(2)) == total // 2
    assert (tmp_path / "cache" / "manifest.json").read_bytes() == manifest  # nothing rewritten
