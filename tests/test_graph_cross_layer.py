"""Cross-layer transcoders spliced into the replacement model, in graphs, direct effects and circuits.

Expectations come from outside the replacement model: the original model (unpatched runs), a splice written out
here with plain TransformerLens hooks and the CLT's own ``encode_layer``/``decode_layer`` (tested against a
hand-written loop in test_cross_layer_transcoder.py), a frozen model written out here with the clean run's
attention patterns and norm scales fixed by hooks, interventions (``verify``) and the autograd engine.
benchmarks/graph_vs_circuit_tracer.py --clt compares the adjacency with circuit-tracer's for the same CLT.
"""

from __future__ import annotations

import pytest
import torch

from featcircuits.circuits import ContrastiveTask, FeatureGraph, evaluate, find_circuit
from featcircuits.dictionaries import CrossLayerTranscoder, Dictionary, DictionaryConfig
from featcircuits.graph import build_graph, verify
from featcircuits.patching.direct_effects import DirectEffects
from featcircuits.patching.replacement import ReplacementModel
from featcircuits.pipeline.demo import _names_pairs

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"


def random_clt(model, d_sae: int = 48, bias: float = -0.2, seed: int = 0, norm_scale: float = 1.3,
               activation: str = "relu") -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=d_sae, kind="cross_layer_transcoder",
                           n_layers=model.cfg.n_layers, activation=activation,
                           k=8 if activation == "topk" else None, hook_in="blocks.{layer}.ln2.hook_normalized",
                           hook_out="blocks.{layer}.hook_mlp_out", norm_scale=norm_scale)
    clt = Dictionary.from_config(cfg)
    assert isinstance(clt, CrossLayerTranscoder)
    with torch.no_grad():
        clt.W_dec.mul_(0.5)
        clt.b_enc.fill_(bias)
        clt.b_dec.normal_(0, 0.05)
    return clt


def hand_splice_hooks(clt: CrossLayerTranscoder, n_layers: int, errors: dict[int, torch.Tensor] | None = None,
                      acts_edit=None):
    """Plain hooks: layer L's latents from ln2 at L; MLP output M := decode_layer of layers 0..M (+ error M)."""
    acts: dict[int, torch.Tensor] = {}

    def read(layer):
        def hook(x, hook):
            acts[layer] = clt.encode_layer(x, layer)
            if acts_edit is not None:
                acts[layer] = acts_edit(layer, acts[layer])
            return x
        return hook

    def write(layer):
        def hook(x, hook):
            out = clt.decode_layer(torch.stack([acts[j] for j in range(layer + 1)], dim=-2), layer)
            return out + errors[layer] if errors is not None else out
        return hook

    hooks = []
    for layer in range(n_layers):
        hooks += [(f"blocks.{layer}.ln2.hook_normalized", read(layer)), (f"blocks.{layer}.hook_mlp_out", write(layer))]
    return hooks


@pytest.fixture(scope="module")
def clt_rm(stories_model, single_torch_thread):
    return ReplacementModel(stories_model, [random_clt(stories_model)])


def test_one_site_per_mlp_and_the_clt_once(clt_rm, stories_model):
    assert [s.name for s in clt_rm.sites] == [f"mlp{layer}" for layer in range(stories_model.cfg.n_layers)]
    assert len(clt_rm.dictionaries) == 1 and isinstance(clt_rm.dictionaries[0], CrossLayerTranscoder)
    assert clt_rm.sources_into(3) == [0, 1, 2, 3] and clt_rm.outputs_of(1) == [1, 2, 3, 4]


def test_live_and_frozen_runs_reproduce_the_model(clt_rm, stories_model):
    tokens = clt_rm.to_tokens(PROMPT)
    reference = stories_model(tokens[None])
    identity = {s.name: (lambda e: e) for s in clt_rm.sites}  # patched: every output rebuilt from its parts
    assert (clt_rm.run(tokens, errors=identity).logits - reference).abs().max() < 1e-4
    assert (clt_rm.run(tokens, clean=clt_rm.clean_run(tokens)).logits - reference).abs().max() < 1e-4


def test_error_free_live_run_is_the_hand_splice(clt_rm, stories_model):
    tokens = clt_rm.to_tokens(PROMPT)
    clt = clt_rm.cross_layer
    reference = stories_model.run_with_hooks(tokens[None], fwd_hooks=hand_splice_hooks(clt, 5))
    zeroed = {s.name: (lambda e: torch.zeros_like(e)) for s in clt_rm.sites}
    out = clt_rm.run(tokens, errors=zeroed, return_acts=True)
    assert (out.logits - reference).abs().max() < 1e-4
    # a feature ablated at layer 1 changes every later MLP output, as the hand splice says
    def ablate(layer, acts):
        return acts * 0 if layer == 1 else acts

    ablated = stories_model.run_with_hooks(tokens[None], fwd_hooks=hand_splice_hooks(clt, 5, acts_edit=ablate))
    out = clt_rm.run(tokens, errors=zeroed, feature_acts={"mlp1": lambda a: a * 0})
    assert (out.logits - ablated).abs().max() < 1e-4
    assert (ablated - reference).abs().max() > 1e-2  # the ablation matters


def test_frozen_run_is_the_hand_written_frozen_model(clt_rm, stories_model):
    tokens = clt_rm.to_tokens(PROMPT)
    clean = clt_rm.clean_run(tokens)
    clt = clt_rm.cross_layer
    names = [s.name for s in clt_rm.sites]
    double = torch.zeros(tokens.numel(), clt.cfg.d_sae)
    double[3:7] = 1.0
    patch = {"mlp0": clean.feature_acts["mlp0"] * (1 + double), "mlp2": clean.feature_acts["mlp2"] * 0.5}
    out = clt_rm.run(tokens, clean=clean, feature_acts=patch)
    # by hand: patterns and scales held at the clean run's, MLP M = sum_{L<=M} patched acts_L @ W_dec + clean error
    fixed = [(name, (lambda v: lambda x, hook: v)(value)) for name, value in {**clean.patterns, **clean.scales}.items()]
    errors = {layer: clean.errors[names[layer]] for layer in range(5)}

    def edit(layer, acts):
        return patch[names[layer]][None] if names[layer] in patch else clean.feature_acts[names[layer]][None]

    reference = stories_model.run_with_hooks(tokens[None], fwd_hooks=fixed + hand_splice_hooks(clt, 5, errors, edit))
    assert (out.logits - reference).abs().max() < 1e-4


@pytest.mark.parametrize("capped", [False, True])
def test_graph_is_exact_and_engines_agree(clt_rm, capped):
    cap = 150 if capped else None
    graph = build_graph(clt_rm, prompt=PROMPT, progress=False, max_feature_nodes=cap, engine="linear")
    assert graph.n_features == (150 if capped else graph.n_active_features)
    result = verify(graph, n_sources=24)
    assert result.max_abs_error < 1e-5, result
    auto = build_graph(clt_rm, prompt=PROMPT, progress=False, max_feature_nodes=cap, engine="autograd")
    assert torch.equal(auto.node_keys, graph.node_keys)
    assert (auto.adjacency - graph.adjacency).abs().max() < 1e-5


def test_cross_layer_edges_by_hand(clt_rm):
    """A layer-0 feature's edge to a logit target sums its writes into every MLP output, each through the
    gradient at that output: (d target / d output_M) . a W_dec_0[f, M]."""
    graph = build_graph(clt_rm, prompt=PROMPT, progress=False, engine="linear", max_n_logits=1)
    clean, clt = graph.clean, clt_rm.cross_layer
    keys = graph.node_keys
    feature = int(((keys[:, 0] == 0) & (keys[:, 1] == 0)).nonzero()[0])
    _, _, pos, fid = keys[feature].tolist()
    target = graph.targets[0]
    deltas = {s.name: torch.zeros(1, clean.n_pos, clt_rm.cfg.d_model, requires_grad=True) for s in clt_rm.sites}
    out = clt_rm.run(clean.tokens, clean=clean, output_deltas=deltas, compute_logits=False)
    value = out.final[0, target.pos] @ target.vector
    grads = torch.autograd.grad(value, list(deltas.values()))
    grads = [grad.detach() for grad in grads]
    act = clean.feature_acts["mlp0"][pos, fid]
    decoders = clt.decoder(0).detach()[fid] * act / clt.cfg.norm_scale  # [5, d_model]
    expected = sum(float(grads[m][0, pos] @ decoders[m]) for m in range(5))
    own_only = float(grads[0][0, pos] @ decoders[0])
    row = int((keys[:, 0] == 3).nonzero()[0])
    assert graph.adjacency[row, feature].item() == pytest.approx(expected, abs=1e-5)
    assert abs(expected - own_only) > 1e-4  # the later layers' writes are in the edge


def test_graph_on_a_gpt2_style_model_with_an_sae(tiny_gpt2, single_torch_thread):
    clt = random_clt(tiny_gpt2, d_sae=32, bias=-0.1, seed=1, norm_scale=1.0, activation="topk")
    sae_cfg = DictionaryConfig(d_in=tiny_gpt2.cfg.d_model, d_sae=24, kind="sae", activation="relu",
                               hook_in="blocks.1.hook_attn_out")
    sae = Dictionary.from_config(sae_cfg)
    with torch.no_grad():
        sae.b_enc.fill_(-0.05)
    rm = ReplacementModel(tiny_gpt2, [clt, sae])
    graph = build_graph(rm, prompt=torch.arange(1, 12), progress=False)
    assert {int(s) for s in graph.node_keys[graph.node_keys[:, 0] == 0, 1].unique()} >= {0, 1, 2}
    assert verify(graph, n_sources=24).max_abs_error < 1e-5


def test_direct_effects_engines_agree(clt_rm):
    clean = clt_rm.clean_run(PROMPT)
    receivers = (torch.tensor([4, 3, 2]), torch.tensor([5, 8, 9]), torch.tensor([1, 2, 3]))
    linear = DirectEffects(clt_rm, clean, engine="linear").grads(receivers)
    auto = DirectEffects(clt_rm, clean, engine="autograd").grads(receivers)
    for name in ("mlp0", "mlp1", "error:mlp2"):
        assert (linear[name] - auto[name]).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:Error nodes carry")  # random latents: the errors carry the task
def test_feature_circuit_with_a_clt(clt_rm, stories_model):
    pairs = _names_pairs(stories_model)[:4]
    task = ContrastiveTask.from_pairs(stories_model, pairs)
    graph = FeatureGraph(clt_rm, task, ablation="patch", positions="each")
    everything = find_circuit(clt_rm, task, method="atp", top_fraction=1.0, errors="keep", graph=graph)
    assert evaluate(everything)["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    circuit = find_circuit(clt_rm, task, method="atp", top_fraction=0.1, errors="ablate", graph=graph)
    counts = circuit.counts()
    assert counts["errors"] == 0 and counts["features"] >= 1


def test_bad_sets_are_refused(stories_model, tiny_gpt2):
    clt = random_clt(stories_model)
    with pytest.raises(ValueError, match="spans 5 layers but the model has 2"):
        ReplacementModel(tiny_gpt2, [random_clt(stories_model, d_sae=8)])
    transcoder = Dictionary.from_config(DictionaryConfig(
        d_in=64, d_sae=8, kind="transcoder", hook_in="blocks.2.ln2.hook_normalized", hook_out="blocks.2.hook_mlp_out"))
    with pytest.raises(ValueError, match="already reconstructs"):
        ReplacementModel(stories_model, [clt, transcoder])
    with pytest.raises(ValueError, match="decode the whole CLT"):
        ReplacementModel(stories_model, [clt]).sites[1].dictionary.decode(torch.zeros(48))


def test_feature_edges_of_a_clt_are_their_ablations(tiny_gpt2, single_torch_thread):
    """Removing every edge out of a CLT feature (which writes into both MLP outputs) equals ablating that
    feature in the local replacement model, iterated to a fixed point with frozen runs."""
    from test_circuits_feature_edges import _local_model_with_node_ablated

    from featcircuits.circuits import FeatureEdgeGraph

    rm = ReplacementModel(tiny_gpt2, [random_clt(tiny_gpt2, d_sae=24, bias=-0.1, seed=2)])
    generator = torch.Generator().manual_seed(1)
    pairs = [{"clean": torch.randint(0, 97, (5,), generator=generator).tolist(),
              "corrupt": torch.randint(0, 97, (5,), generator=generator).tolist(),
              "answer": 3, "distractor": 5} for _ in range(2)]
    edges = FeatureEdgeGraph(FeatureGraph(rm, ContrastiveTask.from_pairs(tiny_gpt2, pairs), ablation="patch"))
    senders = edges._edge_sender
    layer0 = [i for i in sorted(set(senders.tolist())) if edges.node_ids[i].startswith("mlp0:")
              and ":error" not in edges.node_ids[i]]
    moved = 0.0
    for node in (layer0[0], layer0[len(layer0) // 2], layer0[-1]):
        with torch.no_grad():
            measured = edges.edge_metric((senders != node).float()[None]).item()
            expected = _local_model_with_node_ablated(edges, node)
        assert measured == pytest.approx(expected, abs=1e-5), edges.node_ids[node]
        moved = max(moved, abs(expected - edges.full_metric))
    assert moved > 1e-4
