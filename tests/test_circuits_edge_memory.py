"""Feature-edge circuits against a memory budget: the candidate count, refusal before allocating with the largest
setting that fits, the work announced, and the estimate against the peak a real process reaches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import TINY_GPT2_CONFIG, random_token_task, relu_transcoders

from featcircuits.circuits import FeatureEdgeGraph, FeatureGraph, find_circuit
from featcircuits.circuits.edge_memory import (
    GIB,
    CircuitTooLargeError,
    candidate_edges,
    estimate_feature_edge_memory,
)
from featcircuits.nodes import parse_node_id

pytestmark = pytest.mark.usefixtures("single_torch_thread")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    from featcircuits import load_model
    from featcircuits.patching.replacement import ReplacementModel

    model = load_model(TINY_GPT2_CONFIG, seed=0)
    replacement = ReplacementModel(model, relu_transcoders(model, d_sae=24))
    task = random_token_task(model, 2, 5, seed=3)
    return replacement, task, FeatureGraph(replacement, task, ablation="patch", max_copies=8)


def test_candidate_edges_are_counted_exactly_without_building_one(setup):
    _, _, nodes = setup
    into_features, into_logits, into_one_site = candidate_edges(nodes)
    # by hand: every (sender, receiver) with the sender at an earlier site and not a later position
    parsed = [parse_node_id(n) for n in nodes.node_ids]
    site = {"mlp0": 0, "mlp1": 1}
    pairs = {(a, b) for a, u in enumerate(parsed) for b, d in enumerate(parsed)
             if d.kind == "feature" and site[u.site] < site[d.site] and u.pos <= d.pos}
    assert into_features == len(pairs) and into_one_site == len(pairs)  # all of them go into mlp1
    assert into_logits == len(nodes.node_ids)
    edges = FeatureEdgeGraph(nodes)
    index = {n: i for i, n in enumerate(nodes.node_ids)}
    built = {(index[s], index[r]) for s, r in edges.edge_ids if r != "logits"}
    assert built == pairs  # a dense linear map: every candidate has a weight
    assert len(edges.edge_ids) - edges.n_feature_edges <= into_logits


def test_a_search_that_cannot_fit_is_refused_before_allocating_and_the_named_setting_runs(setup, monkeypatch):
    replacement, task, nodes = setup
    total = estimate_feature_edge_memory(nodes, None, 8, "acdc").n_edges
    budget = estimate_feature_edge_memory(nodes, total // 3, 8, "acdc").peak / GIB

    def allocate(*args, **kwargs):
        raise AssertionError("the edges were being built")

    with monkeypatch.context() as patch:
        patch.setattr(FeatureEdgeGraph, "__init__", allocate)
        with pytest.raises(CircuitTooLargeError, match=r"max_edges=(\d+) fits") as refused:
            find_circuit(replacement, task, "acdc", level="edges", graph=nodes, batch_size=8, memory_budget_gb=budget)
        with pytest.raises(CircuitTooLargeError, match=r"more than memory_budget_gb=1e-05"):
            find_circuit(replacement, task, "atp", level="edges", graph=nodes, memory_budget_gb=1e-5)
    largest = int(re.search(r"max_edges=(\d+) fits", str(refused.value)).group(1))
    assert total // 3 <= largest < total
    circuit = find_circuit(replacement, task, "acdc", level="edges", graph=nodes, batch_size=8, max_edges=largest,
                           memory_budget_gb=budget, prefilter=20)
    assert len(circuit.edge_ids) == largest
    with pytest.raises(CircuitTooLargeError):
        find_circuit(replacement, task, "acdc", level="edges", graph=nodes, batch_size=8, max_edges=largest + 1,
                     memory_budget_gb=budget)


def test_the_work_is_announced_and_shown(setup, capsys):
    replacement, task, nodes = setup
    plan = estimate_feature_edge_memory(nodes, 300, 8, "acdc")
    edges = FeatureEdgeGraph(nodes, max_edges=300, progress=True)
    assert edges.forwards - len(task) == plan.weight_passes  # the clean runs, then every pass announced
    assert "feature edge weights" in capsys.readouterr().err
    find_circuit(replacement, task, "acdc", level="edges", graph=edges, batch_size=8, progress=True)
    bar = capsys.readouterr().err
    assert f"ACDC over {plan.n_edges} edges, batch 8" in bar and "forwards=" in bar
    assert plan.search_forwards == -(-300 // 8)


MEASURE = textwrap.dedent("""
    import ctypes, json, sys
    import torch
    torch.set_num_threads(1)
    from featcircuits import load_dictionaries, load_model
    from featcircuits.circuits import ContrastiveTask, FeatureGraph, evaluate, find_circuit
    from featcircuits.circuits.edge_memory import estimate_feature_edge_memory
    from featcircuits.patching.replacement import ReplacementModel

    def status(key):
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key))

    bundled, out = sys.argv[1], sys.argv[2]
    model = load_model(bundled)
    loaded = load_dictionaries(bundled + "/transcoders")
    dictionaries = [d for d in (loaded.values() if isinstance(loaded, dict) else loaded) if d.cfg.layer >= 2]
    replacement = ReplacementModel(model, dictionaries)
    task = ContrastiveTask.from_pairs(model, json.load(open(bundled + "/docstring_task.json"))[:1])
    nodes = FeatureGraph(replacement, task, ablation="patch", max_copies=32)
    plan = estimate_feature_edge_memory(nodes, None, 32, "acdc")
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what was freed goes back, so the baseline is what is in use
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident size starts again from here
    base = status("VmRSS")
    circuit = find_circuit(replacement, task, "acdc", level="edges", graph=nodes, batch_size=32, prefilter=32)
    evaluate(circuit, sizes=[0, 10])
    circuit.save(out)
    print(json.dumps({"estimate": plan.peak, "measured": status("VmHWM") - base, "edges": len(circuit.edge_ids)}))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
                    reason="the peak resident size is measured through Linux's /proc/self/clear_refs")
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(tmp_path):
    # a real process: the bundled model's last two transcoders, one docstring pair (about 300,000 edges);
    # edge weights, ACDC (pre-filtered: its chains still carry every edge), the sweep and the saved file
    bundled = REPO / "featcircuits" / "pretrained" / "bundled"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(bundled), str(tmp_path / "c.json")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["edges"] > 250_000 and figures["measured"] > 100 * 2**20  # well above the process's noise
    assert 0.5 <= figures["estimate"] / figures["measured"] <= 2.0, figures


def test_memory_budget_must_be_positive(setup):
    replacement, task, nodes = setup
    with pytest.raises(ValueError, match="memory_budget_gb=0; give a positive number"):
        find_circuit(replacement, task, "atp", level="edges", graph=nodes, memory_budget_gb=0)
