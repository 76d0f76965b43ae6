"""Bad input and faults through every command, in-process: exit status 2, one line on stderr that starts with
``featcircuits <command>: error:`` and names the problem, no traceback, and nothing written earlier changed."""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import STORIES260K, TINYSTORIES, unprivileged

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.cli import main

HOOK_IN, HOOK_OUT = "blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"
PAIR = {"clean": "Once upon a time, there was a boy named Lily. He had a big red ball. Every day,",
        "corrupt": "Once upon a time, there was a boy named Tim. He had a big red ball. Every day,",
        "answer": "Lily", "distractor": "Tim"}


def _dictionaries(folder: Path, d_in: int) -> Path:
    torch.manual_seed(0)
    cfg = DictionaryConfig(d_in=d_in, d_sae=16, kind="transcoder", activation="relu", hook_in=HOOK_IN,
                           hook_out=HOOK_OUT)
    Dictionary.from_config(cfg).save(str(folder / HOOK_IN))
    return folder


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adversarial")
    base = tmp_path_factory.getbasetemp()
    modes = {folder: folder.stat().st_mode & 0o777 for folder in (base.parent, base, root)}
    for folder in modes:  # the read-only rows run as nobody when the tests run as root: let it reach root
        folder.chmod(0o755)
    dicts = _dictionaries(root / "dicts", 64)
    other = _dictionaries(root / "other_model_dicts", 32)  # d_model 32: a dictionary for another model
    truncated = root / "truncated"
    shutil.copytree(dicts, truncated)
    weights = truncated / HOOK_IN / "dictionary.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    earlier = root / "earlier"  # an output location holding an earlier run's files
    earlier.mkdir()
    (earlier / "keep.txt").write_text("earlier results")
    (root / "a_file.json").write_text('{"earlier": true}')
    readonly = root / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    tasks = {
        "task": [PAIR],
        "unequal": [{**PAIR, "corrupt": "Once upon a time, there was a boy named Tim."}],
        "bool_answer": [{**PAIR, "answer": True}],
        "out_of_vocab": [{"clean": [1, 5, 9999], "corrupt": [1, 5, 7], "answer": 3, "distractor": 4}],
        "too_long": [{"clean": [1] * 600, "corrupt": [2] * 600, "answer": 3, "distractor": 4}],
    }
    for name, pairs in tasks.items():
        (root / f"{name}.json").write_text(json.dumps(pairs))
    (root / "lr_yes.yaml").write_text(f"hooks: [{HOOK_IN}]\nmodel: {STORIES260K}\ndataset: x\nlr: yes\n")
    (root / "empty_dir").mkdir()
    yield {"root": str(root), "model": str(STORIES260K), "dicts": str(dicts), "other": str(other),
           "truncated": str(truncated), "earlier": str(earlier), "file": str(root / "a_file.json"),
           "readonly": str(readonly), "text": str(TINYSTORIES / "train_head.txt"), "missing": str(root / "missing"),
           "empty_dir": str(root / "empty_dir"), **{name: str(root / f"{name}.json") for name in tasks},
           "lr_yes": str(root / "lr_yes.yaml")}
    readonly.chmod(0o755)
    for folder, mode in modes.items():
        folder.chmod(mode)


def _snapshot(root: str) -> dict[str, str]:
    files = {}
    for path in Path(root).rglob("*"):
        with contextlib.suppress(PermissionError):
            if path.is_file():
                files[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


TRAIN = ["train", "--model", "{model}", "--hook", HOOK_IN, "--dataset", "{text}", "--tokens", "1024",
         "--batch-size", "256", "--no-progress", "--set", "context_size=32"]
CACHE = ["cache", "--model", "{model}", "--hook", HOOK_IN, "--dataset", "{text}", "--tokens", "64"]
GRAPH = ["graph", "--model", "{model}", "--prompt", "Once upon a time"]
CIRCUIT = ["circuit", "--model", "{model}", "--method", "atp"]
STEER = ["steer", "--model", "{model}", "--dictionaries", "{dicts}", "--prompt", "Once upon"]
RO = "readonly"  # rows that need an unwritable location

ROWS = [
    # train
    ("train-wrong-hook", ["train", "--model", "{model}", "--hook", "blocks.0.hook_nonsense", "--dataset", "{text}",
                          "--tokens", "1024", "--batch-size", "256", "--out", "{root}/t1"], "blocks.0.hook_nonsense"),
    ("train-missing-dataset", [*TRAIN[:5], "--dataset", "{missing}", "--out", "{root}/t2"], "missing"),
    ("train-lr-zero", [*TRAIN, "--lr", "0", "--out", "{root}/t3"], "trains nothing"),
    ("train-lr-nan", [*TRAIN, "--lr", "nan", "--out", "{root}/t3"], "trains nothing"),
    ("train-lr-not-a-number", [*TRAIN, "--lr", "abc", "--out", "{root}/t3"], "invalid float value: 'abc'"),
    ("train-lr-negative", [*TRAIN, "--lr", "-0.001", "--out", "{root}/t3"], "trains nothing"),
    ("train-batch-size-fraction", [*TRAIN, "--set", "batch_size=256.7", "--out", "{root}/t3"],
     "batch_size=256.7 is not an integer"),
    ("train-bool-maybe", [*TRAIN, "--set", "normalize_activations=maybe", "--out", "{root}/t3"],
     "normalize_activations='maybe' is not a boolean"),
    ("train-unknown-field", [*TRAIN, "--set", "learning_rate=1", "--out", "{root}/t3"], "no field 'learning_rate'"),
    ("train-set-without-equals", [*TRAIN, "--set", "lr", "--out", "{root}/t3"], "expected key=value"),
    ("train-unknown-architecture", [*TRAIN, "--architecture", "gated", "--out", "{root}/t3"], "invalid choice: 'gated'"),
    ("train-negative-tokens", [*TRAIN, "--tokens", "-5", "--out", "{root}/t3"], "total_tokens must be positive"),
    ("train-out-is-a-file", [*TRAIN, "--out", "{file}"], "is a file, but a directory is needed"),
    ("train-out-read-only", [*TRAIN, "--out", "{readonly}/run"], "choose a writable location", RO),
    ("train-finished-run", [*TRAIN, "--out", "{earlier}"], None),  # filled in below (needs a finished run)
    ("train-resume-no-checkpoint", [*TRAIN, "--resume", "--out", "{earlier}"], "no checkpoint"),
    ("train-resume-and-overwrite", [*TRAIN, "--resume", "--overwrite", "--out", "{root}/t4"], "exclude each other"),
    ("train-missing-config", ["train", "{missing}.yaml"], "No training config"),
    ("train-config-lr-yes", ["train", "{lr_yes}"], "lr=True is not a number"),
    # cache
    ("cache-missing-model", ["cache", "--model", "{missing}", "--hook", HOOK_IN, "--dataset", "{text}", "--out",
                             "{root}/c1"], "missing"),
    ("cache-zero-model-batch", [*CACHE, "--out", "{root}/c1", "--model-batch-size", "0"], "must be a positive integer"),
    ("cache-negative-tokens", [*CACHE, "--out", "{root}/c1", "--tokens", "-5"], "must be zero or a positive integer"),
    ("cache-out-is-a-file", [*CACHE, "--out", "{file}"], "is a file, but a directory is needed"),
    ("cache-out-read-only", [*CACHE, "--out", "{readonly}/cache"], "choose a writable location", RO),
    ("cache-wrong-hook", ["cache", "--model", "{model}", "--hook", "blocks.9.hook_resid_post", "--dataset", "{text}",
                          "--out", "{root}/c2", "--tokens", "64"], "blocks.9.hook_resid_post"),
    # graph
    ("graph-missing-dictionaries", [*GRAPH, "--dictionaries", "{missing}", "--out", "{root}/g.json"], "missing"),
    ("graph-truncated-safetensors", [*GRAPH, "--dictionaries", "{truncated}", "--out", "{root}/g.json"],
     "dictionary.safetensors"),
    ("graph-dictionary-for-another-model", [*GRAPH, "--dictionaries", "{other}", "--out", "{root}/g.json"], "32"),
    ("graph-negative-verify", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{root}/g.json", "--verify", "-5"],
     "--verify: must be zero or a positive integer, got -5"),
    ("graph-threshold-above-one", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{root}/g.json",
                                   "--node-threshold", "1.5"], "must lie in [0, 1]"),
    ("graph-budget-nan", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{root}/g.json", "--memory-budget-gb", "nan"],
     "must be a finite number"),
    ("graph-out-is-a-directory", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{earlier}"],
     "is a directory, but a file is needed"),
    ("graph-out-read-only", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{readonly}/g.json"], "choose a writable location", RO),
    ("graph-out-under-a-file", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{file}/g.json"], "is a file"),
    ("graph-target-outside-vocab", [*GRAPH, "--dictionaries", "{dicts}", "--out", "{root}/g.json", "--target",
                                    "99999"], "--target 99999 is outside the model's vocabulary"),
    ("graph-prompt-too-long", ["graph", "--model", "{model}", "--prompt", "Once upon a time " * 200,
                               "--dictionaries", "{dicts}", "--out", "{root}/g.json"], "the model's context is 512"),
    ("graph-dictionaries-is-a-file", [*GRAPH, "--dictionaries", "{file}", "--out", "{root}/g.json"], "a_file.json"),
    # circuit
    ("circuit-negative-top-k", [*CIRCUIT, "--task", "{task}", "--out", "{root}/c.json", "--top-k", "-3"],
     "--top-k: must be a positive integer, got -3"),
    ("circuit-unknown-method", ["circuit", "--model", "{model}", "--method", "eap", "--task", "{task}", "--out",
                                "{root}/c.json"], "invalid choice: 'eap'"),
    ("circuit-unknown-ablation", [*CIRCUIT, "--task", "{task}", "--out", "{root}/c.json", "--ablation", "resample"],
     "invalid choice: 'resample'"),
    ("circuit-tau-nan", [*CIRCUIT, "--task", "{task}", "--out", "{root}/c.json", "--tau", "nan"],
     "tau=nan is outside [0, 1]"),
    ("circuit-steps-not-a-number", [*CIRCUIT, "--task", "{task}", "--out", "{root}/c.json", "--steps", "many"],
     "'many' is not an integer"),
    ("circuit-unequal-lengths", [*CIRCUIT, "--task", "{unequal}", "--out", "{root}/c.json"],
     "position-wise patching needs equal lengths"),
    ("circuit-bool-answer", [*CIRCUIT, "--task", "{bool_answer}", "--out", "{root}/c.json"], "answer is True: a boolean"),
    ("circuit-ids-outside-vocab", [*CIRCUIT, "--task", "{out_of_vocab}", "--out", "{root}/c.json"],
     "token id(s) [9999] are outside the model's vocabulary"),
    ("circuit-prompt-too-long", [*CIRCUIT, "--task", "{too_long}", "--out", "{root}/c.json"],
     "a prompt is 600 tokens but the model's context is 512"),
    ("circuit-missing-task", [*CIRCUIT, "--task", "{missing}.json", "--out", "{root}/c.json"], "No task file"),
    ("circuit-task-is-a-directory", [*CIRCUIT, "--task", "{earlier}", "--out", "{root}/c.json"], "No task file"),
    ("circuit-dictionary-for-another-model", [*CIRCUIT, "--task", "{task}", "--out", "{root}/c.json",
                                              "--dictionaries", "{other}"], "32"),
    ("circuit-out-is-a-directory", [*CIRCUIT, "--task", "{task}", "--out", "{earlier}"],
     "is a directory, but a file is needed"),
    # convert
    ("convert-unknown-format", ["convert", "{dicts}", "{root}/conv", "--to", "onnx"], "--to 'onnx' is not a writable"),
    ("convert-missing-source", ["convert", "{missing}", "{root}/conv", "--to", "saelens"], "missing"),
    ("convert-destination-is-a-file", ["convert", "{dicts}", "{file}", "--to", "saelens"],
     "is a file, but a directory is needed"),
    ("convert-truncated-source", ["convert", "{truncated}", "{root}/conv", "--to", "saelens"], "dictionary.safetensors"),
    ("convert-destination-read-only", ["convert", "{dicts}", "{readonly}/conv", "--to", "saelens"], "choose a writable location", RO),
    # push
    ("push-dry-run-not-empty", ["push", "{dicts}", "me/repo", "--dry-run", "{earlier}"], "is not empty"),
    ("push-dry-run-is-a-file", ["push", "{dicts}", "me/repo", "--dry-run", "{file}"],
     "is a file, but a directory is needed"),
    ("push-missing-dir", ["push", "{missing}", "me/repo", "--dry-run", "{root}/upload"], "is not a directory"),
    ("push-truncated", ["push", "{truncated}", "me/repo", "--dry-run", "{root}/upload"], "dictionary.safetensors"),
    # view
    ("view-missing-graph", ["view", "{missing}.json", "-o", "{root}/v.html"], "missing.json"),
    ("view-output-is-a-directory", ["view", "{file}", "-o", "{earlier}"], "is a directory, but a file is needed"),
    ("view-output-read-only", ["view", "{file}", "-o", "{readonly}/v.html"], "choose a writable location", RO),
    # steer, label, demo (other owners' commands: their bad input must still end in one clear line)
    ("steer-set-without-spec", [*STEER, "--set", "mlp0:3"], "write NODE=SPEC"),
    ("steer-unparsable-node", [*STEER, "--set", "mlpX:abc=0"], "mlpX:abc"),
    ("steer-missing-model", ["steer", "--model", "{missing}", "--prompt", "x", "--set", "L0.H1=0"], "missing"),
    ("label-missing-dashboards", ["label", "{missing}.json", "--model", "{model}", "--dictionaries", "{dicts}",
                                  "--held-out", "{text}"], "missing.json"),
    ("demo-missing-text", ["demo", "--text", "{missing}.txt", "--out", "{root}/demo"], "No text file"),
]


@pytest.fixture(scope="module")
def finished_run(paths):
    """``earlier`` as a finished training run (its metrics.json and a dictionary), for the refusal row."""
    earlier = Path(paths["earlier"])
    (earlier / "metrics.json").write_text("{}")
    shutil.copytree(Path(paths["dicts"]) / HOOK_IN, earlier / HOOK_IN)
    return earlier


@pytest.mark.parametrize(("argv", "fragment", "flags"),
                         [pytest.param(row[1], row[2], row[3:], id=row[0]) for row in ROWS])
def test_bad_input_is_one_clear_line(argv, fragment, flags, paths, finished_run, capsys, single_torch_thread):
    argv = [item.format(**paths) for item in argv]
    command = argv[0]
    if fragment is None:  # train into a finished run
        fragment = "already holds a finished run"
    before = _snapshot(paths["root"])
    capsys.readouterr()
    with unprivileged(RO in flags):
        try:
            code = main(argv)
        except SystemExit as exit_:  # usage errors (argparse)
            code = exit_.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err + captured.out
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"featcircuits {command}: error:"), lines[0]
    assert fragment in lines[0], lines[0]
    assert _snapshot(paths["root"]) == before  # nothing written earlier changed, nothing new written
