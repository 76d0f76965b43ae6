"""Our graph files in circuit-tracer's own frontend: the ``features/`` dashboard files it fetches (checked against
a schema written from its ``frontend/feature_models.py``), and, where circuit-tracer's environment and the npm
packages standing in for its CDN scripts are installed, its server and page in headless Chromium drawing our
nodes and showing a clicked feature's dashboard."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import jsonschema
import pytest
import torch
from conftest import TINYSTORIES, relu_transcoders

from featcircuits.graph import build_graph
from featcircuits.graph.export import cantor_pairing, circuit_tracer_feature, write_graph_files
from featcircuits.patching.replacement import ReplacementModel
from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.dashboards import compute_dashboards

# Written from circuit-tracer 0.5.0's circuit_tracer/frontend/feature_models.py (Example, ExamplesQuantile, Model)
_NUMS = {"type": "array", "items": {"type": "number"}}
_STRS = {"type": "array", "items": {"type": "string"}}
FEATURE_SCHEMA = {
    "type": "object",
    "required": ["transcoder_id", "index", "examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max",
                 "quantile_values", "histogram", "activation_frequency"],
    "properties": {
        "transcoder_id": {"type": "string"}, "index": {"type": "integer"},
        "examples_quantiles": {"type": "array", "items": {
            "type": "object", "required": ["quantile_name", "examples"],
            "properties": {"quantile_name": {"type": "string"}, "examples": {"type": "array", "items": {
                "type": "object", "required": ["tokens_acts_list", "train_token_ind", "is_repeated_datapoint", "tokens"],
                "properties": {"tokens_acts_list": _NUMS, "train_token_ind": {"type": "integer"},
                               "is_repeated_datapoint": {"type": "boolean"}, "tokens": _STRS}}}}}},
        "top_logits": _STRS, "bottom_logits": _STRS, "act_min": {"type": "number"}, "act_max": {"type": "number"},
        "quantile_values": _NUMS, "histogram": _NUMS, "activation_frequency": {"type": "number"},
    },
}

PROMPT = "Once upon a time there was a"
HOSTILE = "<img src=x onerror=alert(1)>"


def _frontend_token(piece: str) -> str:
    """A SentencePiece piece as circuit-tracer's feature files spell it: text, bytes as "\\xNN"."""
    byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)
    return "\\x" + byte.group(1).lower() if byte else piece.replace("▁", " ")


@pytest.fixture(scope="module")
def graph_files(stories_model, tmp_path_factory):
    transcoders = relu_transcoders(stories_model, d_sae=32, bias=-0.3)[:2]
    graph = build_graph(ReplacementModel(stories_model, transcoders), prompt=PROMPT, progress=False)
    ids = stories_model.tokenizer((TINYSTORIES / "train_head.txt").read_text()[:20000], add_special_tokens=False)
    rows = torch.tensor(ids["input_ids"][: 16 * 47]).view(16, 47)
    rows = torch.cat([torch.full((16, 1), stories_model.tokenizer.bos_token_id), rows], dim=1)
    dashboards = compute_dashboards(stories_model, transcoders, rows, k=5)
    directory = tmp_path_factory.mktemp("ct-graphs")
    labels = {key: f"{HOSTILE} {key}" for key in dashboards.features}  # a label made of hostile token strings
    path = write_graph_files(graph, directory, "ours", dashboards=dashboards, labels=labels, node_threshold=1.0,
                             edge_threshold=1.0)
    return directory, json.loads(path.read_text()), dashboards


def test_feature_files_in_the_layout_the_frontend_fetches(graph_files):
    directory, data, dashboards = graph_files
    assert data["metadata"]["scan"] == "./data/features/stories260k"  # ./ : fetched from the local server
    assert data["metadata"]["clerp_html_escaped"] is True
    clerps = [n["clerp"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert clerps and all(c.startswith("&lt;img src=x onerror=alert(1)&gt; ") for c in clerps)
    from featcircuits.viz.viewer import viewer_payload

    shown = [n["label"] for n in viewer_payload(data)["nodes"] if n["kind"] == "feature"]
    assert shown and all(label.startswith(HOSTILE) for label in shown)  # our viewer reads them back as text
    index = json.loads((directory / "graph-metadata.json").read_text())
    assert index["graphs"][0]["scan"] == data["metadata"]["scan"]
    feature_nodes = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    files = sorted((directory / "features" / "stories260k").glob("*.json"))
    assert len(files) == len({n["feature"] for n in feature_nodes}) > 0
    for node in feature_nodes[:20]:
        layer, index, _ = node["node_id"].split("_")
        feature = json.loads((directory / "features" / "stories260k" / f"{node['feature']}.json").read_text())
        jsonschema.validate(feature, FEATURE_SCHEMA)
        entry = dashboards.features[f"{layer}_{index}"]
        assert feature["index"] == node["feature"] == cantor_pairing(int(layer), int(index))
        assert feature["transcoder_id"] == f"blocks.{layer}.ln2.hook_normalized"
        examples = feature["examples_quantiles"][0]["examples"] if feature["examples_quantiles"] else []
        assert [e["tokens_acts_list"] for e in examples] == [c["acts"] for c in entry["top_contexts"]]
        assert [e["train_token_ind"] for e in examples] == [c["focus"] for c in entry["top_contexts"]]
        assert [e["tokens"] for e in examples] == [[_frontend_token(t) for t in c["tokens"]]
                                                   for c in entry["top_contexts"]]
        assert feature["act_max"] == entry["max_act"] and feature["activation_frequency"] == entry["density"]
        assert abs(sum(feature["histogram"]) - sum(entry["histogram"])) < 1e-3
        assert feature["quantile_values"] == sorted(feature["quantile_values"])
        assert feature["quantile_values"][-1] <= entry["max_act"] + 1e-6


def test_the_log_histogram_is_rebinned_onto_the_frontends_linear_axis():
    """All 36 activations in the log bin [1, 10) with max 10: spread evenly over 1..10, so the 20 linear bins
    of width 0.5 get 0, 0, then 2 each; the median is 5.5, the top percentile 10."""
    entry = {"max_act": 10.0, "density": 0.5, "histogram": [0, 36, 0], "top_contexts": [],
             "top_logits": [["<0x0A>", 1.0]], "bottom_logits": [["▁dog", -1.0]]}
    feature = circuit_tracer_feature(entry, 7, "blocks.0.ln2.hook_normalized", histogram_edges=[-1.0, 0.0, 1.0, 2.0])
    assert feature["histogram"] == pytest.approx([0, 0] + [2.0] * 18)
    assert feature["quantile_values"][49] == pytest.approx(5.5) and feature["quantile_values"][99] == pytest.approx(10)
    assert feature["top_logits"] == ["\\x0a"] and feature["bottom_logits"] == [" dog"]  # the frontend's byte escapes
    assert feature["examples_quantiles"] == []


def test_bad_dashboards_are_refused_before_anything_is_written(stories_model, tmp_path):
    transcoders = relu_transcoders(stories_model, d_sae=8, bias=-0.3)[:1]
    graph = build_graph(ReplacementModel(stories_model, transcoders), prompt="Once upon", progress=False)
    with pytest.raises(ValueError, match="dashboards needs a 'features' mapping"):
        write_graph_files(graph, tmp_path / "g", "x", dashboards={"nodes": []})
    assert not (tmp_path / "g").exists()


# ---- circuit-tracer's own server and page ---------------------------------------------------------------------

NPM = Path(os.environ.get("FC_CT_FRONTEND_NPM", Path.home() / ".cache/featcircuits/circuit-tracer-frontend-npm"))
SETUP = "python benchmarks/check_circuit_tracer_format.py frontend-setup"


def _circuit_tracer_python() -> Path | None:
    candidates = [os.environ.get("FC_CT_PYTHON"), "/tmp/ct-venv/bin/python", "/tmp/fc-graph-ct-venv/bin/python"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and subprocess.run(
                [candidate, "-c", "import circuit_tracer.frontend.local_server"], capture_output=True).returncode == 0:
            return Path(candidate)
    return None


def _cdn_routes(modules: Path) -> dict[str, Path | bytes]:
    """The page's CDN scripts, each from its npm package. unpkg serves npm's files, so dagre and pako are the
    same files. transformer-circuits.pub's d3.js is d3 v7; its jetpack build is d3-jetpack whose conventions()
    also returns drawAxis: the npm release's UMD file (which would replace the global d3, the name it exports
    under) is evaluated as the CommonJS module it also is, given d3 and d3-collection, and its exports and a
    drawAxis are added to d3. hotserver-client-ws.js (the authors' live-reload client) and npy_v0.js (a .npy
    reader, for files our graphs do not have) have no npm package: they are served empty."""
    jetpack = b"".join([
        b"(function () {\nvar collection = {exports: {}};\n(function (module, exports) {\n",
        (modules / "d3-collection/dist/d3-collection.js").read_bytes(),
        b"\n})(collection, collection.exports);\nvar jetpack = {exports: {}};\n(function (module, exports, require) {\n",
        (modules / "d3-jetpack/build/d3-jetpack.cjs").read_bytes(),
        b"\n})(jetpack, jetpack.exports, function (name) { return name === 'd3-collection' ? collection.exports : d3; });\n"
        b"Object.keys(jetpack.exports).forEach(function (key) { if (!(key in d3)) d3[key] = jetpack.exports[key]; });\n"
        b"var conventions = d3.conventions;\nd3.conventions = function (options) { var c = conventions(options);\n"
        b"  c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})); }; return c; };\n"
        b"})();\n",
    ])
    lib = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
    return {lib + "d3.js": modules / "d3/dist/d3.min.js", lib + "jetpack_2024-07-20.js": jetpack,
            lib + "hotserver-client-ws.js": b"", lib + "npy_v0.js": b"",
            "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": modules / "dagre/dist/dagre.min.js",
            "https://unpkg.com/pako@2.1.0/dist/pako.min.js": modules / "pako/dist/pako.min.js"}


@pytest.fixture()
def circuit_tracer_server(graph_files):
    if find_chromium() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium; .ci/run does)")
    python = _circuit_tracer_python()
    if python is None:
        pytest.skip("no circuit-tracer environment (set FC_CT_PYTHON to a python with circuit-tracer installed; "
                    "benchmarks/check_circuit_tracer_format.py says how to make one)")
    missing = [p for p in ("d3", "d3-jetpack", "d3-collection", "dagre", "pako") if not (NPM / "node_modules" / p).is_dir()]
    if missing:
        pytest.skip(f"the npm packages for the frontend's CDN scripts are not in {NPM} (missing {missing}): "
                    f"run `{SETUP}` once (needs the npm registry)")
    directory = graph_files[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = ("import sys, time\nfrom circuit_tracer.frontend.local_server import serve\n"
              "serve(data_dir=sys.argv[1], port=int(sys.argv[2]))\nprint('serving', flush=True)\ntime.sleep(600)\n")
    server = subprocess.Popen([str(python), "-c", script, str(directory), str(port)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "serving"
        frontend = subprocess.run([str(python), "-c", "from circuit_tracer.frontend.local_server import "
                                   "DEFAULT_FRONTEND_DIR as d; print(d)"], capture_output=True, text=True).stdout.strip()
        yield f"http://127.0.0.1:{port}", Path(frontend)
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_circuit_tracers_frontend_draws_our_graph_and_a_clicked_features_dashboard(graph_files, circuit_tracer_server):
    _, data, dashboards = graph_files
    url, frontend = circuit_tracer_server
    routes = _cdn_routes(NPM / "node_modules")
    page = (frontend / "index.html").read_text()
    external = re.findall(r"<script src='(https://[^']+)'", page)
    assert external and set(external) <= set(routes), f"scripts the test does not serve: {set(external) - set(routes)}"
    routes[f"{url}/favicon.ico"] = b""
    with HeadlessChromium(width=1400, height=1000) as browser:
        browser.route(routes)
        browser.open(f"{url}/index.html?slug=ours", "document.querySelectorAll('text.node').length > 0")
        drawn = browser.evaluate("[...document.querySelectorAll('text.node')].map(e => e.__data__.nodeId)")
        assert sorted(drawn) == sorted(n["node_id"] for n in data["nodes"])
        node = max((n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"),
                   key=lambda n: n["activation"])
        layer, index, _ = node["node_id"].split("_")
        entry = dashboards.features[f"{layer}_{index}"]
        centre = browser.evaluate(
            "(() => { const e = [...document.querySelectorAll('text.node')].find(e => e.__data__.nodeId == "
            f"{json.dumps(node['node_id'])}); e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect();"
            " return [r.left + r.width / 2, r.top + r.height / 2]; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):  # the page finds the node nearest the click
            browser.send("Input.dispatchMouseEvent", type=kind, x=centre[0], y=centre[1], button="left", clickCount=1)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not browser.evaluate(
                "document.querySelectorAll('.feature-example-list .ctx-container').length"):
            time.sleep(0.1)
        text = browser.evaluate("document.querySelector('.feature-detail').innerText")
        assert f"L{layer}/{index}" in text and f"Act: {node['activation']:.2f}" in text
        shown = browser.evaluate("document.querySelectorAll('.feature-example-list .ctx-container').length")
        assert shown == len(entry["top_contexts"]) > 0
        # the page joins the byte escapes back into characters; compare the text without its whitespace
        first = "".join(entry["top_contexts"][0]["tokens"])
        first = re.sub(r"<0x([0-9A-Fa-f]{2})>", lambda m: chr(int(m.group(1), 16)), first).replace("▁", " ")
        listed = browser.evaluate("document.querySelector('.feature-example-list').innerText")
        assert "".join(first.split()) in "".join(listed.split())
        assert f"{url}/data/features/stories260k/{node['feature']}.json" in browser.requests
        # the page's tooltip sets the label as HTML: it shows as text, and nothing ran
        assert HOSTILE in browser.evaluate("document.querySelector('.tooltip').innerText")
        assert browser.evaluate("document.querySelectorAll('img').length") == 0
        assert browser.errors == [] and browser.dialogs == []
