"""tracr ground truth: compiled programs, component circuits, residual SAEs and feature circuits."""

from __future__ import annotations

import pytest
import torch

from featcircuits.circuits import find_circuit, make_graph, roc_auc
from featcircuits.dictionaries import Dictionary, DictionaryConfig

pytestmark = [pytest.mark.usefixtures("single_torch_thread")]
tracr = pytest.importorskip("tracr")


@pytest.fixture(scope="module")
def frac_prevs():
    from featcircuits.groundtruth.tracr_model import compile_tracr, tracr_program

    return compile_tracr(*tracr_program("frac_prevs"))


def test_tracr_programs_compile_and_component_circuits_match_the_compiled_graph(frac_prevs):
    from tracr.rasp import rasp

    from featcircuits.groundtruth.tracr_model import compile_tracr, tracr_program
    from featcircuits.groundtruth.tracr_truth import tracr_task

    for name in ("frac_prevs", "reverse"):
        program, vocab, n = tracr_program(name)
        tm = frac_prevs if name == "frac_prevs" else compile_tracr(program, vocab, n)
        for tokens in (list("wxyxz")[:n], list("zzxwx")[:n]) if name == "frac_prevs" else (list("abcab"), list("cabba")):
            want = rasp.evaluate(program, tokens)
            logits = tm.model(torch.tensor([tm.encode(tokens)]))[0, 1:].detach()
            if tm.output_values is None:
                assert torch.allclose(logits[:, 0], torch.tensor(want, dtype=torch.float32), atol=1e-3)
            else:
                assert [tm.output_values[i] for i in logits.argmax(-1).tolist()] == want
    task = tracr_task(frac_prevs, 4)
    for method in ("acdc", "atp"):
        circuit = find_circuit(frac_prevs.model, task, method, level="edges", ablation="zero")
        truth = frac_prevs.edge_truth(circuit.edge_ids)
        assert roc_auc([abs(s) for s in circuit.edge_scores], truth) == 1.0


def test_tracr_source_serves_every_length_as_the_model_computes_it(frac_prevs):
    from featcircuits.groundtruth.tracr_saes import TracrSource

    hook = "blocks.1.hook_resid_pre"
    source = TracrSource(frac_prevs, [hook], inputs_per_length=3, seed=5)
    rows = source.next_chunk()[hook]
    max_len = frac_prevs.model.cfg.n_ctx - 1
    assert rows.shape == (3 * sum(length + 1 for length in range(1, max_len + 1)), frac_prevs.model.cfg.d_model)
    # the same generator state gives the same inputs; the rows are the model's own activations
    replay = TracrSource(frac_prevs, [hook], inputs_per_length=3, seed=5)
    tokens = replay.sample_tokens(1, 3)
    _, cache = frac_prevs.model.run_with_cache(tokens, names_filter=[hook])
    assert torch.equal(rows[:6], cache[hook].reshape(-1, rows.shape[1]))


def _label_dictionary(tm, hook: str, rows: torch.Tensor) -> Dictionary:
    """An SAE whose features are exactly tracr's varying labels (the ground truth, as a dictionary)."""
    varying = (rows.std(0) > 1e-6).nonzero()[:, 0]
    d_model = tm.model.cfg.d_model
    cfg = DictionaryConfig(d_in=d_model, d_sae=len(varying), hook_in=hook, hook_out=hook,
                           layer=int(hook.split(".")[1]), apply_b_dec_to_input=True)
    sae = Dictionary.from_config(cfg)
    with torch.no_grad():
        eye = torch.eye(d_model)[varying]  # [d_sae, d_model]
        sae.W_enc.copy_(eye.T)
        sae.W_dec.copy_(eye)
        sae.b_enc.zero_()
        sae.b_dec.copy_(torch.where(rows.std(0) > 1e-6, torch.zeros(d_model), rows.mean(0)))
    return sae


def test_truth_units_score_perfectly_with_the_labelled_directions_themselves(frac_prevs):
    """The ground-truth definition checked by interventions: with dictionaries whose features ARE the
    labelled directions, ablating exactly the labels the program reads is what moves the output."""
    from featcircuits.groundtruth.tracr_saes import TracrSource, residual_sites
    from featcircuits.groundtruth.tracr_truth import tracr_task, variable_truth_units
    from featcircuits.patching.replacement import ReplacementModel

    hooks = residual_sites(frac_prevs)
    rows = TracrSource(frac_prevs, hooks, inputs_per_length=16).next_chunk()
    replacement = ReplacementModel(frac_prevs.model, [_label_dictionary(frac_prevs, h, rows[h]) for h in hooks])
    graph = make_graph(replacement, tracr_task(frac_prevs, 4), ablation="zero", positions="sum")
    circuit = find_circuit(replacement, None, "acdc", tau=0.01, graph=graph)
    names, scores, truth = variable_truth_units(frac_prevs, graph, torch.tensor(circuit.node_scores))
    assert roc_auc(scores, truth) == 1.0
    assert 0 < int(truth.sum()) < len(names)


def test_saes_trained_on_the_residual_stream_recover_the_program_dataflow(frac_prevs):
    """The library's trainer on tracr's residual stream: every labelled direction has a feature close to it
    (an L1 SAE centres each variable, cosine ~0.87 for a value of a 5-valued variable), and the AtP feature
    circuit, and ACDC's under the squared distance to the clean output (ACDC's own metric for this program),
    rank the variables the program reads above those it does not."""
    from featcircuits.groundtruth.tracr_saes import train_residual_saes
    from featcircuits.groundtruth.tracr_truth import label_recovery, tracr_task, variable_truth_units
    from featcircuits.patching.replacement import ReplacementModel

    saes, info = train_residual_saes(frac_prevs, steps=600, seeds=(0,))
    assert max(info["fvu"].values()) < 0.05
    recovery = label_recovery(frac_prevs, saes)
    assert recovery["mean_cosine"] > 0.8
    replacement = ReplacementModel(frac_prevs.model, saes)
    graph = make_graph(replacement, tracr_task(frac_prevs, 8), ablation="zero", positions="sum")
    circuit = find_circuit(replacement, None, "atp", graph=graph)
    names, scores, truth = variable_truth_units(frac_prevs, graph, torch.tensor(circuit.node_scores))
    assert roc_auc(scores, truth) >= 0.9
    graph = make_graph(replacement, graph.task, ablation="zero", positions="sum", metric="l2")
    circuit = find_circuit(replacement, None, "acdc", graph=graph)
    names, scores, truth = variable_truth_units(frac_prevs, graph, torch.tensor(circuit.node_scores))
    assert roc_auc(scores, truth) >= 0.95


def test_programs_are_named_as_tracr_names_them():
    import inspect

    from tracr.compiler import lib
    from tracr.rasp import rasp

    from featcircuits.groundtruth.tracr_model import TRACR_PROGRAMS, program_name, tracr_program

    # every program builder of tracr's lib (not the combinator that takes a function) has a program here
    builders = {name for name, f in inspect.getmembers(lib, inspect.isfunction)
                if f.__module__ == lib.__name__ and name != "make_nary_sequencemap"}
    assert {program_name(name) for name in builders} == set(TRACR_PROGRAMS)
    ours, theirs = tracr_program("hist"), tracr_program("make_hist")
    assert ours[1:] == theirs[1:]
    assert rasp.evaluate(ours[0], list("abca")) == rasp.evaluate(theirs[0], list("abca")) == [2, 1, 1, 2]
    with pytest.raises(ValueError, match=r"Unknown tracr program 'make_histogram'; choose one of .* or tracr's own "
                                         r"names for them \(detect_pattern, make_count,"):
        tracr_program("make_histogram")
