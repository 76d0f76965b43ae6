"""`featcircuits circuit` end to end on stories260k, and its errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from featcircuits.circuits import Circuit
from featcircuits.cli import main

PAIRS = [
    {"clean": "Once upon a time, there was a boy named Lily. He had a big red ball. Every day,",
     "corrupt": "Once upon a time, there was a boy named Tim. He had a big red ball. Every day,",
     "answer": "Lily", "distractor": "Tim"},
    {"clean": "Once upon a time, there was a boy named Tim. He had a big red ball. Every day,",
     "corrupt": "Once upon a time, there was a boy named Lily. He had a big red ball. Every day,",
     "answer": "Tim", "distractor": "Lily"},
]


pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_circuit_command_writes_circuit_and_curve(stories_path, tmp_path, capsys):
    task = tmp_path / "task.json"
    task.write_text(json.dumps(PAIRS))
    out = tmp_path / "circuit.json"
    code = main(["circuit", "--model", str(stories_path), "--task", str(task), "--method", "atp", "--out", str(out),
                 "--ablation", "patch", "--sizes", "0", "10", "45", "--tau", "0.05"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r"components=(\d+)/(\d+) faithfulness=(-?[\d.]+) completeness=(-?[\d.]+)", lines[-1])
    assert match, lines[-1]
    circuit = Circuit.load(out)
    assert int(match.group(1)) == len(circuit.nodes) and int(match.group(2)) == len(circuit.node_ids) == 45  # 5 x 9
    assert float(match.group(3)) == pytest.approx(circuit.evaluation["faithfulness"], abs=1e-4)
    curve = (tmp_path / "circuit.curve.csv").read_text().splitlines()
    assert curve[0] == "size,fraction,faithfulness,completeness" and len(curve) == 4
    assert float(curve[-1].split(",")[2]) == pytest.approx(1.0, abs=1e-4)  # the whole model is faithful


def test_circuit_command_errors(stories_path, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    args = ["circuit", "--model", str(stories_path), "--method", "acdc", "--out", str(tmp_path / "c.json")]
    assert main([*args, "--task", str(empty)]) == 2
    assert "is empty" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{**PAIRS[0], "answer": "Tom"}]))
    assert main([*args, "--task", str(bad)]) == 2
    assert "answer 'Tom' is not a single token" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(PAIRS))
    assert main([*args, "--task", str(good), "--tau", "2"]) == 2
    assert "tau=2.0 is outside [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_circuit_command_passes_the_edge_estimator(stories_path, tmp_path, capsys):
    task = tmp_path / "task.json"
    task.write_text(json.dumps(PAIRS))
    out = tmp_path / "edges.json"
    args = ["circuit", "--model", str(stories_path), "--task", str(task), "--method", "atp", "--out", str(out)]
    assert main([*args, "--level", "edges", "--receivers", "secant", "--top-k", "20"]) == 0
    circuit = Circuit.load(out)
    assert circuit.params["receivers"] == "secant" and len(circuit.edges) == 20
    capsys.readouterr()
    assert main([*args, "--receivers", "exact"]) == 2  # node circuits have no receivers to refine
    assert "receivers='exact' refines edge AtP" in capsys.readouterr().err
    assert main([*args, "--metric", "kl"]) == 2  # a distance's gradient vanishes at the clean run
    assert "is a distance from the clean model" in capsys.readouterr().err


def _narrow_transcoders(model, folder):
    from featcircuits.dictionaries import Dictionary, DictionaryConfig

    torch.manual_seed(0)
    d = model.cfg.d_model
    for layer in (3, 4):  # narrow random transcoders on the last two MLPs keep the edge set small
        Dictionary.from_config(DictionaryConfig(
            d_in=d, d_sae=16, kind="transcoder", hook_in=f"blocks.{layer}.ln2.hook_normalized",
            hook_out=f"blocks.{layer}.hook_mlp_out", layer=layer)).save(str(folder / f"layer{layer}"))
    return folder


def test_circuit_command_finds_feature_edges_with_dictionaries(stories_model, stories_path, tmp_path, capsys):
    dicts = _narrow_transcoders(stories_model, tmp_path / "dicts")
    task = tmp_path / "task.json"
    task.write_text(json.dumps(PAIRS[:1]))
    out = tmp_path / "edges.json"
    assert main(["circuit", "--model", str(stories_path), "--dictionaries", str(dicts), "--task",
                 str(task), "--method", "acdc", "--level", "edges", "--max-edges", "40", "--tau", "0.01",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.out.strip().splitlines() if not line.startswith("Moving model")]
    assert re.search(r"\(40 candidate edges\)", "\n".join(lines))
    # the plan before the work, and the walk's progress on stderr
    assert re.match(r"memory: 40 feature edges \(of at most \d+ candidates\): about [\d.]+ GiB", lines[0])
    assert re.match(r"work: \d+ backward passes for the edge weights, then ACDC over 40 edges: at least 2 forward",
                    lines[1])
    assert "ACDC over 40 edges" in captured.err
    assert re.fullmatch(r"features=\d+/\d+ errors=\d+/\d+ faithfulness=-?[\d.]+ completeness=-?[\d.]+", lines[-1])
    circuit = Circuit.load(out)
    assert circuit.level == "edges" and len(circuit.edge_ids) == 40 and 0 < len(circuit.edges) <= 40
    # error terms are inputs of the local replacement model: edges end at features or at the logits
    assert all(receiver == "logits" or ":error@" not in receiver for _, receiver in circuit.edges)
    assert any(receiver != "logits" for _, receiver in circuit.edge_ids)


def test_circuit_command_counts_features_and_errors_apart(stories_model, stories_path, tmp_path, capsys):
    dicts = _narrow_transcoders(stories_model, tmp_path / "dicts")
    task = tmp_path / "task.json"
    task.write_text(json.dumps(PAIRS))
    out = tmp_path / "c.json"
    args = ["circuit", "--model", str(stories_path), "--dictionaries", str(dicts), "--task", str(task), "--out",
            str(out), "--method", "ig", "--steps", "2"]
    for errors in ("rank", "keep", "ablate"):
        assert main([*args, "--errors", errors, "--top-fraction", "0.1"]) == 0
        last = capsys.readouterr().out.strip().splitlines()[-1]
        match = re.fullmatch(r"features=(\d+)/(\d+) errors=(\d+)/(\d+) faithfulness=(-?[\d.]+) "
                             r"completeness=(-?[\d.]+)", last)
        assert match, last
        circuit = Circuit.load(out)
        features = [n for n in circuit.nodes if ":error" not in n]
        n_features = sum(":error" not in n for n in circuit.node_ids)
        assert [int(g) for g in match.groups()[:4]] == [
            len(features), n_features, len(circuit.nodes) - len(features), len(circuit.node_ids) - n_features]
        assert len(features) == int(0.1 * n_features)
        if errors != "rank":
            assert int(match.group(3)) == (int(match.group(4)) if errors == "keep" else 0)
        assert circuit.params["errors"] == errors and circuit.evaluation["errors"] == errors


def test_circuit_command_refuses_bad_error_options_and_a_search_over_budget(stories_model, stories_path, tmp_path,
                                                                             capsys):
    dicts = _narrow_transcoders(stories_model, tmp_path / "dicts")
    task = tmp_path / "task.json"
    task.write_text(json.dumps(PAIRS[:1]))
    out = tmp_path / "c.json"
    args = ["circuit", "--model", str(stories_path), "--task", str(task), "--out", str(out)]
    for bad in ("0", "1.5", "-0.2", "nan"):
        with pytest.raises(SystemExit) as usage:  # a usage error: argparse exits, one line, status 2
            main([*args, "--method", "atp", "--top-fraction", bad])
        assert usage.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "--top-fraction: must lie in (0, 1]" in err and len(err.splitlines()) == 1
    assert main([*args, "--method", "acdc", "--top-fraction", "0.1"]) == 2
    assert "--top-fraction selects the best AtP/IG scores" in capsys.readouterr().err
    assert main([*args, "--method", "atp", "--errors", "keep"]) == 2
    assert "--errors keep decides what happens to error nodes" in capsys.readouterr().err
    assert main([*args, "--method", "acdc", "--dictionaries", str(dicts), "--level", "edges",
                 "--memory-budget-gb", "0.00001"]) == 2
    err = capsys.readouterr().err.strip()
    assert re.search(r"more than memory_budget_gb=1e-05\. .*--memory-budget-gb", err) and len(err.splitlines()) == 1
    assert not out.exists()
