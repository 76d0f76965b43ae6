"""circuit-tracer JSON export (checked with an independent JSON Schema), networkx, and the CLI."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig, save_dictionary
from featcircuits.cli import main
from featcircuits.graph import build_graph, prune_graph, to_networkx, write_circuit_tracer_json

# Written from the pydantic models of circuit-tracer's circuit_tracer/frontend/graph_models.py
# (safety-research/circuit-tracer @ d797c82: Metadata, QParams, Node, Link, Model): required fields and types.
_STR, _INT, _NUM, _BOOL = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
CIRCUIT_TRACER_SCHEMA = {
    "type": "object",
    "required": ["metadata", "qParams", "nodes", "links"],
    "properties": {
        "metadata": {
            "type": "object",
            "required": ["slug", "scan", "transcoder_list", "prompt_tokens", "prompt"],
            "properties": {"slug": _STR, "scan": _STR, "transcoder_list": {"type": "array", "items": _STR},
                           "prompt_tokens": {"type": "array", "items": _STR}, "prompt": _STR,
                           "node_threshold": {"type": ["number", "null"]}},
        },
        "qParams": {
            "type": "object",
            "required": ["pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"],
            "properties": {"pinnedIds": {"type": "array", "items": _STR},
                           "supernodes": {"type": "array", "items": {"type": "array", "items": _STR}},
                           "linkType": _STR, "clickedId": _STR, "sg_pos": _STR},
        },
        "nodes": {"type": "array", "items": {
            "type": "object",
            "required": ["node_id", "feature", "layer", "ctx_idx", "feature_type", "jsNodeId"],
            "properties": {"node_id": _STR, "feature": _INT, "layer": _STR, "ctx_idx": _INT, "feature_type": _STR,
                           "token_prob": _NUM, "is_target_logit": _BOOL, "run_idx": _INT, "reverse_ctx_idx": _INT,
                           "jsNodeId": _STR, "clerp": _STR, "influence": {"type": ["number", "null"]},
                           "activation": {"type": ["number", "null"]}},
        }},
        "links": {"type": "array", "items": {
            "type": "object", "required": ["source", "target", "weight"],
            "properties": {"source": _STR, "target": _STR, "weight": _NUM},
        }},
    },
}


def dictionaries(d_model: int, layers, d_sae: int = 48, bias: float = -0.6) -> list[Dictionary]:
    out = []
    for layer in layers:
        cfg = DictionaryConfig(d_in=d_model, d_sae=d_sae, kind="transcoder", hook_in=f"blocks.{layer}.ln2.hook_normalized",
                               hook_out=f"blocks.{layer}.hook_mlp_out", model_name="test")
        dictionary = Dictionary.from_config(cfg)
        with torch.no_grad():
            dictionary.b_enc.fill_(bias)
        out.append(dictionary)
    cfg = DictionaryConfig(d_in=d_model, d_sae=d_sae, hook_in="blocks.0.hook_attn_out", model_name="test")
    sae = Dictionary.from_config(cfg)
    with torch.no_grad():
        sae.b_enc.fill_(bias / 2)
    return out + [sae]


def test_export_is_valid_circuit_tracer_json_and_matches_the_graph(tiny_gpt2, tmp_path):
    graph = build_graph(tiny_gpt2, dictionaries(32, [0, 1]), [0, 5, 17, 42, 8, 63], progress=False)
    pruned = prune_graph(graph, 0.8, 0.98)
    path = tmp_path / "graph.json"
    write_circuit_tracer_json(graph, path, slug="tiny", pruned=pruned)
    data = json.loads(path.read_text())
    jsonschema.validate(data, CIRCUIT_TRACER_SCHEMA)
    ids = [node["node_id"] for node in data["nodes"]]
    assert len(ids) == len(set(ids)) == pruned.n_nodes
    assert sum(node["is_target_logit"] for node in data["nodes"] if node["feature_type"] == "logit") == 1
    # attention SAE and transcoder share block 0, so exported layers are site indices: attn0=0, mlp0=1, mlp1=2
    by_id = {node["node_id"]: node for node in data["nodes"]}
    assert {n["layer"] for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"} <= {"0", "1", "2"}
    assert {n["layer"] for n in data["nodes"] if n["feature_type"] == "logit"} == {"4"}
    assert len(data["links"]) == pruned.n_edges > 0
    for link in data["links"][:200]:
        source = graph.index_of(by_id[link["source"]]["featcircuits_id"])
        target = graph.index_of(by_id[link["target"]]["featcircuits_id"])
        assert link["weight"] == pytest.approx(float(graph.adjacency[target, source]), rel=1e-6)
    digraph = to_networkx(graph, pruned)
    assert digraph.number_of_nodes() == pruned.n_nodes and digraph.number_of_edges() == pruned.n_edges
    source, target, weight = graph.edges()
    s, t = int(source[0]), int(target[0])
    assert to_networkx(graph)[graph.node_ids[s]][graph.node_ids[t]]["weight"] == pytest.approx(float(weight[0]))


def test_cli_builds_verifies_and_writes(stories_path, tmp_path, capsys):
    torch.manual_seed(3)
    folder = tmp_path / "dicts"
    for index, dictionary in enumerate(dictionaries(64, [0, 2, 4], d_sae=64, bias=-1.0)):
        save_dictionary(dictionary, folder / f"dictionary_{index}")
    out = tmp_path / "graph.json"
    code = main(["graph", "--model", str(stories_path), "--dictionaries", str(folder), "--prompt", "Once upon a time",
                 "--out", str(out), "--verify", "16", "--node-threshold", "0.7", "--edge-threshold", "0.95"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "replacement_score=" in printed and "completeness_score=" in printed
    error_line = [line for line in printed.splitlines() if line.startswith("max_rel_error=")]
    assert len(error_line) == 1 and float(error_line[0].split("=")[1]) <= 1e-5
    data = json.loads(out.read_text())
    jsonschema.validate(data, CIRCUIT_TRACER_SCHEMA)
    assert data["metadata"]["prompt"] == "Once upon a time" and data["metadata"]["node_threshold"] == 0.7


def test_cli_bad_input(stories_path, tmp_path, capsys):
    folder = tmp_path / "wrong"
    save_dictionary(dictionaries(32, [0])[0], folder / "d0")  # a dictionary for a 32-wide model
    code = main(["graph", "--model", str(stories_path), "--dictionaries", str(folder), "--prompt", "Once",
                 "--out", str(tmp_path / "g.json")])
    assert code == 2 and "expects d_in=32" in capsys.readouterr().err
    code = main(["graph", "--model", str(stories_path), "--dictionaries", str(tmp_path / "missing"), "--prompt", "x",
                 "--out", str(tmp_path / "g.json")])
    assert code == 2 and "missing" in capsys.readouterr().err
    assert not (tmp_path / "g.json").exists()


def test_circuit_tracer_interop_fields_graph_index_and_bos(stories_model, tmp_path):
    """circuit-tracer's current format: schema_version, cantor-paired feature ids, graph-metadata.json beside
    the graph files (replacing an entry of the same slug), and optionally no nodes at BOS."""
    from featcircuits.graph import ReplacementModel, build_graph
    from featcircuits.graph.export import cantor_pairing, to_circuit_tracer_json, write_graph_files

    stories_graph = build_graph(ReplacementModel(stories_model, dictionaries(64, [0, 2], bias=-0.3)),
                                prompt="Once upon a time there was a", progress=False)

    assert [cantor_pairing(x, y) for x, y in [(0, 0), (1, 0), (0, 1), (2, 3)]] == [0, 1, 2, 18]
    path = write_graph_files(stories_graph, tmp_path / "graphs", "first", node_threshold=1.0, edge_threshold=1.0)
    data = json.loads(path.read_text())
    assert data["metadata"]["schema_version"] == 1
    for node in data["nodes"]:
        if node["feature_type"] == "cross layer transcoder":
            layer, index, _ = node["node_id"].split("_")
            assert node["feature"] == cantor_pairing(int(layer), int(index))
    write_graph_files(stories_graph, tmp_path / "graphs", "second")
    write_graph_files(stories_graph, tmp_path / "graphs", "first")  # again: replaces its entry
    index = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["second", "first"]
    assert int(stories_graph.tokens[0]) == stories_graph.replacement.model.tokenizer.bos_token_id
    no_bos = to_circuit_tracer_json(stories_graph, node_threshold=1.0, edge_threshold=1.0, bos_nodes=False)
    with_bos = to_circuit_tracer_json(stories_graph, node_threshold=1.0, edge_threshold=1.0)
    at_bos = [n for n in with_bos["nodes"] if n["ctx_idx"] == 0 and n["feature_type"] != "embedding"]
    assert at_bos and not [n for n in no_bos["nodes"] if n["ctx_idx"] == 0 and n["feature_type"] != "embedding"]
    assert len(no_bos["nodes"]) == len(with_bos["nodes"]) - len(at_bos)
