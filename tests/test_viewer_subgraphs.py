"""The viewer's supernodes (one node with its members, edges summed, expandable) and pinned-subgraph panel, in
headless Chromium: what is drawn is checked against counts and sums worked out from the graph JSON here."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from test_viz_viewer import HOSTILE, make_graph

from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.viewer import write_viewer

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")
NAME = "<b>group</b><img src=x onerror=alert(4)>"


@pytest.fixture(scope="module")
def browser():
    with HeadlessChromium(width=1280, height=900) as chromium:
        yield chromium


def _drawn_edges(graph: dict, groups: list[list[str]], expanded: list[bool]) -> dict[tuple[str, str], float]:
    """The edges the page should draw: a link into or out of a collapsed supernode counts for the supernode
    ("s<number>"), links inside one vanish, and links between the same two drawn nodes add up."""
    index = {node["node_id"]: i for i, node in enumerate(graph["nodes"])}
    owner: dict[str, int] = {}
    for number, members in enumerate(groups):
        for member in members:
            owner.setdefault(member, number)

    def drawn(node_id: str) -> str:
        number = owner.get(node_id)
        return f"s{number}" if number is not None and not expanded[number] else f"n{index[node_id]}"

    edges: dict[tuple[str, str], float] = defaultdict(float)
    for link in graph["links"]:
        ends = drawn(link["source"]), drawn(link["target"])
        if ends[0] != ends[1]:
            edges[ends] += link["weight"]
    return dict(edges)


def _page_edges(browser) -> dict[tuple[str, str], float]:
    rows = browser.evaluate("[...document.querySelectorAll('#fc-graph .fc-edge')]"
                            ".map(e => [e.dataset.from, e.dataset.to, Number(e.dataset.weight)])")
    assert len(rows) == len({(a, b) for a, b, _ in rows})  # one edge per pair of drawn nodes
    return {(a, b): w for a, b, w in rows}


def _shown(browser, node_id: str) -> bool:
    return browser.evaluate(f"document.querySelector('.fc-node[data-node-id={json.dumps(node_id)}]').style.display") != "none"


def test_a_supernode_is_one_node_with_summed_edges_until_expanded(browser, tmp_path):
    graph = make_graph(seed=3)
    features = [n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"]
    groups = [features[:3], features[5:7]]
    graph["qParams"]["supernodes"] = [[NAME, *groups[0]], ["second", *groups[1]]]
    browser.errors.clear()
    browser.open(write_viewer(graph, tmp_path / "graph.html"))
    assert browser.evaluate("document.querySelectorAll('.fc-supernode-node').length") == 2
    assert not any(_shown(browser, member) for group in groups for member in group)
    expected = _drawn_edges(graph, groups, [False, False])
    assert _page_edges(browser) == pytest.approx(expected)
    assert any(key[0].startswith("s") or key[1].startswith("s") for key in expected)
    assert browser.evaluate("document.getElementById('fc-counts').dataset.nodes") == \
        str(len(graph["nodes"]) - 5 + 2)

    browser.click('.fc-supernode-node[data-supernode="0"]')
    assert browser.evaluate("document.querySelector('#fc-card .fc-card-title').textContent") == f"Supernode {NAME}"
    members = browser.evaluate("[...document.querySelectorAll('#fc-card .fc-member')].map(e => e.dataset.nodeId)")
    assert members == groups[0]
    summed_inputs = sum(1 for (_, target) in expected if target == "s0")
    assert f"INPUTS (SUMMED) ({summed_inputs})" in browser.evaluate("document.getElementById('fc-card').innerText").upper()
    browser.click("#fc-toggle-supernode")  # expand: the members are drawn, their own edges come back
    assert all(_shown(browser, member) for member in groups[0])
    assert browser.evaluate("document.querySelector('.fc-supernode-node[data-supernode=\"0\"]').style.display") == "none"
    assert _page_edges(browser) == pytest.approx(_drawn_edges(graph, groups, [True, False]))
    browser.click('.fc-supernode[data-supernode="1"]')  # the bar's button expands the other
    assert _page_edges(browser) == pytest.approx(_drawn_edges(graph, groups, [True, True]))
    assert len(_page_edges(browser)) == len({(link["source"], link["target"]) for link in graph["links"]})
    browser.click('.fc-supernode[data-supernode="1"]')  # and collapses it again
    assert _page_edges(browser) == pytest.approx(_drawn_edges(graph, groups, [True, False]))
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    assert browser.errors == [] and browser.dialogs == []


def test_pinned_subgraph_collects_nodes_with_the_edges_among_them(browser, tmp_path):
    graph = make_graph(seed=2)
    features = {n["node_id"] for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder"}
    first = next(link for link in graph["links"] if link["source"] in features and link["target"] in features)
    a, b = first["source"], first["target"]
    c = next(link["source"] for link in graph["links"] if link["target"] == b and link["source"] != a)
    hostile = next(n for n in graph["nodes"] if n["node_id"] == c)
    hostile["clerp"] = "<img src=x onerror=alert(5)>"
    browser.errors.clear()
    browser.open(write_viewer(graph, tmp_path / "graph.html"))
    assert browser.evaluate("document.getElementById('fc-pin-count').dataset.pins") == "0"
    browser.click(f'.fc-node[data-node-id="{a}"]', shift=True)
    browser.click(f'.fc-node[data-node-id="{b}"]', shift=True)
    browser.click(f'.fc-node[data-node-id="{c}"]')  # a plain click opens the card ...
    browser.click("#fc-pin-button")  # ... whose button pins it
    pinned = {a, b, c}
    among = sorted(link["weight"] for link in graph["links"] if link["source"] in pinned and link["target"] in pinned)

    def panel():
        return browser.evaluate(
            "({pins: document.getElementById('fc-pin-count').dataset.pins,"
            " nodes: [...document.querySelectorAll('#fc-subgraph .fc-sub-node')].map(e => e.dataset.nodeId).sort(),"
            " edges: [...document.querySelectorAll('#fc-subgraph .fc-sub-edge')].map(e => Number(e.dataset.weight)),"
            " marked: document.querySelectorAll('#fc-graph .fc-node.fc-pinned').length})")

    state = panel()
    assert state["pins"] == "3" and state["nodes"] == sorted(pinned) and state["marked"] == 3
    assert sorted(state["edges"]) == pytest.approx(among) and len(among) >= 2
    assert "<img src=x onerror=alert(5)>" in browser.evaluate("document.getElementById('fc-pinned').innerText")

    for query in ("zzz-nothing", "L1", HOSTILE[:7]):  # pins survive searching
        browser.evaluate(f"(() => {{ const s = document.getElementById('fc-search'); s.value = {json.dumps(query)};"
                         " s.dispatchEvent(new Event('input')); })()")
        assert panel() == state

    # the card lists inputs and outputs with their weights, strongest first; a click follows one
    browser.click(f'.fc-node[data-node-id="{b}"]')
    inputs = sorted((link for link in graph["links"] if link["target"] == b), key=lambda link: -abs(link["weight"]))
    first_line = browser.evaluate("document.querySelector('#fc-card .fc-neighbour[data-key]').innerText")
    assert first_line.startswith(f"{inputs[0]['weight']:.3f}")
    browser.click("#fc-card .fc-neighbour[data-key]")
    assert browser.evaluate("document.getElementById('fc-card').dataset.nodeId") == inputs[0]["source"]

    browser.click(f'.fc-pin-item[data-node-id="{c}"] .fc-unpin')
    assert panel()["nodes"] == sorted({a, b})
    browser.click("#fc-clear-pins")
    assert panel() == {"pins": "0", "nodes": [], "edges": [], "marked": 0}
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    assert browser.errors == [] and browser.dialogs == []


def test_labels_explanations_and_scores_show_as_text_on_cards_and_dashboard_pages(browser, tmp_path):
    from featcircuits.viz.dashboards import FeatureDashboards

    graph = make_graph(seed=4)
    feature = next(n for n in graph["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, index, _ = feature["node_id"].split("_")
    entry = {"layer": layer, "feature": int(index), "n_fired": 2, "n_tokens": 10, "density": 0.2, "max_act": 1.0,
             "histogram": [1, 1], "top_contexts": [], "label": f"on {json.dumps(HOSTILE)}", "detection": 0.875,
             "fuzzing": 0.625, "explanation": "<img src=x onerror=alert(6)> tags", "explanation_source": "m at <b>u</b>",
             "llm_detection": 0.75, "llm_fuzzing": 0.5}
    key = f"{layer}_{index}"
    browser.errors.clear()
    browser.open(write_viewer(graph, tmp_path / "graph.html", dashboards={"features": {key: entry}}))
    browser.click(f'.fc-node[data-node-id="{feature["node_id"]}"]')
    card = browser.evaluate("document.getElementById('fc-card').innerText")
    assert f"Label: on {json.dumps(HOSTILE)} (detection 0.875, fuzzing 0.625, held out)" in card
    assert "Explanation: <img src=x onerror=alert(6)> tags (m at <b>u</b>; detection 0.750, fuzzing 0.500)" in card
    dashboards = FeatureDashboards(features={key: entry}, n_tokens=10)
    browser.open(dashboards.write_html(tmp_path / "dashboards.html"))
    page = browser.evaluate("document.body.innerText")
    assert f"Label: on {json.dumps(HOSTILE)}" in page and "Explanation: <img src=x onerror=alert(6)> tags" in page
    assert browser.evaluate("document.querySelectorAll('img, b').length") == 0
    assert browser.errors == [] and browser.dialogs == []
