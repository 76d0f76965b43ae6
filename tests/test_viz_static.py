"""Static pictures (graphviz and matplotlib), faithfulness curves, and circuits drawn through the adapter."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from featcircuits.circuits.circuit import Circuit
from featcircuits.viz import static
from featcircuits.viz.adapters import circuit_to_graph_json
from featcircuits.viz.curves import curve_from_evaluation, plot_faithfulness_curves
from featcircuits.viz.graph_data import graph_payload
from featcircuits.viz.static import render_graph_image

SVG = "{http://www.w3.org/2000/svg}"
QUOTED = "a\"b'<c>&"
TOKENS = ["<s>", "\u2581The", " ", QUOTED, "\u00e9t\u00e9"]


def small_graph():
    nodes = [{"node_id": f"E_{pos}_{pos}", "layer": "E", "ctx_idx": pos, "feature_type": "embedding", "feature": pos}
             for pos in range(len(TOKENS))]
    nodes += [{"node_id": "0_11_1", "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder", "feature": 11},
              {"node_id": "0_12_1", "layer": "0", "ctx_idx": 1, "feature_type": "cross layer transcoder", "feature": 12},
              {"node_id": "0_1_3", "layer": "1", "ctx_idx": 3, "feature_type": "mlp reconstruction error", "feature": -1},
              {"node_id": "1_4_3", "layer": "1", "ctx_idx": 3, "feature_type": "cross layer transcoder", "feature": 4,
               "clerp": QUOTED},
              {"node_id": "3_9_4", "layer": "3", "ctx_idx": 4, "feature_type": "logit", "is_target_logit": True}]
    links = [("E_1_1", "0_11_1", 1.0), ("E_1_1", "0_12_1", -0.5), ("0_11_1", "1_4_3", 0.8), ("E_3_3", "0_1_3", 0.1),
             ("0_12_1", "1_4_3", -0.3), ("1_4_3", "3_9_4", 2.0), ("0_1_3", "3_9_4", -1.5)]
    return {"metadata": {"prompt_tokens": TOKENS, "slug": "small"}, "nodes": nodes,
            "links": [{"source": s, "target": t, "weight": w} for s, t, w in links]}


@pytest.mark.skipif(static.find_dot() is None, reason="graphviz `dot` not installed (apt-get install graphviz)")
def test_dot_svg_has_every_node_and_signed_edges(tmp_path):
    graph = small_graph()
    path = render_graph_image(graph, tmp_path / "graph.svg", engine="dot")
    root = ET.parse(path).getroot()  # parses: labels with quotes and brackets were escaped
    groups = list(root.iter(f"{SVG}g"))
    assert sum("fc-node" in (g.get("class") or "") for g in groups) == len(graph["nodes"])
    edges = [g for g in groups if g.get("class") == "edge"]
    assert len(edges) == len(graph["links"])
    colours = sorted(g.find(f".//{SVG}path").get("stroke") for g in edges)
    expected = sorted(static.POSITIVE.lower() if link["weight"] >= 0 else static.NEGATIVE.lower()
                      for link in graph["links"])
    assert [c.lower() for c in colours] == expected
    texts = {t.text for t in root.iter(f"{SVG}text")}
    assert QUOTED in texts and "\u00e9t\u00e9" in texts and "' '" in texts  # whitespace-only token shown quoted
    png = render_graph_image(graph, tmp_path / "graph.png", engine="dot")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Big graphs: only the strongest edges are drawn, and the title says so.
    root = ET.parse(render_graph_image(graph, tmp_path / "top.svg", engine="dot", max_edges=3)).getroot()
    edges = [g for g in root.iter(f"{SVG}g") if g.get("class") == "edge"]
    tips = sorted(float(g.find(f".//{SVG}a").get("{http://www.w3.org/1999/xlink}title")) for g in edges)
    assert sorted(sorted((link["weight"] for link in graph["links"]), key=abs)[-3:]) == pytest.approx(tips)
    assert any("strongest 3 of 7 edges" in (t.text or "") for t in root.iter(f"{SVG}text"))


def test_matplotlib_draws_every_node_by_kind(tmp_path):
    graph = small_graph()
    path = render_graph_image(graph, tmp_path / "graph.svg", engine="matplotlib")
    root = ET.parse(path).getroot()
    counts = {kind: len(root.find(f".//{SVG}g[@id='{kind}']").findall(f".//{SVG}use"))
              for kind in ("feature", "error", "embedding", "logit")}
    assert counts == {"feature": 3, "error": 1, "embedding": len(TOKENS), "logit": 1}
    png = render_graph_image(graph, tmp_path / "graph.png", engine="matplotlib")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_auto_engine_falls_back_to_matplotlib_and_bad_requests_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(static, "find_dot", lambda: None)
    path = render_graph_image({"nodes": [], "links": []}, tmp_path / "empty.svg")
    assert "empty graph" in path.read_text()  # matplotlib text, since dot is "missing"
    with pytest.raises(RuntimeError, match="graphviz `dot` is not on PATH"):
        render_graph_image(small_graph(), tmp_path / "x.svg", engine="dot")
    with pytest.raises(ValueError, match="image format"):
        render_graph_image(small_graph(), tmp_path / "x.gif")
    with pytest.raises(ValueError, match="Unknown engine"):
        render_graph_image(small_graph(), tmp_path / "x.svg", engine="tikz")
    assert not (tmp_path / "x.svg").exists()


def _evaluation(sizes, faithfulness, completeness):
    n = max(sizes)
    return {"faithfulness": faithfulness[-2], "completeness": completeness[-2], "size": sizes[-2],
            "curve": {"sizes": sizes, "fractions": [s / n for s in sizes], "faithfulness": faithfulness,
                      "completeness": completeness}}


def test_faithfulness_curves_plot_the_evaluation(tmp_path):
    atp = _evaluation([0, 1, 10, 100, 1000], [0.0, 0.3, 0.7, 0.95, 1.0], [1.0, 0.8, 0.4, 0.1, 0.0])
    acdc = _evaluation([0, 5, 50, 1000], [0.0, 0.5, 0.9, 1.0], [1.0, 0.6, 0.2, 0.0])
    figure = plot_faithfulness_curves({"AtP": atp, "ACDC": acdc}, tmp_path / "curves.png")
    lines = {line.get_gid(): line for line in figure.axes[0].get_lines() if line.get_gid()}
    assert list(lines["faithfulness:AtP"].get_ydata()) == atp["curve"]["faithfulness"]
    assert list(lines["completeness:ACDC"].get_ydata()) == acdc["curve"]["completeness"]
    assert figure.axes[0].get_xscale() == "log"  # sizes span three decades
    assert list(lines["faithfulness:ACDC"].get_xdata()) == [0.5, 5, 50, 1000]  # size 0 drawn at half the smallest
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    circuit = Circuit("atp", "nodes", ["a", "b"], [1.0, 0.5], nodes=["a"], evaluation=atp)
    single = plot_faithfulness_curves(circuit, tmp_path / "one.svg", log_x=False)
    assert single.axes[0].get_xscale() == "linear" and ET.parse(tmp_path / "one.svg").getroot() is not None


@pytest.mark.parametrize("evaluation, message", [
    ({}, "no evaluation curve"),
    ({"curve": {"sizes": [0, 1], "faithfulness": [0.0]}}, "differ in length"),
    ({"curve": {"sizes": [], "faithfulness": []}}, "empty"),
    ({"curve": {"sizes": [0, 1], "faithfulness": [0.0, float("nan")]}}, "non-finite"),
    ({"curve": {"faithfulness": [0.0]}}, "needs 'sizes'"),
])
def test_bad_curves_are_refused(evaluation, message):
    with pytest.raises(ValueError, match=message):
        curve_from_evaluation(evaluation)


def test_circuit_adapter_feature_and_component_circuits():
    ids = ["embed@0", "mlp0:7@1", "attn1:3@1", "mlp1:error@2", "logit:42@-1"]
    edges = [("embed@0", "mlp0:7@1"), ("mlp0:7@1", "attn1:3@1"), ("attn1:3@1", "logit:42@-1"),
             ("mlp1:error@2", "logit:42@-1"), ("embed@0", "logit:42@-1")]
    circuit = Circuit("atp", "edges", ids, None, edges, [0.5, -0.25, 1.0, 0.1, 0.01],
                      nodes=ids[:3] + ids[4:], edges=edges[:3])
    payload = graph_payload(circuit_to_graph_json(circuit), prompt_tokens=["<s>", "\u2581a", "\u2581b"])
    assert [node["id"] for node in payload["nodes"]] == ["embed@0", "mlp0:7@1", "attn1:3@1", "logit:42@-1"]
    assert [node["kind"] for node in payload["nodes"]] == ["embedding", "feature", "feature", "logit"]
    assert [node["col"] for node in payload["nodes"]] == [0, 1, 1, 2]  # -1 is the last prompt token
    assert [link[2] for link in payload["links"]] == [0.5, -0.25, 1.0]
    assert payload["nodes"][2]["dash_key"] == "1_3" and payload["rows"] == ["tokens", "L0", "L1", "logits"]

    # feature edges end in "logits", read at the last token
    feature_edges = [("mlp0:4@1", "resid_pre1:3@1"), ("resid_pre1:3@1", "logits")]
    ids = ["mlp0:4@1", "resid_pre1:3@1", "logits"]
    payload = graph_payload(circuit_to_graph_json(Circuit("acdc", "edges", ids, None, feature_edges, [0.3, 0.7], nodes=ids,
                                                             edges=feature_edges)),
                            prompt_tokens=["<s>", "\u2581a", "\u2581b"])
    assert [node["col"] for node in payload["nodes"]] == [1, 1, 2]
    assert [node["kind"] for node in payload["nodes"]] == ["feature", "feature", "logit"]

    heads = ["L0.H0", "L0.H1", "L0.MLP", "L1.H0", "L1.MLP"]
    component = Circuit("acdc", "nodes", heads, [0.1, 2.0, 0.5, -1.0, 0.3], nodes=["L0.H1", "L1.H0", "L1.MLP"])
    payload = graph_payload(circuit_to_graph_json(component))
    assert [node["kind"] for node in payload["nodes"]] == ["component"] * 3
    assert [node["influence"] for node in payload["nodes"]] == [2.0, -1.0, 0.3]
    assert payload["rows"] == ["tokens", "L0", "L1", "logits"] and payload["links"] == []

    empty = graph_payload(circuit_to_graph_json(Circuit("atp", "nodes", heads, [0.0] * 5)))
    assert empty["nodes"] == [] and empty["links"] == []
    with pytest.raises(ValueError, match="'what' cannot be drawn: 'what' is not a node id"):
        circuit_to_graph_json(Circuit("atp", "nodes", ["what"], [1.0], nodes=["what"]))
    with pytest.raises(ValueError, match="'mlp0:x' is not a node id"):
        circuit_to_graph_json(Circuit("atp", "nodes", ["mlp0:x"], [1.0], nodes=["mlp0:x"]))
