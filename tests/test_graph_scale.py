"""build_graph at scale: what embedding nodes carry (by intervention), chunked influence ranking, offloading,
sparse saves, and the bad inputs of capped graphs."""

from __future__ import annotations

import pytest
import torch

from featcircuits.graph import AttributionGraph, GraphTooLargeError, ReplacementModel, build_graph, verify
from featcircuits.graph.attribution_graph import EMBEDDING, ERROR, FEATURE, TARGET
from featcircuits.graph.influence import normalize_adjacency, partial_influence
from tests.conftest import relu_transcoders

TOKENS = [5, 17, 3, 42, 8, 61, 23, 11]


@pytest.fixture(scope="module")
def gpt2_graph(tiny_gpt2):
    """A full graph of the tiny learned-position (GPT-2 style) model."""
    torch.manual_seed(0)
    rm = ReplacementModel(tiny_gpt2, relu_transcoders(tiny_gpt2, d_sae=48, bias=-0.2))
    return build_graph(rm, prompt=TOKENS, progress=False)


def _receiver_values(graph: AttributionGraph, out) -> torch.Tensor:
    """``[batch, n_receivers]``: every feature pre-activation and target value of a frozen run's output."""
    columns = []
    for kind, site, pos, index in graph.node_keys.tolist():
        if kind == FEATURE:
            columns.append(out.pre_acts[graph.sites[site]][:, pos, index])
        elif kind == TARGET:
            target = graph.targets[index]
            columns.append(out.final[:, pos] @ target.vector + target.bias)
    return torch.stack(columns, dim=1)


def _receivers(graph: AttributionGraph) -> torch.Tensor:
    return ((graph.node_keys[:, 0] == FEATURE) | (graph.node_keys[:, 0] == TARGET)).nonzero().squeeze(1)


@torch.no_grad()
def test_embedding_edges_carry_token_and_position_embedding_by_intervention(gpt2_graph):
    graph, rm, clean = gpt2_graph, gpt2_graph.replacement, gpt2_graph.clean
    n_pos = clean.n_pos
    receivers = _receivers(graph)
    embed_cols = graph.mask(EMBEDDING).nonzero().squeeze(1)
    edges = graph.adjacency[receivers][:, embed_cols]  # [receivers, pos]
    token_part = rm.model.W_E[clean.tokens].detach()  # what circuit-tracer's token node holds
    position_part = rm.model.W_pos[:n_pos].detach()
    torch.testing.assert_close(clean.embeddings, token_part + position_part)
    # rows 1..n_pos remove the whole embedding at one position, rows n_pos+1.. only its token part
    batch = 2 * n_pos + 1
    embeddings = clean.embeddings.expand(batch, -1, -1).clone()
    positions = torch.arange(n_pos)
    embeddings[1 + positions, positions] = 0
    embeddings[1 + n_pos + positions, positions] -= token_part
    out = rm.run(clean.tokens, clean=clean, embeddings=embeddings, batch_size=batch, return_acts=True,
                 compute_logits=False)
    values = _receiver_values(graph, out)
    whole = (values[:1] - values[1:1 + n_pos]).T  # effect of each whole embedding vector
    token_only = (values[:1] - values[1 + n_pos:]).T
    scale = edges.abs().max()
    assert float((whole - edges).abs().max()) <= 1e-5 * scale  # our edge is the whole vector's effect
    # the token part alone (circuit-tracer's edge) misses the position part, which is not small here
    assert float((token_only - edges).abs().max()) > 0.05 * scale


@torch.no_grad()
def test_incoming_edges_sum_to_the_receiver_minus_its_value_without_sources(gpt2_graph):
    """Completeness of the frozen model's affine map: features, errors and (whole) embeddings account for
    every receiver exactly. With token-only embedding nodes the position part would be left over."""
    graph, rm, clean = gpt2_graph, gpt2_graph.replacement, gpt2_graph.clean
    names = [site.name for site in rm.sites]
    zeros = {name: torch.zeros_like(clean.errors[name]) for name in names}
    features = {name: torch.zeros_like(clean.feature_acts[name]) for name in names if name in clean.feature_acts}
    out = rm.run(clean.tokens, clean=clean, feature_acts=features, errors=zeros,
                 embeddings=torch.zeros_like(clean.embeddings), batch_size=1, return_acts=True, compute_logits=False)
    clean_out = rm.run(clean.tokens, clean=clean, batch_size=1, return_acts=True, compute_logits=False)
    receivers = _receivers(graph)
    explained = graph.adjacency[receivers].sum(dim=1)
    actual = (_receiver_values(graph, clean_out) - _receiver_values(graph, out))[0]
    torch.testing.assert_close(explained, actual, atol=2e-5, rtol=1e-4)


def test_chunked_partial_influence_matches_the_dense_series():
    torch.manual_seed(0)
    n_targets, n_rows, n_cols = 2, 9, 30
    rows = torch.randn(n_rows, n_cols) * (torch.rand(n_rows, n_cols) < 0.4)
    row_node = torch.tensor([-1, -1, 3, 7, 0, 12, 5, 20, 9])
    rows[:, 20:] = 0  # the columns the feature at 20 sends from stay empty; no cycles: a row only reads lower nodes
    for row, node in enumerate(row_node.tolist()):
        if node >= 0:
            rows[row, node:] = 0
    weights = torch.tensor([0.7, 0.3])
    # dense reference: influence = sum over steps of the weights pushed through the normalised rows
    normalized = normalize_adjacency(rows)
    current = torch.zeros(n_rows)
    current[:n_targets] = weights
    expected = torch.zeros(n_cols)
    for _ in range(n_rows + 1):
        step = current @ normalized
        expected += step
        current = torch.where(row_node >= 0, step[row_node.clamp(min=0)], torch.zeros(n_rows))
    # rows of a node only read lower nodes, so the node index orders them: targets highest
    level = torch.where(row_node >= 0, row_node, torch.full_like(row_node, n_cols))
    for chunk in (1, 7, 10**6):  # one row per chunk, a few rows, everything at once
        torch.testing.assert_close(partial_influence(rows, row_node, weights, chunk_entries=chunk * n_cols),
                                   expected)
        torch.testing.assert_close(partial_influence(rows, row_node, weights, chunk_entries=chunk * n_cols,
                                                     row_level=level), expected)


def test_offload_to_cpu_gives_the_same_graph_and_puts_weights_back(gpt2_graph):
    rm = gpt2_graph.replacement
    before = {name: tensor.data_ptr() for name, tensor in rm.model.named_parameters()}
    capped = build_graph(rm, prompt=TOKENS, max_feature_nodes=40, batch_size=16, progress=False)
    offloaded = build_graph(rm, prompt=TOKENS, max_feature_nodes=40, batch_size=16, progress=False, offload="cpu")
    assert offloaded.node_ids == capped.node_ids
    torch.testing.assert_close(offloaded.adjacency, capped.adjacency, atol=0, rtol=0)
    assert all(tensor.device.type == "cpu" for tensor in rm.model.parameters())
    assert {name: tensor.data_ptr() for name, tensor in rm.model.named_parameters()} == before  # nothing moved
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        build_graph(rm, prompt=TOKENS, offload="disk", progress=False)
    with pytest.raises(ValueError, match="needs the linear engine"):
        build_graph(rm, prompt=TOKENS, offload="cpu", engine="autograd", progress=False)


def test_capped_graph_rows_match_the_full_graph_and_verify(gpt2_graph):
    capped = build_graph(gpt2_graph.replacement, prompt=TOKENS, max_feature_nodes=25, batch_size=8,
                         update_interval=1, progress=False)
    assert capped.n_features == 25 < capped.n_active_features == gpt2_graph.n_features
    full_ids = gpt2_graph.node_ids
    index = torch.tensor([full_ids.index(i) for i in capped.node_ids])
    torch.testing.assert_close(capped.adjacency, gpt2_graph.adjacency[index][:, index])
    assert verify(capped, n_sources=12).max_rel_error <= 1e-5


def test_sparse_save_round_trips_and_is_smaller_for_sparse_graphs(gpt2_graph, tmp_path):
    dense_files = gpt2_graph.save(tmp_path / "dense")
    sparse_files = gpt2_graph.save(tmp_path / "sparse", sparse=True)
    loaded = AttributionGraph.load(tmp_path / "sparse", model=gpt2_graph.replacement)
    assert loaded.node_ids == gpt2_graph.node_ids
    torch.testing.assert_close(loaded.adjacency, gpt2_graph.adjacency, atol=0, rtol=0)
    assert verify(loaded, n_sources=6).max_rel_error <= 1e-5
    density = gpt2_graph.n_edges / gpt2_graph.n_nodes**2
    assert density < 0.25  # error and embedding rows are empty
    assert sparse_files[0].stat().st_size < dense_files[0].stat().st_size


def test_bad_caps_fail_clearly(gpt2_graph, tiny_gpt2):
    rm = gpt2_graph.replacement
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="max_feature_nodes must be a whole number of at least 1"):
            build_graph(rm, prompt=TOKENS, max_feature_nodes=bad, progress=False)
    with pytest.raises(ValueError, match="update_interval must be"):
        build_graph(rm, prompt=TOKENS, update_interval=0, progress=False)
    everything = build_graph(rm, prompt=TOKENS, max_feature_nodes=10**6, progress=False)  # more than active: all
    assert everything.n_features == everything.n_active_features == gpt2_graph.n_features
    silent = ReplacementModel(tiny_gpt2, relu_transcoders(tiny_gpt2, d_sae=48, bias=-1e4))
    with pytest.raises(ValueError, match="activates no feature of the 2 dictionaries"):
        build_graph(silent, prompt=TOKENS, progress=False)


def test_over_budget_even_with_the_cap_names_the_largest_cap_that_fits(gpt2_graph):
    import re

    rm = gpt2_graph.replacement
    n_active = gpt2_graph.n_features
    with pytest.raises(GraphTooLargeError, match=r"max_feature_nodes=\d+ fits") as error:
        build_graph(rm, prompt=TOKENS, max_feature_nodes=n_active - 1, memory_budget_gb=0.002, progress=False)
    message = str(error.value)
    assert f"{n_active} active features, {n_active - 1} kept" in message
    fits = int(re.search(r"max_feature_nodes=(\d+) fits", message).group(1))
    assert 1 <= fits < n_active - 1
    assert build_graph(rm, prompt=TOKENS, max_feature_nodes=fits, memory_budget_gb=0.002,
                       progress=False).n_features == fits
    with pytest.raises(GraphTooLargeError, match="Not even one feature node fits"):
        build_graph(rm, prompt=TOKENS, max_feature_nodes=5, memory_budget_gb=1e-7, progress=False)


def test_no_dense_square_over_the_active_set_is_allocated(gpt2_graph, monkeypatch):
    """With a cap, no tensor of ``n_active * n_active`` or more entries is created (rows and the final
    adjacency are over the kept nodes)."""
    n_active = gpt2_graph.n_features
    n_cols = n_active + (len(gpt2_graph.sites) + 1) * gpt2_graph.clean.n_pos
    biggest = []
    original = torch.zeros

    def recording(*size, **kwargs):
        tensor = original(*size, **kwargs)
        biggest.append(tensor.numel())
        return tensor

    import featcircuits.graph.attribution as attribution

    monkeypatch.setattr(attribution.torch, "zeros", recording)
    capped = build_graph(gpt2_graph.replacement, prompt=TOKENS, max_feature_nodes=20, batch_size=8, progress=False)
    monkeypatch.undo()
    n_final = capped.n_nodes
    assert max(biggest) <= max((20 + len(capped.targets)) * n_cols, n_final * n_final) < n_active * n_active
    assert capped.count(ERROR) == len(gpt2_graph.sites) * gpt2_graph.clean.n_pos
