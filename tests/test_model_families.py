"""Every model family load_model reads from a local checkpoint, on tiny random checkpoints made with transformers.

First group: load_model's logits are transformers' own on the same checkpoint, the hooks carry the model's own
activations, each family's config maps its key fields, and dropping any of them would change the logits (so the
match is not an accident of the tiny configs). Second group: the library on each family's model (attribution
graphs and verify, the replacement model, component and feature circuits), checked by interventions.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import prefix_sharing_task, random_token_task
from families import FAMILIES, build_checkpoint, reference_model
from transformer_lens import HookedTransformer, HookedTransformerConfig

from featcircuits import Dictionary, DictionaryConfig, load_model
from featcircuits.models import hf_config_to_hooked_config

pytestmark = pytest.mark.usefixtures("single_torch_thread")


class Checkpoints:
    """Each family's tiny checkpoint, built once per session on first use, and its loaded model."""

    def __init__(self, root) -> None:
        self.root, self._models = root, {}

    def path(self, family: str):
        directory = self.root / family
        if not (directory / "config.json").exists():
            build_checkpoint(family, directory)
        return directory

    def model(self, family: str) -> HookedTransformer:
        if family not in self._models:
            self._models[family] = load_model(self.path(family))
        return self._models[family]


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("families"))


def _tokens(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))
    tokens[:, 0] = 1  # BOS
    return tokens


# ---- loading ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(checkpoints, family):
    hf_model = reference_model(checkpoints.path(family))
    model = checkpoints.model(family)
    tokens = _tokens()
    with torch.no_grad():
        expected, logits = hf_model(tokens).logits, model(tokens)
    assert expected.std() > 0.5  # random weights large enough for the comparison to mean something
    assert (logits - expected).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_carry_the_models_own_activations(checkpoints, family):
    """Unprocessed weights: the residual stream at the hooks is transformers' hidden state; the MLP reads
    ``ln2.hook_normalized`` times the norm's own weight (plus its bias): transformer_lens hooks the normalised
    vector before the norm's affine part, which unfolded checkpoints keep; the MLP writes exactly
    ``hook_mlp_out`` (after Gemma-2/3's post-MLP norm); a local layer attends to its window only."""
    hf_model, model = reference_model(checkpoints.path(family)), checkpoints.model(family)
    tokens = _tokens()
    with torch.no_grad():
        hidden = hf_model(tokens, output_hidden_states=True).hidden_states
        _, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], hidden[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hidden[1], atol=1e-5, rtol=1e-5)
    for layer, block in enumerate(model.blocks):
        with torch.no_grad():
            normalized = cache[f"blocks.{layer}.ln2.hook_normalized"]
            assert (block.ln2.w - 1).abs().max() > 0.1  # the norm weight is not the identity here
            mlp_in = normalized * block.ln2.w + (block.ln2.b if hasattr(block.ln2, "b") else 0.0)
            mlp_out = block.mlp(mlp_in)
            if model.cfg.use_normalization_before_and_after:
                mlp_out = block.ln2_post(mlp_out)
        torch.testing.assert_close(mlp_out, cache[f"blocks.{layer}.hook_mlp_out"], atol=1e-6, rtol=1e-6)
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, query, key]
        distance = torch.arange(12)[:, None] - torch.arange(12)[None, :]
        window = model.cfg.window_size if block.attn.attn_type == "local" else 12
        assert pattern[..., (distance >= window) | (distance < 0)].abs().max() == 0
        assert pattern[..., (distance < window) & (distance >= 0)].min() > 0
    if model.cfg.use_qk_norm:
        assert "blocks.0.attn.q_norm.hook_normalized" in cache.cache_dict
    if model.cfg.use_normalization_before_and_after:
        assert "blocks.0.ln1_post.hook_normalized" in cache.cache_dict


# what each family's config must map (from transformer_lens's convert_hf_model_config for the architecture)
EXPECTED_FIELDS = {
    "gpt2": dict(normalization_type="LN", positional_embedding_type="standard", d_mlp=128, act_fn="gelu_new",
                 original_architecture="GPT2LMHeadModel"),
    "gpt_neox": dict(normalization_type="LN", rotary_dim=4, parallel_attn_mlp=True, rotary_adjacent_pairs=False,
                     original_architecture="GPTNeoXForCausalLM"),
    "llama2": dict(n_key_value_heads=None, normalization_type="RMS", final_rms=True, gated_mlp=True,
                   use_NTK_by_parts_rope=False, original_architecture="LlamaForCausalLM"),
    "llama3": dict(n_key_value_heads=2, rotary_base=500000.0, use_NTK_by_parts_rope=True, NTK_by_parts_factor=8.0,
                   NTK_original_ctx_len=16, NTK_by_parts_low_freq_factor=1.0, NTK_by_parts_high_freq_factor=4.0),
    "mistral": dict(n_key_value_heads=2, use_local_attn=True, window_size=5, attn_types=["local", "local"],
                    n_ctx=128, original_architecture="MistralForCausalLM"),
    "qwen2": dict(n_key_value_heads=2, default_prepend_bos=False, use_qk_norm=False,
                  original_architecture="Qwen2ForCausalLM"),
    "qwen3": dict(n_key_value_heads=2, d_head=16, rotary_dim=16, use_qk_norm=True, default_prepend_bos=False,
                  original_architecture="Qwen3ForCausalLM"),
    "gemma": dict(n_key_value_heads=1, d_head=16, act_fn="gelu_pytorch_tanh", use_normalization_before_and_after=False,
                  attn_scale=4.0, original_architecture="GemmaForCausalLM"),
    "gemma2": dict(n_key_value_heads=2, attn_scores_soft_cap=2.5, output_logits_soft_cap=2.0,
                   use_normalization_before_and_after=True, use_local_attn=True, window_size=4,
                   attn_types=["local", "global"], attn_scale=math.sqrt(24), use_qk_norm=False,
                   original_architecture="Gemma2ForCausalLM"),
    "gemma3": dict(n_key_value_heads=2, use_qk_norm=True, use_normalization_before_and_after=True,
                   rotary_base=1000000.0, rotary_base_local=10000.0, rotary_scaling_factor=4.0, window_size=4,
                   attn_types=["local", "global"], attn_scale=math.sqrt(24), attn_scores_soft_cap=-1.0,
                   output_logits_soft_cap=-1.0, original_architecture="Gemma3ForCausalLM"),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_config_maps_the_key_fields(checkpoints, family):
    hf = json.loads((checkpoints.path(family) / "config.json").read_text())
    cfg = hf_config_to_hooked_config(hf)
    for field, value in EXPECTED_FIELDS[family].items():
        assert getattr(cfg, field) == pytest.approx(value) if isinstance(value, float) else getattr(cfg, field) == value, field
    assert cfg.d_vocab == 512 and cfg.n_layers == 2


def _without_embedding_scale(params, cfg):
    params["embed.W_E"] = params["embed.W_E"] / math.sqrt(cfg.d_model)


def _without_attention_biases(params, cfg):
    for name in [n for n in params if n.endswith(("attn.b_Q", "attn._b_K", "attn._b_V"))]:
        params[name] = torch.zeros_like(params[name])


# (family, what is dropped, config changes, parameter change)
DROPPED = [
    ("gpt_neox", "partial rotary", dict(rotary_dim=8), None),
    ("gpt_neox", "parallel residual", dict(parallel_attn_mlp=False), None),
    ("llama3", "llama3 rope scaling", dict(use_NTK_by_parts_rope=False), None),
    ("mistral", "sliding window", dict(use_local_attn=False, attn_types=None), None),
    ("qwen2", "attention biases", {}, _without_attention_biases),
    ("qwen3", "q/k norm", dict(use_qk_norm=False), None),
    ("gemma", "embedding scale", {}, _without_embedding_scale),
    ("gemma2", "attention soft cap", dict(attn_scores_soft_cap=-1.0), None),
    ("gemma2", "output soft cap", dict(output_logits_soft_cap=-1.0), None),
    ("gemma2", "post-attention/MLP norms", dict(use_normalization_before_and_after=False), None),
    ("gemma2", "query_pre_attn_scalar", dict(attn_scale=-1.0), None),
    ("gemma2", "alternating windows", dict(use_local_attn=False, attn_types=None), None),
    ("gemma3", "q/k norm", dict(use_qk_norm=False), None),
    ("gemma3", "local rotary base", dict(rotary_base_local=None), None),
    ("gemma3", "global rotary scaling", dict(rotary_scaling_factor=1.0), None),
    ("gemma3", "query_pre_attn_scalar", dict(attn_scale=-1.0), None),
    ("gemma3", "alternating windows", dict(use_local_attn=False, attn_types=None), None),
]


@pytest.mark.parametrize(("family", "dropped", "changes", "edit"), DROPPED,
                         ids=[f"{family}-{dropped}" for family, dropped, _, _ in DROPPED])
def test_dropping_a_mapped_detail_would_change_the_logits(checkpoints, family, dropped, changes, edit):
    model = checkpoints.model(family)
    cfg = HookedTransformerConfig.from_dict({**model.cfg.to_dict(), **changes})
    params = {name: value.detach().clone() for name, value in model.named_parameters()}
    if edit is not None:
        edit(params, cfg)
    broken = HookedTransformer(cfg, move_to_device=False).eval()
    broken.load_state_dict(params, strict=False)  # parameters only: rotary tables follow the changed config
    tokens = _tokens()
    with torch.no_grad():
        expected = reference_model(checkpoints.path(family))(tokens).logits
        assert (broken(tokens) - expected).abs().max().item() > 1e-2, dropped


def test_unsupported_checkpoints_fail_clearly(tmp_path, monkeypatch, checkpoints):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ValueError, match="multimodal Gemma3ForConditionalGeneration.*gemma3_text"):
        load_model(tmp_path)
    with pytest.raises(ValueError, match=r"model_type='mamba'.*Gemma-2 \(gemma2\).*TransformerLens name"):
        hf_config_to_hooked_config({"model_type": "mamba"})
    qwen3 = json.loads((checkpoints.path("qwen3") / "config.json").read_text())
    with pytest.raises(ValueError, match="attention_bias=True"):
        hf_config_to_hooked_config({**qwen3, "attention_bias": True})
    llama = json.loads((checkpoints.path("llama3") / "config.json").read_text())
    yarn = {**llama, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        hf_config_to_hooked_config(yarn)
    from transformer_lens.pretrained import weight_conversions

    monkeypatch.delattr(weight_conversions, "convert_qwen3_weights")
    with pytest.raises(NotImplementedError, match=r"does not support the Qwen3 family.*convert_qwen3_weights.*pip"):
        load_model(checkpoints.path("qwen3"))


# ---- the library on every family ----------------------------------------------------------------


def _dictionaries(model, kind: str, d_sae: int = 64, activation: str = "topk", k: int | None = 8, seed: int = 0):
    """Random dictionaries at every layer: transcoders (ln2.hook_normalized -> hook_mlp_out) or residual SAEs."""
    torch.manual_seed(seed)
    dictionaries = []
    for layer in range(model.cfg.n_layers):
        hooks = ((f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out") if kind == "transcoder"
                 else (f"blocks.{layer}.hook_resid_post",) * 2)
        dictionaries.append(Dictionary.from_config(DictionaryConfig(
            d_in=model.cfg.d_model, d_sae=d_sae, kind=kind, activation=activation, k=k, hook_in=hooks[0],
            hook_out=hooks[1])))
    return dictionaries


@pytest.mark.parametrize("kind", ["transcoder", "sae"])
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_verifies_exactly(checkpoints, family, kind):
    from featcircuits.graph import build_graph, verify

    model = checkpoints.model(family)
    dictionaries = _dictionaries(model, kind)
    tokens = _tokens(1)[0]
    graph = build_graph(model, dictionaries, tokens, progress=False)
    assert graph.n_features == 2 * 12 * 8  # TopK: k features at every position and layer
    result = verify(graph, n_sources=32, seed=0)
    assert result.max_rel_error <= 1e-5, result
    assert result.predicted.abs().max() > 1e-2
    # both gradient engines give the same edges (the linear one where the architecture allows it)
    by_autograd = build_graph(graph.replacement, prompt=tokens, progress=False, engine="autograd")
    torch.testing.assert_close(by_autograd.adjacency, graph.adjacency, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_replacement_model_reproduces_the_model(checkpoints, family):
    """Unpatched, the live replacement model, the live one with every site spliced (features + error), and the
    frozen one give the model's own logits (soft caps included)."""
    from featcircuits.graph import ReplacementModel

    model = checkpoints.model(family)
    replacement = ReplacementModel(model, _dictionaries(model, "transcoder"))
    tokens = _tokens(1)[0]
    spliced = {site.name: (lambda error: error) for site in replacement.sites if site.dictionary is not None}
    with torch.no_grad():
        expected = model(tokens[None])[0]
        runs = {"unpatched": replacement.run(tokens).logits[0],
                "spliced": replacement.run(tokens, errors=spliced, return_acts=True).logits[0],
                "frozen": replacement.run(tokens, clean=replacement.clean_run(tokens)).logits[0]}
    for name, logits in runs.items():
        assert (logits - expected).abs().max().item() < 1e-4, name


@pytest.mark.parametrize("family", FAMILIES)
def test_component_acdc_matches_the_one_forward_per_edge_walk(checkpoints, family):
    """Batched ACDC over edge ablations that start after the shared clean prefix (the default) keeps the circuit
    of the literal walk, one whole-model hooked forward per edge."""
    from featcircuits.circuits import ComponentGraph, acdc

    model = checkpoints.model(family)
    task = prefix_sharing_task(model)
    graph = ComponentGraph(model, task, ablation="patch")
    plain = ComponentGraph(model, task, ablation="patch", skip_clean_prefix=False)
    n_edges = len(graph.edge_ids)
    keep = (torch.rand(6, n_edges, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    expected = plain.edge_metric(keep)
    assert expected.std() > 1e-2
    torch.testing.assert_close(graph.edge_metric(keep), expected, atol=1e-5, rtol=1e-5)
    order = list(reversed(range(n_edges)))
    literal = acdc(plain.edge_metric, order, n_edges, tau=0.05, batch_size=1)
    batched = acdc(graph.edge_metric, order, n_edges, tau=0.05, batch_size=64)
    assert torch.equal(batched.keep, literal.keep) and batched.forwards < literal.forwards


@pytest.mark.parametrize("family", FAMILIES)
def test_component_edge_atp_is_the_derivative_of_a_real_intervention(checkpoints, family):
    from featcircuits.circuits import ComponentGraph

    model = checkpoints.model(family)
    task = prefix_sharing_task(model)
    scores = ComponentGraph(model, task, ablation="patch").edge_attribution()
    plain = ComponentGraph(model, task, ablation="patch", skip_clean_prefix=False)
    picks = scores.abs().argsort(descending=True)[:3]
    eps = 1e-3
    masks = torch.ones(len(picks), len(plain.edge_ids))
    masks[torch.arange(len(picks)), picks] = 1 - eps
    slope = (plain.edge_metric(masks) - plain.full_metric) / eps
    torch.testing.assert_close(slope, scores[picks], rtol=0.05, atol=2e-3)
    # with exact receivers, edges into the logits score their exact effect (through Gemma-2's output soft cap)
    into_logits = torch.tensor([i for i, (_, receiver) in enumerate(plain.edge_ids) if receiver == "logits"])
    masks = torch.ones(len(into_logits), len(plain.edge_ids))
    masks[torch.arange(len(into_logits)), into_logits] = 0
    measured = plain.edge_metric(masks) - plain.full_metric
    assert measured.abs().max() > 1e-2
    exact = plain.edge_attribution(receivers="exact")[into_logits]
    torch.testing.assert_close(exact, measured, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_atp_and_clean_prefix_ablations(checkpoints, family):
    """Feature AtP is the slope of a real intervention; feature ablations that run only the positions after the
    clean prefix (the default) match whole-prompt runs."""
    from featcircuits.circuits import FeatureGraph
    from featcircuits.graph import ReplacementModel

    model = checkpoints.model(family)
    replacement = ReplacementModel(model, _dictionaries(model, "transcoder"))
    task = prefix_sharing_task(model)
    graph = FeatureGraph(replacement, task, ablation="patch")
    scores = graph.node_attribution()
    picks = scores.abs().argsort(descending=True)[:3]
    eps = 1e-3
    masks = torch.ones(len(picks), len(graph.node_ids))
    masks[torch.arange(len(picks)), picks] = 1 - eps
    slope = (graph.node_metric(masks) - graph.full_metric) / eps
    torch.testing.assert_close(slope, scores[picks], rtol=0.05, atol=2e-3)
    whole = FeatureGraph(replacement, task, ablation="patch", skip_clean_prefix=False)
    keep = (torch.rand(6, len(graph.node_ids), generator=torch.Generator().manual_seed(3)) > 0.5).float()
    expected = whole.node_metric(keep)
    assert expected.std() > 1e-2
    torch.testing.assert_close(graph.node_metric(keep), expected, atol=1e-5, rtol=1e-5)


def _feature_edge_acdc_matches_the_literal_walk(model, activation: str, k: int | None, d_sae: int, n_pairs: int,
                                                length: int):
    from featcircuits.circuits import acdc, find_circuit
    from featcircuits.graph import ReplacementModel

    replacement = ReplacementModel(model, _dictionaries(model, "transcoder", d_sae=d_sae, activation=activation, k=k))
    task = random_token_task(model, n_pairs, length, 2)
    circuit = find_circuit(replacement, task, "acdc", level="edges", tau=0.02, ablation="patch")
    graph = circuit.graph
    n_edges = len(graph.edge_ids)
    literal = acdc(graph.edge_metric, list(reversed(range(n_edges))), n_edges, tau=0.02, batch_size=1)
    chosen = {graph.edge_ids[i] for i in literal.keep.nonzero()[:, 0].tolist()}
    assert 0 < len(chosen) < n_edges
    assert set(map(tuple, circuit.edges)) == chosen


@pytest.mark.parametrize("family", FAMILIES)
def test_feature_edge_acdc_matches_the_one_forward_per_edge_walk(checkpoints, family):
    _feature_edge_acdc_matches_the_literal_walk(checkpoints.model(family), "relu", None, d_sae=4, n_pairs=1,
                                                length=3)


def test_feature_edge_acdc_with_topk_transcoders_matches_the_literal_walk(checkpoints):
    _feature_edge_acdc_matches_the_literal_walk(checkpoints.model("gpt2"), "topk", 2, d_sae=8, n_pairs=2,
                                                length=4)


@pytest.mark.parametrize("ablation", ["patch", "mean"])
@pytest.mark.parametrize("family", FAMILIES)
def test_component_and_feature_paths_give_one_metric_for_one_ablation(checkpoints, family, ablation):
    """Ablating every MLP (and one head) through component nodes and through the replacement model's nodes
    (no dictionaries: each MLP's whole output is its error node; heads as components) is one intervention, so
    both engines must report one metric, unequal prompt lengths included."""
    from featcircuits.circuits import ComponentGraph, FeatureGraph
    from featcircuits.patching.replacement import ReplacementModel

    model = checkpoints.model(family)
    task = prefix_sharing_task(model)
    components = ComponentGraph(model, task, ablation=ablation)
    keep = torch.ones(1, len(components.node_ids))
    keep[0, [i for i, node in enumerate(components.node_ids) if node.endswith(".MLP")]] = 0.0
    features = FeatureGraph(ReplacementModel(model, []), task, ablation=ablation, positions="sum")
    assert features.full_metric == pytest.approx(components.full_metric, abs=1e-4)
    through_components = float(components.node_metric(keep)[0])
    through_features = float(features.node_metric(torch.zeros(1, len(features.node_ids)))[0])
    assert through_features == pytest.approx(through_components, abs=1e-4)
    assert abs(through_components - components.full_metric) > 1e-3  # the ablation does something
