"""Edge AtP with exact receivers (AtP*'s QK fix extended) and the secant downstream, checked by interventions."""

from __future__ import annotations

import pytest
import torch
from conftest import random_token_task

from featcircuits.circuits import ComponentGraph, find_circuit, roc_auc

pytestmark = pytest.mark.usefixtures("single_torch_thread")



@pytest.mark.parametrize("name", ["tiny_llama", "tiny_gpt2"])
def test_receiver_changes_match_a_hand_written_edge_ablation(name, request):
    """Grouped-query attention, rotary, RMSNorm (tiny_llama) and per-head attn_in, LayerNorm (tiny_gpt2): the
    batched receiver rerun gives each receiver's output under the one-edge ablation that a plain hooked
    forward gives; edges into the logits score their exact effect."""
    from featcircuits.circuits.receivers import receiver_changes
    from featcircuits.patching.edge_hooks import edge_hooks_enabled, head_input_hooks

    model = request.getfixturevalue(name)
    graph = ComponentGraph(model, random_token_task(model, 3, 5, 1), ablation="patch", max_copies=4)
    clean, ablated = graph._sender_outputs()
    delta = ablated - clean  # [n, senders, pos, d]
    layer, head, sender = 1, 2, 3  # sender 3 = L0.H2
    heads, mlp = receiver_changes(graph, layer, delta, graph._clean_mlp_in[layer])
    captured = {}

    def remove_from_head(x, hook):  # q/k/v or attn_in inputs [n, pos, heads, d]
        x = x.clone()
        x[:, :, head] += delta[:, sender]
        return x

    def remove_from_mlp(x, hook):
        return x + delta[:, sender]

    def capture(x, hook):
        captured[hook.name] = x.detach()
        return x

    with torch.no_grad(), edge_hooks_enabled(model):
        model.run_with_hooks(graph.task.clean_tokens, fwd_hooks=[
            *[(hook, remove_from_head) for hook in head_input_hooks(model, layer)],
            (f"blocks.{layer}.attn.hook_result", capture)])
        model.run_with_hooks(graph.task.clean_tokens, fwd_hooks=[
            (f"blocks.{layer}.hook_mlp_in", remove_from_mlp), (f"blocks.{layer}.hook_mlp_out", capture)])
    first = 1 + layer * graph.per_layer
    want_head = captured[f"blocks.{layer}.attn.hook_result"][:, :, head] - clean[:, first + head]
    want_mlp = captured[f"blocks.{layer}.hook_mlp_out"] - clean[:, first + graph.n_heads]
    assert want_head.abs().max() > 1e-3 and want_mlp.abs().max() > 1e-3  # the edge does something
    assert torch.allclose(heads[sender, :, :, head], want_head, atol=1e-5)
    assert torch.allclose(mlp[sender], want_mlp, atol=1e-5)
    # edges into the logits: exact metric changes, as batched edge ablation measures them
    n_edges = len(graph.edge_ids)
    into_logits = [i for i, (_, receiver) in enumerate(graph.edge_ids) if receiver == "logits"]
    masks = torch.ones(len(into_logits), n_edges)
    masks[torch.arange(len(into_logits)), torch.tensor(into_logits)] = 0
    measured = graph.edge_metric(masks) - graph.full_metric
    for receivers in ("exact", "secant"):
        scores = graph.edge_attribution(receivers=receivers)
        assert torch.allclose(scores[into_logits], measured, atol=1e-4)
    with pytest.raises(ValueError, match="receivers"):
        graph.edge_attribution(steps=4, receivers="exact")
    with pytest.raises(ValueError, match="receivers"):
        graph.edge_attribution(receivers="qk")
    with pytest.raises(ValueError, match="level='edges'"):
        find_circuit(model, graph.task, "atp", level="nodes", graph=graph, receivers="secant")


def test_exact_receivers_see_through_saturated_attention_and_mlps():
    """tracr's softmax is near one-hot and its MLPs are step functions, so plain AtP gives true edges ~0.
    frac_prevs: every edge's receiver feeds the output linearly, so exact receivers give every edge its
    exact one-edge ablation effect (plain AtP: 1e-7 for one of -0.094). hist: the secant also sees through
    the saturated MLP after the head (ROC 1.0; plain AtP 0.75)."""
    pytest.importorskip("tracr")
    from featcircuits.groundtruth.tracr_model import compile_tracr, tracr_program
    from featcircuits.groundtruth.tracr_truth import tracr_task

    for name in ("frac_prevs", "hist"):
        tm = compile_tracr(*tracr_program(name))
        task = tracr_task(tm, 4)
        graph = ComponentGraph(tm.model, task, ablation="zero")
        n_edges = len(graph.edge_ids)
        measured = graph.edge_metric(1.0 - torch.eye(n_edges)) - graph.full_metric
        truth = tm.edge_truth(graph.edge_ids)
        plain = graph.edge_attribution()
        if name == "frac_prevs":
            exact = graph.edge_attribution(receivers="exact")
            assert (plain - measured).abs().max() > 0.05
            assert torch.allclose(exact, measured, atol=1e-4)
        else:
            circuit = find_circuit(tm.model, task, "atp", level="edges", graph=graph, receivers="secant")
            assert circuit.params["receivers"] == "secant"
            assert roc_auc(plain.abs(), truth) < 1.0
            assert roc_auc([abs(s) for s in circuit.edge_scores], truth) == 1.0
            assert torch.allclose(torch.tensor(circuit.edge_scores), measured, atol=1e-4)
