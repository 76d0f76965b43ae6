"""End to end on stories260k: build_graph -> viewer (through the AttributionGraph adapter) + dashboards,
opened in headless Chromium. Cross-checks the graph's node activations against the dashboards' keys."""

from __future__ import annotations

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.viz import compute_dashboards, write_viewer
from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.graph_data import load_graph_json

PROMPT = "Once upon a time, there was a little girl named Lily."


@pytest.fixture(scope="module")
def real_graph(stories_model):
    from featcircuits.graph import build_graph, prune_graph

    torch.manual_seed(0)
    transcoders = [Dictionary.from_config(DictionaryConfig(
        d_in=64, d_sae=24, d_out=64, kind="transcoder", hook_in=f"blocks.{layer}.ln2.hook_normalized",
        hook_out=f"blocks.{layer}.hook_mlp_out", layer=layer)) for layer in range(2)]
    graph = build_graph(stories_model, transcoders, PROMPT, max_feature_nodes=40, progress=False)
    kept = int(prune_graph(graph, 0.8, 0.98).node_mask.sum())
    return graph, transcoders, kept


def test_graph_nodes_match_dashboard_entries(stories_model, real_graph):
    graph, transcoders, kept = real_graph
    data = load_graph_json(graph)  # the AttributionGraph adapter: the graph module's own export
    assert len(data["nodes"]) == kept
    tokens = stories_model.to_tokens(PROMPT)
    dashboards = compute_dashboards(stories_model, transcoders, tokens, k=tokens.shape[1], skip_bos=False)
    features = [node for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"]
    assert features
    for node in features:
        # the dashboards' key uses the index within the layer's dictionary (node_id's middle part); "feature" is
        # circuit-tracer's global cantor(layer, index)
        entry = dashboards.features[f"{node['layer']}_{node['node_id'].split('_')[1]}"]
        # The prompt is the whole dataset and k covers every position, so this node's activation on the
        # prompt is one of its feature's top activations.
        acts = [context["act"] for context in entry["top_contexts"]]
        assert min(abs(act - node["activation"]) for act in acts) < 1e-4 * max(1.0, node["activation"])


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")
def test_real_graph_in_the_browser(stories_model, real_graph, tmp_path):
    graph, transcoders, kept = real_graph
    tokens = stories_model.to_tokens(PROMPT)
    dashboards = compute_dashboards(stories_model, transcoders, tokens, k=5)
    page = write_viewer(graph, tmp_path / "graph.html", dashboards=dashboards)
    data = load_graph_json(graph)
    feature = max((node for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"
                   and node["ctx_idx"] > 0), key=lambda node: node["activation"])
    with HeadlessChromium(width=1400, height=900) as browser:
        browser.open(page)
        assert browser.evaluate("document.querySelectorAll('#fc-graph .fc-node').length") == kept
        browser.click(f'.fc-node[data-node-id="{feature["node_id"]}"]')
        entry = dashboards.features[f"{feature['layer']}_{feature['node_id'].split('_')[1]}"]
        shown = browser.evaluate("[document.getElementById('fc-card').dataset.nodeId,"
                                 " document.querySelectorAll('#fc-card .fc-context').length,"
                                 " document.getElementById('fc-card').innerText]")
        assert shown[0] == feature["node_id"] and shown[1] == len(entry["top_contexts"]) > 0
        assert f"{feature['activation']:.3f}" in shown[2]
        browser.screenshot(tmp_path / "graph.png")
        assert browser.errors == [] and browser.dialogs == []
