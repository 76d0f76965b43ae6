"""Component nodes, batched ablations, AtP/IG, ACDC and evaluation on a tiny model, checked by interventions."""

from __future__ import annotations

import pytest
import torch
from conftest import prefix_sharing_task, random_token_task

from featcircuits.circuits import ComponentGraph, acdc, evaluate, find_circuit
from featcircuits.circuits.tasks import logit_diff

pytestmark = pytest.mark.usefixtures("single_torch_thread")



@pytest.fixture(scope="module")
def graph(tiny_gpt2):
    return ComponentGraph(tiny_gpt2, random_token_task(tiny_gpt2, 4, 6, 0), ablation="patch")


def test_ablating_everything_reproduces_the_corrupt_run(tiny_gpt2, graph):
    task = graph.task
    corrupt = float(logit_diff(task, task.last_logits(tiny_gpt2(task.corrupt_tokens).detach())))
    clean = float(logit_diff(task, task.last_logits(tiny_gpt2(task.clean_tokens).detach())))
    n_edges = len(graph.edge_ids)
    both = graph.edge_metric(torch.stack([torch.ones(n_edges), torch.zeros(n_edges)]))
    assert both[0].item() == pytest.approx(clean, abs=1e-4)
    # every edge into the logits (and everywhere else) carries the corrupt value: the final residual is corrupt
    assert both[1].item() == pytest.approx(corrupt, abs=1e-4)


def test_batched_node_ablation_matches_a_hand_written_hook(tiny_gpt2, graph):
    task, n_nodes = graph.task, len(graph.node_ids)
    _, cache = tiny_gpt2.run_with_cache(task.corrupt_tokens, names_filter="blocks.1.attn.hook_z")
    corrupt_z = cache["blocks.1.attn.hook_z"]

    def patch_head_2(z, hook):
        z[:, :, 2] = corrupt_z[:, :, 2]
        return z

    logits = tiny_gpt2.run_with_hooks(task.clean_tokens, fwd_hooks=[("blocks.1.attn.hook_z", patch_head_2)])
    expected = float(logit_diff(task, task.last_logits(logits.detach())))
    masks = torch.ones(3, n_nodes)
    masks[1, graph.node_ids.index("L1.H2")] = 0
    masks[2, graph.node_ids.index("L0.MLP")] = 0
    values = graph.node_metric(masks)  # three patterns, one forward
    assert values[0].item() == pytest.approx(graph.full_metric, abs=1e-5)
    assert values[1].item() == pytest.approx(expected, abs=1e-4)
    single = graph.node_metric(masks[2:])
    assert values[2].item() == pytest.approx(single.item(), abs=1e-4)  # copies do not leak into each other


@pytest.mark.parametrize("level", ["nodes", "edges"])
def test_atp_is_the_derivative_of_a_real_intervention(graph, level):
    """AtP = (ablated - clean) . grad: the metric's slope when a unit moves a little toward its ablation."""
    units = graph.node_ids if level == "nodes" else graph.edge_ids
    run = graph.node_metric if level == "nodes" else graph.edge_metric
    scores = (graph.node_attribution if level == "nodes" else graph.edge_attribution)()
    eps = 1e-3
    picks = torch.tensor([0, len(units) // 2, len(units) - 1])
    masks = torch.ones(len(picks), len(units))
    masks[torch.arange(len(picks)), picks] = 1 - eps
    slope = (run(masks.double().float()) - graph.full_metric) / eps
    assert torch.allclose(slope, scores[picks], rtol=0.05, atol=2e-3)


def test_integrated_gradients_are_complete_without_downstream_nodes():
    """With one attention layer no node feeds another, so IG's scores sum to m(all ablated) - m(clean)."""
    from featcircuits import load_model

    model = load_model(dict(n_layers=1, d_model=32, d_head=8, n_heads=4, n_ctx=16, d_vocab=97, attn_only=True,
                            act_fn="relu", normalization_type="LN"), seed=1)
    graph = ComponentGraph(model, random_token_task(model, 4, 6, 0), ablation="zero")
    empty = graph.node_metric(torch.zeros(1, len(graph.node_ids))).item()
    ig = graph.node_attribution(steps=32)
    atp = graph.node_attribution(steps=1)
    assert ig.sum().item() == pytest.approx(empty - graph.full_metric, rel=0.02, abs=1e-3)
    assert abs(atp.sum().item() - (empty - graph.full_metric)) > abs(ig.sum().item() - (empty - graph.full_metric))


def test_acdc_skips_edges_into_nodes_that_left_the_circuit_and_finds_the_same_circuit(graph):
    n_edges = len(graph.edge_ids)
    order = list(reversed(range(n_edges)))
    naive = acdc(graph.edge_metric, order, n_edges, tau=0.1, batch_size=1)
    guess = graph.edge_attribution().abs() >= naive.threshold
    pruned = [acdc(graph.edge_metric, order, n_edges, tau=0.1, batch_size=size, predicted_keep=guess,
                   edges=graph.edge_ids) for size in (1, 64)]
    for result in pruned:
        assert torch.equal(result.keep, naive.keep)
    free = pruned[0].scores == 0
    assert free.any() and pruned[0].forwards == naive.forwards - int(free.sum())
    # the skipped edges' receivers really lead nowhere: the literal walk measured (almost) no change for them
    assert naive.scores[free].max() < 1e-4 * naive.threshold
    kept_senders = {graph.edge_ids[i][0] for i in naive.keep.nonzero()[:, 0].tolist()}
    assert all(graph.edge_ids[i][1] not in kept_senders for i in free.nonzero()[:, 0].tolist())


def test_acdc_recovers_from_bad_guesses_with_what_the_discarded_copies_measured(graph):
    # every unit guessed kept, while ACDC removes most: each removal is a wrong guess. After one, the rest of
    # the chain was measured one decision away from the true state, and those measurements become the guesses
    n_edges = len(graph.edge_ids)
    order = list(reversed(range(n_edges)))
    naive = acdc(graph.edge_metric, order, n_edges, tau=0.1, batch_size=1)
    removed = n_edges - int(naive.keep.sum())
    assert removed > 30
    stubborn = torch.ones(n_edges, dtype=torch.bool)
    guided = acdc(graph.edge_metric, order, n_edges, tau=0.1, batch_size=64, predicted_keep=stubborn)
    assert torch.equal(guided.keep, naive.keep)
    assert guided.forwards < removed / 5
    assert stubborn.all()  # the caller's guesses are left as they were


def test_acdc_with_tau_zero_removes_nothing_it_did_not_start_without(graph):
    # a node whose outgoing edges the pre-filter removed: its incoming edges change the metric only by
    # rounding, which tau = 0 keeps (nothing is removed for a change below 0)
    n_edges = len(graph.edge_ids)
    sender = next(s for s, _ in graph.edge_ids if any(r == s for _, r in graph.edge_ids))
    initial = torch.tensor([s != sender for s, _ in graph.edge_ids])
    result = acdc(graph.edge_metric, list(reversed(range(n_edges))), n_edges, tau=0.0, batch_size=64,
                  initial_keep=initial, edges=graph.edge_ids)
    assert torch.equal(result.keep, initial)
    assert any(r == sender for _, r in graph.edge_ids)


def test_acdc_refuses_an_empty_chain_and_a_wrong_number_of_edges(graph):
    n_edges = len(graph.edge_ids)
    with pytest.raises(ValueError, match="batch_size=0"):
        acdc(graph.edge_metric, list(range(n_edges)), n_edges, tau=0.1, batch_size=0)
    with pytest.raises(ValueError, match="pairs for"):
        acdc(graph.edge_metric, list(range(n_edges)), n_edges, tau=0.1, edges=graph.edge_ids[:-1])


def test_batched_acdc_finds_the_same_circuit_as_one_forward_per_edge(graph):
    n_edges = len(graph.edge_ids)
    order = list(reversed(range(n_edges)))
    naive = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=1)
    batched = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=64)
    guess = graph.edge_attribution().abs() >= naive.threshold
    guided = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=64, predicted_keep=guess)
    assert torch.equal(naive.keep, batched.keep) and torch.equal(naive.keep, guided.keep)
    assert 0 < int(naive.keep.sum()) < n_edges
    assert naive.forwards >= n_edges and batched.forwards < naive.forwards and guided.forwards < naive.forwards
    # ACDC's own guarantee: each surviving edge's removal moved the metric by at least the threshold
    assert (naive.scores[naive.keep] >= naive.threshold).all()
    # starting forwards after the clean prefix changes nothing: compare with full forwards
    plain = ComponentGraph(graph.model, graph.task, ablation="patch", skip_clean_prefix=False)
    late = torch.ones(2, n_edges)
    late[0, -5:] = 0  # only edges into the logits removed
    late[1] = naive.keep.float()
    assert torch.allclose(graph.edge_metric(late), plain.edge_metric(late), atol=1e-4)


def test_find_circuit_and_evaluate(tiny_gpt2, graph):
    circuit = find_circuit(tiny_gpt2, graph.task, "acdc", level="edges", tau=0.02, graph=graph)
    result = evaluate(circuit, sizes=[0, 5, len(graph.edge_ids)])
    assert result["curve"]["faithfulness"][0] == pytest.approx(0.0, abs=1e-6)
    assert result["curve"]["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    assert result["curve"]["completeness"][-1] == pytest.approx(0.0, abs=1e-5)
    keep = torch.zeros(len(graph.edge_ids))
    keep[[graph.edge_ids.index(edge) for edge in circuit.edges]] = 1
    m_circuit = graph.edge_metric(keep[None]).item()
    expected = (m_circuit - result["m_empty"]) / (result["m_full"] - result["m_empty"])
    assert result["faithfulness"] == pytest.approx(expected, abs=1e-5)
    assert 0 <= result["cmd"] and result["cpr"] == pytest.approx(
        sum((b - a) * (fa + fb) / 2 for a, b, fa, fb in zip(result["curve"]["fractions"][:-1],
            result["curve"]["fractions"][1:], result["curve"]["faithfulness"][:-1],
            result["curve"]["faithfulness"][1:], strict=True)))
    for method in ("atp", "ig"):
        scored = find_circuit(tiny_gpt2, graph.task, method, top_k=3, graph=graph)
        assert len(scored.nodes) == 3


def test_bad_parameters(tiny_gpt2, graph):
    with pytest.raises(ValueError, match=r"tau=1.5 is outside \[0, 1\]"):
        find_circuit(tiny_gpt2, graph.task, "acdc", tau=1.5, graph=graph)
    with pytest.raises(ValueError, match="Unknown method"):
        find_circuit(tiny_gpt2, graph.task, "eap", graph=graph)
    with pytest.raises(ValueError, match="Unknown ablation"):
        ComponentGraph(tiny_gpt2, graph.task, ablation="resample")


def test_distance_metrics_refuse_atp_and_guide_acdc_with_integrated_gradients(tiny_gpt2):
    """AtP's gradient of a distance from the clean model is zero at the clean run: AtP is refused with a
    clear error, and ACDC (guided by IG instead) keeps the circuit of the literal one-forward-per-edge walk."""
    graph = ComponentGraph(tiny_gpt2, random_token_task(tiny_gpt2, 4, 6, 0), ablation="patch", metric="l2")
    assert graph.node_attribution(steps=1).abs().max().item() < 1e-6  # why AtP is refused
    with pytest.raises(ValueError, match="'l2_to_clean' is a distance from the clean model.*method='ig'"):
        find_circuit(tiny_gpt2, graph.task, "atp", graph=graph)
    with pytest.raises(ValueError, match="IG with steps=1"):
        find_circuit(tiny_gpt2, graph.task, "ig", steps=1, graph=graph)
    with pytest.raises(ValueError, match="receivers='exact' refines AtP"):
        find_circuit(tiny_gpt2, graph.task, "acdc", level="edges", receivers="exact", graph=graph)
    n_edges = len(graph.edge_ids)
    circuit = find_circuit(tiny_gpt2, graph.task, "acdc", level="edges", tau=0.05, graph=graph, batch_size=64)
    order = list(reversed(range(n_edges)))
    gap = float((graph.edge_metric(torch.zeros(1, n_edges)) - graph.full_metric).abs())
    naive = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=1, reference_gap=gap)
    assert sorted(circuit.edges) == sorted(graph.edge_ids[i] for i in naive.keep.nonzero()[:, 0].tolist())
    assert 0 < len(circuit.edges) < n_edges
    # the pre-filter ranks by IG: ACDC then walks exactly the edges with the largest |IG| (AtP's would be noise)
    k = n_edges // 4
    top = torch.zeros(n_edges, dtype=torch.bool)
    top[graph.edge_attribution(steps=8).abs().topk(k).indices] = True
    filtered = find_circuit(tiny_gpt2, graph.task, "acdc", level="edges", tau=0.05, graph=graph, prefilter=k)
    walk = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=1, reference_gap=gap, initial_keep=top)
    assert sorted(filtered.edges) == sorted(graph.edge_ids[i] for i in walk.keep.nonzero()[:, 0].tolist())
    assert len(filtered.edges) > 0
    assert graph.full_metric == 0.0 and find_circuit(tiny_gpt2, graph.task, "ig", top_k=3, graph=graph).nodes


def test_grouped_query_attention_edges(tiny_llama):
    """GQA models have no per-head attn_in: q/k/v inputs are hooked with key/value heads ungrouped."""
    graph = ComponentGraph(tiny_llama, random_token_task(tiny_llama, 4, 6, 0), ablation="patch")
    task, n_edges = graph.task, len(graph.edge_ids)
    corrupt = float(logit_diff(task, task.last_logits(tiny_llama(task.corrupt_tokens).detach())))
    assert graph.edge_metric(torch.zeros(1, n_edges)).item() == pytest.approx(corrupt, abs=1e-4)
    scores, eps = graph.edge_attribution(), 1e-3
    picks = torch.tensor([1, n_edges // 2, n_edges - 2])
    masks = torch.ones(len(picks), n_edges)
    masks[torch.arange(len(picks)), picks] = 1 - eps
    slope = (graph.edge_metric(masks) - graph.full_metric) / eps
    assert torch.allclose(slope, scores[picks], rtol=0.05, atol=2e-3)
    assert not tiny_llama.cfg.ungroup_grouped_query_attention and not tiny_llama.cfg.use_split_qkv_input


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_shared_head_inputs_match_transformer_lens_per_head_inputs(model_name, request, monkeypatch):
    """Edge patching runs the blocks itself (own attention, last block at the last token) or through
    transformer_lens with each head's q/k/v set from one normalised input per head; transformer_lens's own
    per-head residual copies (use_attn_in / use_split_qkv_input) must give the same metrics."""
    import featcircuits.circuits.components as components
    import featcircuits.patching.hooked_edges as hooked_edges

    model = request.getfixturevalue(model_name)  # LayerNorm + MHA, RMSNorm + grouped-query attention
    graph = ComponentGraph(model, random_token_task(model, 4, 6, 1), ablation="zero")
    keep = (torch.rand(12, len(graph.edge_ids), generator=torch.Generator().manual_seed(0)) > 0.3).float()
    assert components.own_blocks_supported(model)
    own_blocks = graph.edge_metric(keep)
    monkeypatch.setattr(components, "own_blocks_supported", lambda model: False)
    shared = graph.edge_metric(keep)
    monkeypatch.setattr(hooked_edges, "shared_head_inputs_supported", lambda model: False)
    per_head_copies = graph.edge_metric(keep)
    assert torch.allclose(shared, per_head_copies, atol=1e-5)
    assert torch.allclose(own_blocks, per_head_copies, atol=1e-5)
    assert (shared - graph.full_metric).abs().max() > 1e-2  # the patterns do move the metric


@pytest.mark.parametrize("normalization", ["LN", "LNPre", "RMS", "RMSPre", None])
def test_per_head_queries_keys_values_match_the_blocks_own_norm_and_projections(normalization):
    """head_qkv moves the norm's scale past the projection; the block's own ln1 then W_Q/W_K/W_V must agree,
    for every norm transformer_lens builds (folded LayerNorm included) and none."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featcircuits.patching.head_inputs import head_qkv

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=11, act_fn="gelu",
        normalization_type=normalization))
    block = model.blocks[0]
    with torch.no_grad():
        for parameter in (*block.ln1.parameters(), block.attn.b_Q, block.attn.b_K, block.attn.b_V):
            parameter.normal_()  # non-trivial norm weights and biases
    resid, correction = torch.randn(3, 5, 16) * 2 + 0.5, torch.randn(3, 4, 5, 16)  # correction [batch, head, pos, d]
    q, k, v = head_qkv(block, resid, correction)
    inputs = block.ln1(resid.unsqueeze(2) - correction.transpose(1, 2))  # [batch, pos, head, d_model]
    attn = block.attn
    for ours, weight, bias in ((q, attn.W_Q, attn.b_Q), (k, attn.W_K, attn.b_K), (v, attn.W_V, attn.b_V)):
        reference = torch.einsum("bphd,hde->bphe", inputs, weight) + bias
        assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-5)
    assert (q - attn.b_Q).abs().max() > 0.1


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
@pytest.mark.parametrize("ablation", ["patch", "mean"])
def test_edge_attribution_through_own_blocks_matches_transformer_lens(model_name, ablation, request, monkeypatch):
    """Plain AtP through the own blocks (per-prompt windows, last block at the last token) gives
    transformer_lens's hooked AtP scores."""
    import featcircuits.circuits.components as components

    model = request.getfixturevalue(model_name)
    graph = ComponentGraph(model, prefix_sharing_task(model), ablation=ablation)
    ours = graph.edge_attribution()
    monkeypatch.setattr(components, "own_blocks_supported", lambda model: False)
    reference = graph.edge_attribution()
    assert reference.abs().max() > 1e-2
    assert torch.allclose(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model_name", ["tiny_gpt2", "tiny_llama"])
def test_patterns_grouped_by_start_layer_over_the_shared_prefix_match_full_forwards(model_name, request):
    """Forwards that start at each pattern's first changed layer, over the positions after the clean and
    corrupt prompts' shared prefix (clean keys and values before it), give the full forwards' metrics."""

    model = request.getfixturevalue(model_name)
    generator = torch.Generator().manual_seed(3)
    task = prefix_sharing_task(model)
    graph = ComponentGraph(model, task, ablation="patch")
    plain = ComponentGraph(model, task, ablation="patch", skip_clean_prefix=False)
    assert graph._shared_positions() == 3
    n_edges = len(graph.edge_ids)
    masks = [torch.ones(n_edges), torch.zeros(n_edges)]
    for _, first, _, _ in graph._receiver_groups:  # patterns whose earliest removed edge is in each group
        mask = torch.ones(n_edges)
        mask[first:] = (torch.rand(n_edges - first, generator=generator) > 0.3).float()
        masks.append(mask)
    masks += list((torch.rand(4, n_edges, generator=generator) > 0.5).float())
    masks = torch.stack(masks)
    starts = graph._start_layers(masks)
    assert set(starts.tolist()) == set(range(model.cfg.n_layers + 1))  # every start layer is exercised
    expected = plain.edge_metric(masks)
    assert torch.allclose(graph.edge_metric(masks), expected, atol=1e-4)
    assert graph.edge_metric(masks[:1]).item() == pytest.approx(graph.full_metric, abs=1e-5)


@pytest.mark.parametrize("adjacent_pairs", [False, True])
def test_rotary_at_given_positions_matches_transformer_lens(adjacent_pairs):
    """The own blocks' rotary (any positions per row) against transformer_lens's apply_rotary at an offset,
    with both pairings and a rotary dimension smaller than the head."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featcircuits.patching.attention import rotate

    model = HookedTransformer(HookedTransformerConfig(
        n_layers=1, d_model=16, n_ctx=16, d_head=8, n_heads=2, d_vocab=11, act_fn="silu",
        positional_embedding_type="rotary", rotary_dim=4, rotary_adjacent_pairs=adjacent_pairs))
    attn = model.blocks[0].attn
    x = torch.randn(3, 5, 2, 8, generator=torch.Generator().manual_seed(0))  # [batch, pos, head, d_head]
    expected = attn.apply_rotary(x, 6)
    ours = rotate(attn, x, torch.arange(6, 11)[:, None])
    assert torch.allclose(ours, expected, atol=1e-6)
    assert not torch.allclose(ours, x, atol=1e-2)


def test_attention_only_models_patch_edges_like_transformer_lens():
    """Attention-only models (no MLP input to hook) patch edges, and the own blocks agree with
    transformer_lens's hooked forward on them, a pair whose clean and corrupt prompts are equal included."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from featcircuits.circuits import ContrastiveTask

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(
        n_layers=3, d_model=32, n_ctx=16, d_head=8, n_heads=4, d_vocab=50, act_fn="gelu", attn_only=True,
        positional_embedding_type="rotary", normalization_type="LN"))
    generator = torch.Generator().manual_seed(1)
    same = torch.randint(0, 50, (7,), generator=generator).tolist()
    pairs = [{"clean": same, "corrupt": same, "answer": 3, "distractor": 5},
             {"clean": torch.randint(0, 50, (5,), generator=generator).tolist(),
              "corrupt": torch.randint(0, 50, (5,), generator=generator).tolist(), "answer": 3, "distractor": 5}]
    task = ContrastiveTask.from_pairs(model, pairs)
    graph = ComponentGraph(model, task, ablation="patch")
    plain = ComponentGraph(model, task, ablation="patch", skip_clean_prefix=False)
    assert not graph.has_mlp and all(".MLP" not in receiver for _, receiver in graph.edge_ids)
    keep = (torch.rand(16, len(graph.edge_ids), generator=generator) > 0.4).float()
    expected = plain.edge_metric(keep)
    assert expected.std() > 1e-2
    assert torch.allclose(graph.edge_metric(keep), expected, atol=1e-5)


def test_acdc_batch_size_defaults_to_the_device(tiny_gpt2):
    """Without a batch size ACDC takes 32 patterns per forward on CPU (64 on accelerators), and records it."""
    from featcircuits.circuits.discovery import default_batch_size

    task = random_token_task(tiny_gpt2, 2, 5, 0)
    graph = ComponentGraph(tiny_gpt2, task, ablation="zero")
    assert default_batch_size(tiny_gpt2) == default_batch_size(graph) == 32
    circuit = find_circuit(tiny_gpt2, task, "acdc", level="edges", tau=0.05, graph=graph)
    assert circuit.params["batch_size"] == 32
