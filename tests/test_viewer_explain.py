"""The viewer shows what the explain tools measured: labels, each node's measured ablation effect, supernodes
(a button that highlights its members) and a search box, checked in headless Chromium."""

from __future__ import annotations

import pytest
import torch
from conftest import relu_transcoders

from featcircuits.explain import group_supernodes, measure_node_effects
from featcircuits.graph import build_graph, write_circuit_tracer_json
from featcircuits.patching.replacement import ReplacementModel
from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.viewer import viewer_payload, write_viewer

PROMPT = "Once upon a time, there was a little girl named Lily. She liked to"


@pytest.fixture(scope="module")
def explained_graph(stories_model, tmp_path_factory):
    transcoders = relu_transcoders(stories_model, d_sae=32, bias=-0.3)
    with torch.no_grad():  # a duplicated feature: a supernode to find
        transcoders[1].W_enc[:, 1] = transcoders[1].W_enc[:, 0]
        transcoders[1].b_enc[1] = transcoders[1].b_enc[0] * 1.1
        transcoders[1].W_dec[1] = 0.9 * transcoders[1].W_dec[0]
    graph = build_graph(ReplacementModel(stories_model, transcoders), prompt=PROMPT, progress=False)
    effects = measure_node_effects(graph, n_nodes=12)
    supernodes = group_supernodes(graph)
    path = tmp_path_factory.mktemp("explained") / "graph.json"
    write_circuit_tracer_json(graph, path, node_threshold=1.0, edge_threshold=1.0, supernodes=supernodes,
                              labels={"1_0": "the duplicated one"})
    return path, effects, supernodes


def test_the_payload_carries_effects_supernodes_and_labels(explained_graph):
    path, effects, supernodes = explained_graph
    payload = viewer_payload(path)
    with_effect = [node for node in payload["nodes"] if node["ablation_effect"] is not None]
    assert len(with_effect) == len(effects)
    assert [group["name"] for group in payload["supernodes"]] == [s.name for s in supernodes]
    assert any(node["label"] == "the duplicated one" for node in payload["nodes"])


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")
def test_search_supernodes_and_effect_cards_in_the_page(explained_graph, tmp_path):
    path, effects, supernodes = explained_graph
    payload = viewer_payload(path)
    page = write_viewer(path, tmp_path / "graph.html")
    with HeadlessChromium(width=1280, height=860) as browser:
        browser.open(page)
        browser.evaluate("(() => { const s = document.getElementById('fc-search'); s.value = 'duplicated';"
                         " s.dispatchEvent(new Event('input')); })()")
        expected = sum("duplicated" in node["label"].lower() or "duplicated" in node["id"].lower()
                       for node in payload["nodes"])
        assert expected > 0
        assert browser.evaluate("document.getElementById('fc-search-count').dataset.matches") == str(expected)
        assert browser.evaluate("document.querySelectorAll('.fc-node[data-node-id].fc-match').length") == expected
        browser.click('.fc-supernode[data-supernode="0"]')  # expands the supernode and highlights its members
        assert browser.evaluate("document.querySelectorAll('.fc-node[data-node-id].fc-match').length") == \
            len(payload["supernodes"][0]["members"])
        hidden = {m for group in payload["supernodes"][1:] for m in group["members"]}  # still collapsed
        measured = next(node for index, node in enumerate(payload["nodes"])
                        if node["ablation_effect"] is not None and index not in hidden)
        browser.click(f'.fc-node[data-node-id="{measured["id"]}"]')
        text = browser.evaluate("document.getElementById('fc-card').innerText")
        assert "ablation effect" in text and f"{measured['ablation_effect']:.3f}" in text
        assert browser.errors == []
