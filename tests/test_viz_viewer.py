"""The graph viewer, as a person uses it: pages opened in a real headless Chromium, clicked and looked at.

Browser tests skip with a reason when no Chromium is installed (.ci/run installs Debian's package).
"""

from __future__ import annotations

import html
import json
import random
import re
import struct

import pytest

from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.graph_data import graph_payload, load_graph_json
from featcircuits.viz.page import json_for_script
from featcircuits.viz.viewer import render_viewer_html, write_viewer

needs_chromium = pytest.mark.skipif(find_chromium() is None,
                                    reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")

HOSTILE = "<script>alert(1)</script>"
TOKENS = ["<s>", "\u2581Once", "\u2581upon", " ", "\t\n", HOSTILE, "caf\u00e9 \"'", "\u732b", "<img src=x onerror=alert(2)>"]


def make_graph(tokens=TOKENS, n_layers=4, seed=0, with_features=True, dead_key=None):
    """A circuit-tracer style graph: embeddings -> features/errors (layer by layer) -> one target logit."""
    rng = random.Random(seed)
    nodes = [{"node_id": f"E_{index}_{pos}", "feature": pos, "layer": "E", "ctx_idx": pos,
              "feature_type": "embedding", "jsNodeId": f"E_{index}-{pos}"} for pos, index in enumerate(range(len(tokens)))]
    for layer in range(n_layers):
        for pos in range(len(tokens)):
            if with_features:
                for feature in rng.sample(range(10, 74), rng.randint(0, 3)):  # not 0_L_pos, an error id
                    nodes.append({"node_id": f"{layer}_{feature}_{pos}", "feature": feature, "layer": str(layer),
                                  "ctx_idx": pos, "feature_type": "cross layer transcoder",
                                  "activation": rng.uniform(0.1, 3.0), "influence": rng.random(),
                                  "clerp": tokens[pos] if feature % 5 == 0 else ""})
            if rng.random() < 0.3:
                nodes.append({"node_id": f"0_{layer}_{pos}", "feature": -1, "layer": str(layer), "ctx_idx": pos,
                              "feature_type": "mlp reconstruction error"})
    last = len(tokens) - 1
    nodes.append({"node_id": f"{n_layers + 1}_7_{last}", "feature": 7, "layer": str(n_layers + 1), "ctx_idx": last,
                  "feature_type": "logit", "is_target_logit": True, "token_prob": 0.42,
                  "clerp": f'Output "{HOSTILE}" (p=0.420)'})
    rank = {"E": -1, str(n_layers + 1): n_layers + 1}

    def order(node):
        return rank.get(node["layer"], None) if node["layer"] in rank else int(node["layer"])

    links = []
    for target in nodes:
        sources = [node for node in nodes if order(node) < order(target) and node["ctx_idx"] <= target["ctx_idx"]]
        for source in rng.sample(sources, min(len(sources), 3)) if target["layer"] != "E" else []:
            links.append({"source": source["node_id"], "target": target["node_id"], "weight": rng.gauss(0, 1)})
    return {"metadata": {"slug": f"test graph {HOSTILE}", "prompt": "Once upon", "prompt_tokens": list(tokens),
                         "scan": "test", "transcoder_list": []},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


# -- data, without a browser --------------------------------------------------------------------------


def test_payload_rows_columns_and_links_follow_the_graph():
    graph = make_graph()
    payload = graph_payload(graph)
    assert len(payload["nodes"]) == len(graph["nodes"]) and len(payload["links"]) == len(graph["links"])
    assert payload["rows"] == ["tokens", "L0", "L1", "L2", "L3", "logits"]
    for node, raw in zip(payload["nodes"], graph["nodes"], strict=True):
        assert node["id"] == raw["node_id"] and node["col"] == raw["ctx_idx"]
        expected_row = {"E": 0, "5": 5}.get(raw["layer"], None)
        assert node["row"] == (expected_row if expected_row is not None else int(raw["layer"]) + 1)
    ids = [node["id"] for node in payload["nodes"]]
    for (source, target, weight), raw in zip(payload["links"], graph["links"], strict=True):
        assert (ids[source], ids[target], weight) == (raw["source"], raw["target"], raw["weight"])
    feature = next(node for node in payload["nodes"] if node["kind"] == "feature")
    layer, index, _ = feature["id"].split("_")
    assert feature["dash_key"] == f"{layer}_{index}"


def test_graph_json_file_and_negative_positions(tmp_path):
    graph = make_graph()
    for node in graph["nodes"]:  # dataset-level graphs number positions from the end
        node["ctx_idx"] -= len(TOKENS)
    path = tmp_path / "graph.json"
    path.write_text(json.dumps(graph))
    payload = graph_payload(load_graph_json(path))
    assert [node["col"] for node in payload["nodes"]] == [node["ctx_idx"] + len(TOKENS) for node in graph["nodes"]]
    assert payload["nodes"][-1]["token"] == TOKENS[-1]


@pytest.mark.parametrize("mutate, message", [
    (lambda g: g["links"].append({"source": "nope", "target": g["nodes"][0]["node_id"], "weight": 1.0}), "unknown node"),
    (lambda g: g["links"].append({"source": g["nodes"][0]["node_id"], "target": g["nodes"][1]["node_id"],
                                  "weight": float("nan")}), "non-finite"),
    (lambda g: g["nodes"].append(dict(g["nodes"][0])), "appears twice"),
    (lambda g: g["nodes"][0].pop("ctx_idx"), "lacks"),
    (lambda g: g["nodes"][0].update(feature_type="mystery"), "feature_type"),
])
def test_bad_graphs_are_refused_with_the_culprit_named(mutate, message):
    graph = make_graph()
    mutate(graph)
    with pytest.raises(ValueError, match=message):
        graph_payload(graph)


def test_bad_sources_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No graph file"):
        load_graph_json(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text('{"nodes": [')
    with pytest.raises(ValueError, match="not valid JSON"):
        load_graph_json(tmp_path / "broken.json")
    with pytest.raises(TypeError, match="Cannot view a int"):
        load_graph_json(3)


def test_page_is_self_contained_and_token_strings_cannot_break_out():
    page = render_viewer_html(make_graph())
    # No network: nothing is loaded from elsewhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page
    # The only script elements are ours: the hostile tokens stay inside JSON as escaped text.
    assert page.count("<script") == 2 and HOSTILE not in page and "<img" not in page
    data = re.search(r'<script type="application/json" id="fc-data">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["tokens"] == TOKENS
    assert f"<title>{html.escape('test graph ' + HOSTILE)}</title>" in page
    assert json_for_script({"s": "</script><!--\u2028"}) == '{"s":"\\u003c/script\\u003e\\u003c!--\\u2028"}'


# -- in the browser -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium; .ci/run does)")
    with HeadlessChromium(width=1280, height=860) as chromium:
        yield chromium


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", header[16:24])


def _distinct_colours(path, step=7):
    """Rough count of distinct colours, sampled from the PNG by Chromium itself (no image library)."""
    return len(set(path.read_bytes()[::step]))


@needs_chromium
def test_viewer_renders_every_node_and_a_click_shows_its_card(browser, tmp_path):
    graph = make_graph()
    page = write_viewer(graph, tmp_path / "graph.html")
    browser.errors.clear()
    browser.open(page)
    assert browser.evaluate("document.querySelectorAll('#fc-graph .fc-node').length") == len(graph["nodes"])
    assert browser.evaluate("document.querySelectorAll('#fc-graph .fc-edge').length") == len(graph["links"])
    assert browser.evaluate("document.getElementById('fc-counts').dataset.nodes") == str(len(graph["nodes"]))

    feature = next(node for node in graph["nodes"] if node["feature_type"] == "cross layer transcoder")
    error = next(node for node in graph["nodes"] if node["feature_type"] == "mlp reconstruction error")
    browser.hover(f'.fc-node[data-node-id="{error["node_id"]}"]')  # hovering shows a card without pinning it
    assert browser.evaluate("document.getElementById('fc-card').dataset.nodeId") == error["node_id"]
    browser.click(f'.fc-node[data-node-id="{feature["node_id"]}"]')
    card = browser.evaluate("(() => { const c = document.getElementById('fc-card');"
                            " return {id: c.dataset.nodeId, text: c.innerText}; })()")
    assert card["id"] == feature["node_id"]
    assert f"{feature['activation']:.3f}" in card["text"]
    n_inputs = sum(link["target"] == feature["node_id"] for link in graph["links"])
    assert f"INPUTS ({n_inputs})" in card["text"].upper()
    # Its edges are highlighted, the others faded.
    n_edges = sum(feature["node_id"] in (link["source"], link["target"]) for link in graph["links"])
    assert browser.evaluate("document.querySelectorAll('.fc-edge.fc-edge-active').length") == n_edges

    shot = browser.screenshot(tmp_path / "graph.png")
    width, height = _png_size(shot)
    assert width >= 1000 and height >= 500
    assert _distinct_colours(shot) > 20  # something was drawn, not a blank page
    assert browser.errors == [] and browser.dialogs == []


@needs_chromium
def test_threshold_slider_hides_weak_edges_and_orphaned_nodes(browser, tmp_path):
    graph = make_graph(seed=1)
    browser.errors.clear()
    browser.open(write_viewer(graph, tmp_path / "graph.html"))
    fraction = 0.5
    browser.evaluate(f"(() => {{ const s = document.getElementById('fc-threshold'); s.value = '{fraction}';"
                     " s.dispatchEvent(new Event('input')); })()")
    # Expected from the graph itself: edges with |w| >= 0.5 max|w|; nodes that keep an edge, plus tokens/logits.
    cutoff = fraction * max(abs(link["weight"]) for link in graph["links"])
    kept = [link for link in graph["links"] if abs(link["weight"]) >= cutoff]
    touched = {end for link in kept for end in (link["source"], link["target"])}
    expected_nodes = sum(node["node_id"] in touched or node["feature_type"] in ("embedding", "logit")
                         for node in graph["nodes"])
    shown = browser.evaluate("(() => { const c = document.getElementById('fc-counts').dataset;"
                             " const visible = s => [...document.querySelectorAll(s)]"
                             ".filter(e => e.style.display !== 'none').length;"
                             " return [Number(c.nodes), Number(c.edges), visible('.fc-node'), visible('.fc-edge')]; })()")
    assert shown == [expected_nodes, len(kept), expected_nodes, len(kept)]
    assert 0 < len(kept) < len(graph["links"])
    assert browser.errors == []


@needs_chromium
def test_hostile_non_ascii_and_whitespace_tokens_render_as_text(browser, tmp_path):
    graph = make_graph()
    feature = next(node for node in graph["nodes"] if node["feature_type"] == "cross layer transcoder")
    _, index, _ = feature["node_id"].split("_")
    hostile_entry = {"layer": feature["layer"], "feature": int(index), "n_fired": 3, "n_tokens": 10, "density": 0.3,
                     "max_act": 2.0, "histogram": [0, 1, 2],
                     "top_contexts": [{"act": 2.0, "focus": 1, "tokens": [" ", HOSTILE, "\n", "\u00e9\"'", "<0x0A>"],
                                       "acts": [0.0, 2.0, 0.5, 0.1, 0.0]}],
                     "top_logits": [[HOSTILE, 1.5], ["\u732b", 1.0]], "bottom_logits": [["<img src=x onerror=alert(3)>", -1.0]]}
    dashboards = {"features": {f"{feature['layer']}_{index}": hostile_entry}}
    browser.errors.clear()
    browser.open(write_viewer(graph, tmp_path / "graph.html", dashboards=dashboards))
    # No injected element ran or exists; the tokens appear as their text.
    assert browser.dialogs == []
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    assert browser.evaluate("document.scripts.length") == 2
    assert browser.evaluate("document.title") == "test graph " + HOSTILE
    titles = browser.evaluate("[...document.querySelectorAll('.fc-token-label title')].map(t => t.textContent)")
    assert titles == [f"position {pos}: {json.dumps(token, ensure_ascii=False)}" for pos, token in enumerate(TOKENS)]
    labels = browser.evaluate("[...document.querySelectorAll('.fc-token-label')].map(t => t.firstChild.textContent)")
    assert labels[3] == "\u2423" and labels[4] == "\u21e5\u23ce"  # whitespace-only tokens stay visible
    assert labels[7] == "\u732b" and labels[1] == "\u2423Once"
    browser.click(f'.fc-node[data-node-id="{feature["node_id"]}"]')
    context = browser.evaluate("[...document.querySelectorAll('#fc-card .fc-context .fc-tok')].map(e => e.textContent)")
    assert context == [" ", HOSTILE, "\u23ce", "\u00e9\"'", "\u23ce"]  # byte-fallback newline too
    promoted = browser.evaluate("[...document.querySelectorAll('#fc-card .fc-logit .fc-tok')].map(e => e.textContent)")
    assert promoted == [HOSTILE, "\u732b", "<img\u2423src=x\u2423onerror=alert(3)>"]
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    logit = graph["nodes"][-1]["node_id"]
    browser.click(f'.fc-node[data-node-id="{logit}"]')
    assert browser.evaluate("document.querySelector('#fc-card .fc-card-title').textContent") == graph["nodes"][-1]["clerp"]
    assert browser.dialogs == [] and browser.errors == []


@needs_chromium
def test_empty_circuit_and_graph_without_features(browser, tmp_path):
    empty = {"metadata": {"prompt_tokens": []}, "nodes": [], "links": []}
    browser.errors.clear()
    browser.open(write_viewer(empty, tmp_path / "empty.html"))
    assert browser.evaluate("document.querySelectorAll('.fc-node').length") == 0
    assert "no nodes" in browser.evaluate("document.querySelector('.fc-empty').textContent")

    bare = make_graph(with_features=False)
    browser.open(write_viewer(bare, tmp_path / "bare.html"))
    assert browser.evaluate("document.querySelectorAll('.fc-node').length") == len(bare["nodes"])
    assert "no feature nodes" in browser.evaluate("document.querySelector('.fc-notice').textContent")
    assert browser.errors == [] and browser.dialogs == []


def test_view_command_writes_page_and_picture(tmp_path, capsys):
    from featcircuits.cli import main

    graph = make_graph()
    source = tmp_path / "graph.json"
    source.write_text(json.dumps(graph))
    assert main(["view", str(source), "-o", str(tmp_path / "graph.html"), "--image", str(tmp_path / "graph.svg")]) == 0
    out = capsys.readouterr().out
    n_features = sum(node["feature_type"] == "cross layer transcoder" for node in graph["nodes"])
    assert f"{len(graph['nodes'])} nodes ({n_features} features, 0 with dashboard entries), {len(graph['links'])} edges" in out
    page = (tmp_path / "graph.html").read_text()
    data = re.search(r'id="fc-data">(.*?)</script>', page, re.S).group(1)
    assert len(json.loads(data)["nodes"]) == len(graph["nodes"])
    assert (tmp_path / "graph.svg").read_text().lstrip().startswith("<?xml")
    assert main(["view", str(tmp_path / "missing.json"), "-o", str(tmp_path / "x.html")]) == 2
    assert "No graph file" in capsys.readouterr().err
