"""Feature edges (the linear graph's edges in the local replacement model), checked against frozen runs and
an independently iterated local replacement model."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_GPT2_CONFIG, random_token_task

from featcircuits.circuits import Circuit, FeatureEdgeGraph, FeatureGraph, acdc, evaluate, find_circuit
from featcircuits.dictionaries import Dictionary, DictionaryConfig

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _replacement(model, widths: tuple[int, int]):
    from featcircuits.patching.replacement import ReplacementModel

    torch.manual_seed(0)
    d = model.cfg.d_model
    transcoder = Dictionary.from_config(DictionaryConfig(
        d_in=d, d_sae=widths[0], kind="transcoder", hook_in="blocks.0.ln2.hook_normalized",
        hook_out="blocks.0.hook_mlp_out", layer=0))
    sae = Dictionary.from_config(DictionaryConfig(d_in=d, d_sae=widths[1], hook_in="blocks.1.hook_resid_pre", layer=1))
    return ReplacementModel(model, [transcoder, sae])


@pytest.fixture(scope="module")
def replacement(tiny_gpt2):
    return _replacement(tiny_gpt2, (48, 40))


@pytest.fixture(scope="module")
def task(tiny_gpt2):
    from featcircuits.circuits import ContrastiveTask

    # prompts of two lengths: receivers past the shorter prompt's end carry no weight there
    generator = torch.Generator().manual_seed(1)
    pairs = [{"clean": torch.randint(0, 97, (length,), generator=generator).tolist(),
              "corrupt": torch.randint(0, 97, (length,), generator=generator).tolist(),
              "answer": 3, "distractor": 5} for length in (5, 4, 5)]
    return ContrastiveTask.from_pairs(tiny_gpt2, pairs)


@pytest.fixture(scope="module", params=["zero", "patch"])
def edges(request, replacement, task):
    return FeatureEdgeGraph(FeatureGraph(replacement, task, ablation=request.param))


def _metric(edges: FeatureEdgeGraph, last: list[torch.Tensor]) -> float:
    return float(edges.metric_fn(edges.task, torch.stack(last, 1), edges.clean_last)[0])


def _local_model_with_node_ablated(edges: FeatureEdgeGraph, node: int) -> float:
    """The local replacement model (clean patterns and scales, feature nodes recomputed, other features held
    at their clean value) with one node ablated, built by iterating frozen runs (features as inputs) until
    the features agree with their inputs."""
    rm, graph = edges.rm, edges.nodes
    key, site, pos, feat = next((k, s, p[node - start], f[node - start]) for k, s, start, p, f in graph._site_units
                                if start <= node < start + len(f))
    last = []
    for index, clean in enumerate(edges._clean_runs):
        ablated = graph.values[index][key][1]
        masks = {name: torch.zeros_like(a, dtype=torch.bool) for name, a in clean.feature_acts.items()}
        for k, s, _, p, f in graph._site_units:
            if k.startswith("feat:"):
                inside = p < clean.n_pos
                masks[s][p[inside], f[inside]] = True
        acts = {name: a.clone() for name, a in clean.feature_acts.items()}
        errors = {}
        present = pos < clean.n_pos  # the node's position exists in this prompt
        if present and key.startswith("error:"):
            errors[site] = clean.errors[site].clone()
            errors[site][pos] = ablated[pos]
        for _ in range(len(rm.sites) + 1):
            if present and key.startswith("feat:"):
                acts[site][pos, feat] = ablated[pos, feat]
            out = rm.run(clean.tokens, clean=clean, feature_acts={n: a[None] for n, a in acts.items()},
                         errors=errors, return_acts=True)
            acts = {n: torch.where(masks[n], rm.site(n).dictionary.activation(out.pre_acts[n][0]),
                                   clean.feature_acts[n]) for n in acts}
        last.append(out.logits[:, -1])
    return _metric(edges, last)


def test_keeping_every_edge_is_the_clean_model_and_removing_every_edge_ablates_every_node(edges):
    n = len(edges.edge_ids)
    both = edges.edge_metric(torch.stack([torch.ones(n), torch.zeros(n)]))
    assert both[0].item() == pytest.approx(edges.full_metric, abs=1e-5)
    last = []
    for index, clean in enumerate(edges._clean_runs):
        values = edges.nodes.values[index]
        ablated = {kind: {k.split(":", 1)[1]: v[1] for k, v in values.items() if k.startswith(kind)}
                   for kind in ("feat:", "error:")}
        out = edges.rm.run(clean.tokens, clean=clean, feature_acts=ablated["feat:"], errors=ablated["error:"])
        last.append(out.logits[:, -1])
    everything_ablated = _metric(edges, last)
    assert abs(everything_ablated - edges.full_metric) > 0.05  # the check below is not trivially met
    assert both[1].item() == pytest.approx(everything_ablated, abs=1e-5)


def test_removing_every_edge_out_of_a_node_ablates_that_node(edges):
    senders = edges._edge_sender
    # features with edges into features and into the logits (the residual SAE cuts paths, so no feature has
    # both here), an error node
    to_features = sorted(set(senders[: edges.n_feature_edges].tolist()))
    to_logits = sorted(set(senders[edges.n_feature_edges:].tolist()))
    errors = [int(i) for i in edges._is_error.nonzero()[:, 0] if int(i) in to_features]
    moved = 0.0
    for node in (to_features[0], to_features[len(to_features) // 2], to_logits[len(to_logits) // 2], errors[-1]):
        keep = (senders != node).float()
        measured = edges.edge_metric(keep[None]).item()
        expected = _local_model_with_node_ablated(edges, node)
        assert measured == pytest.approx(expected, abs=1e-5), edges.node_ids[node]
        moved = max(moved, abs(expected - edges.full_metric))
    assert moved > 1e-3


@pytest.mark.parametrize("steps", [1, 4])
def test_attribution_of_edges_into_the_logits_is_their_exact_effect_under_logit_difference(edges, steps):
    # past the last frozen normalisation the logit difference is linear, so AtP on these edges is exact
    scores = edges.edge_attribution(steps=steps)
    n, first = len(edges.edge_ids), edges.n_feature_edges
    picked = torch.linspace(first, n - 1, 6).long()
    keep = torch.ones(len(picked), n)
    keep[torch.arange(len(picked)), picked] = 0
    measured = edges.edge_metric(keep) - edges.full_metric
    assert measured.abs().max() > 1e-4
    assert torch.allclose(scores[picked], measured, atol=1e-5)


def test_feature_edge_acdc_matches_the_one_forward_per_edge_walk_and_round_trips(tiny_gpt2, tmp_path):
    # narrow dictionaries and two short pairs keep the literal walk (one forward per edge) short
    replacement, task = _replacement(tiny_gpt2, (8, 8)), random_token_task(tiny_gpt2, 2, 4, 2)
    circuit = find_circuit(replacement, task, "acdc", level="edges", tau=0.02, ablation="patch")
    graph = circuit.graph
    assert isinstance(graph, FeatureEdgeGraph) and graph.complete
    n = len(graph.edge_ids)
    order = list(reversed(range(n)))
    literal = acdc(graph.edge_metric, order, n, tau=0.02, batch_size=1)
    chosen = {graph.edge_ids[i] for i in literal.keep.nonzero()[:, 0].tolist()}
    assert set(map(tuple, circuit.edges)) == chosen and 0 < len(chosen) < n
    assert circuit.params["forwards"] < literal.forwards / 5
    result = evaluate(circuit)
    assert result["faithfulness"] == pytest.approx(
        (graph.edge_metric(literal.keep.float()[None]).item() - result["m_empty"])
        / (result["m_full"] - result["m_empty"]), abs=1e-4)
    circuit.save(tmp_path / "edges.json")
    loaded = Circuit.load(tmp_path / "edges.json")
    assert loaded.level == "edges" and [tuple(e) for e in loaded.edges] == [tuple(e) for e in circuit.edges]


def test_max_edges_keeps_the_largest_attributions_and_marks_the_set_incomplete(replacement, task):
    nodes = FeatureGraph(replacement, task, ablation="patch")
    every = FeatureEdgeGraph(nodes)
    few = FeatureEdgeGraph(nodes, max_edges=50)
    assert len(few.edge_ids) == 50 and not few.complete
    cut = every.edge_attribution().abs().topk(50).values
    assert torch.allclose(few.edge_attribution().abs().sort(descending=True).values, cut)
    # a limit inside a run of tied scores (edges into features inactive in the clean run score exactly 0)
    # still keeps exactly max_edges, every non-zero one among them
    scores = every.edge_attribution()
    n_nonzero, n_zero = int((scores != 0).sum()), int((scores == 0).sum())
    assert n_zero > 20
    tied = FeatureEdgeGraph(nodes, max_edges=n_nonzero + 10)
    assert len(tied.edge_ids) == n_nonzero + 10 and int((tied.edge_attribution() != 0).sum()) == n_nonzero
    assert set(tied.edge_ids) <= set(every.edge_ids)


def test_under_a_distance_metric_candidate_edges_are_the_best_by_integrated_gradients(replacement, task):
    """A distance's gradient is zero at the clean run, so AtP cannot rank candidates there: max_edges keeps
    the edges with the largest |AtP-IG| among all of them instead, and AtP itself stays what it is (0)."""
    from featcircuits.circuits.feature_edges import DISTANCE_RANKING_STEPS

    every = FeatureEdgeGraph(FeatureGraph(replacement, task, ablation="zero", metric="l2"))
    ig = every.edge_attribution(steps=DISTANCE_RANKING_STEPS).abs()
    assert ig.max() > 1e-3 and every.edge_attribution(steps=1).abs().max() < 1e-6 * ig.max()
    limited = FeatureEdgeGraph(FeatureGraph(replacement, task, ablation="zero", metric="l2"), max_edges=30)
    best = {every.edge_ids[i] for i in ig.topk(30).indices.tolist()}
    assert set(limited.edge_ids) == best


def test_feature_edges_refuse_summed_positions_and_bad_limits(replacement, task):
    with pytest.raises(ValueError, match="positions='each'"):
        find_circuit(replacement, task, "atp", level="edges", positions="sum")
    with pytest.raises(ValueError, match="max_edges=0"):
        FeatureEdgeGraph(FeatureGraph(replacement, task), max_edges=0)
    with pytest.raises(ValueError, match="max_edges limits feature edges"):
        find_circuit(replacement.model, task, "atp", level="edges", max_edges=10)
    with pytest.raises(ValueError, match=r"leaves out \['resid_pre1'\]"):
        find_circuit(replacement, task, "atp", level="edges", sites=["mlp0"])
    built = FeatureEdgeGraph(FeatureGraph(replacement, task))
    with pytest.raises(ValueError, match="built already"):
        find_circuit(replacement, task, "atp", level="edges", graph=built, max_edges=10)


def test_feature_edges_do_not_depend_on_parameter_gradients_or_dictionary_precision(task, edges):
    # frozen parameters: the first site's receivers then depend on no leaf at all; float64 dictionaries
    from featcircuits import load_model
    from featcircuits.patching.replacement import ReplacementModel

    model = load_model(TINY_GPT2_CONFIG, seed=0)
    reference = _replacement(model, (48, 40))
    dictionaries = [site.dictionary for site in reference.sites if site.dictionary is not None]
    for module in (model, *dictionaries):
        module.requires_grad_(False)
    frozen = FeatureEdgeGraph(FeatureGraph(reference, task, ablation=edges.ablation))
    assert frozen.edge_ids == edges.edge_ids
    assert torch.allclose(frozen.edge_attribution(), edges.edge_attribution(), atol=1e-6)
    double = ReplacementModel(model, [d.double() for d in dictionaries])
    wide = FeatureEdgeGraph(FeatureGraph(double, task, ablation=edges.ablation))
    assert wide.edge_ids == edges.edge_ids
    assert torch.allclose(wide.edge_attribution(), edges.edge_attribution(), atol=1e-5)
    keep = torch.ones(3, len(edges.edge_ids))
    keep[1] = 0
    keep[2, ::2] = 0
    assert torch.allclose(wide.edge_metric(keep), edges.edge_metric(keep), atol=1e-4)
