"""AttributionGraph.save / load: lossless on a real stories260k graph, and clear errors on bad files or models."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig, load_model
from featcircuits.graph import (
    AttributionGraph,
    ReplacementModel,
    apply_prune,
    build_dataset_graph,
    build_graph,
    graph_scores,
    prune_graph,
    prune_topk,
    to_circuit_tracer_json,
    to_networkx,
    verify,
)
from featcircuits.graph.attribution_graph import GRAPH_FORMAT_VERSION

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PROMPT = "Once upon a time there was"


def dictionary(hook_in: str, hook_out: str, d_sae: int, bias: float, kind: str) -> Dictionary:
    cfg = DictionaryConfig(d_in=64, d_sae=d_sae, kind=kind, hook_in=hook_in, hook_out=hook_out)
    made = Dictionary.from_config(cfg)
    with torch.no_grad():
        made.b_enc.fill_(bias)
        made.b_dec.normal_(0, 0.05)
    return made


def stories_dictionaries(d_sae: int = 64) -> list[Dictionary]:
    made = [dictionary(f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out", d_sae, -0.9, "transcoder")
            for layer in (0, 2, 4)]
    return made + [dictionary("blocks.1.hook_attn_out", "blocks.1.hook_attn_out", d_sae, -0.5, "sae")]


@pytest.fixture(scope="module")
def replacement(stories_model):
    torch.manual_seed(1)
    return ReplacementModel(stories_model, stories_dictionaries())


@pytest.fixture(scope="module")
def graph(replacement):
    return build_graph(replacement, prompt=PROMPT, progress=False)


@pytest.fixture(scope="module")
def saved(graph, tmp_path_factory):
    folder = tmp_path_factory.mktemp("graph")
    graph.save(folder / "graph")
    return folder / "graph"


def assert_same(actual, expected, where: str = "graph") -> None:
    """Equal in every field, tensors bit-exact with the same dtype (dataclasses compared field by field)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert actual.shape == expected.shape and torch.equal(actual, expected), where
    elif dataclasses.is_dataclass(expected):
        assert type(actual) is type(expected), where
        for f in dataclasses.fields(expected):
            assert_same(getattr(actual, f.name), getattr(expected, f.name), f"{where}.{f.name}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same(a, e, f"{where}[{index}]")
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}[{key!r}]")
    elif isinstance(expected, float):
        assert type(actual) is float and (actual == expected or actual != actual and expected != expected), where
    else:
        assert actual == expected, where


def without_model(graph: AttributionGraph) -> AttributionGraph:
    return dataclasses.replace(graph, replacement=None, clean=None)


def test_save_then_load_gives_back_every_field_bit_exact(graph, saved, replacement):
    tensors_file, json_file = saved.with_suffix(".safetensors"), saved.with_suffix(".json")
    assert sorted(p.name for p in saved.parent.iterdir()) == ["graph.json", "graph.safetensors"]  # no temporaries
    meta = json.loads(json_file.read_text())
    assert meta["format_version"] == GRAPH_FORMAT_VERSION and meta["featcircuits_version"]
    assert meta["node_ids"] == graph.node_ids and meta["provenance"]["model"] == {
        "name": "stories260k", "n_layers": 5, "d_model": 64, "d_vocab": 512, "dtype": "float32"}
    assert [d["d_sae"] for d in meta["provenance"]["dictionaries"]] == [64, 64, 0, 64, 0, 64]
    assert meta["provenance"]["dictionaries"][1]["hook_in"] == "blocks.1.hook_attn_out"

    loaded = AttributionGraph.load(saved)
    assert loaded.replacement is None and loaded.clean is None
    assert_same(loaded, without_model(graph))
    for name in (tensors_file, json_file):  # either file names the graph
        assert_same(AttributionGraph.load(name), without_model(graph))
    with pytest.raises(ValueError, match="graphs loaded from files have none"):
        verify(loaded)

    attached = AttributionGraph.load(saved, model=replacement)
    assert attached.replacement is replacement
    assert_same(attached, graph)  # the clean run recomputed bit-exactly
    assert_same(verify(attached, n_sources=12, seed=3), verify(graph, n_sources=12, seed=3))

    resaved = loaded.save(saved.parent / "again")  # a loaded graph saves to the same bytes
    assert resaved[0].read_bytes() == tensors_file.read_bytes() and resaved[1].read_text() == json_file.read_text()


def test_loaded_graphs_prune_score_and_export_identically(graph, saved, replacement):
    loaded, attached = AttributionGraph.load(saved), AttributionGraph.load(saved, model=replacement)
    for copy in (loaded, attached):
        assert_same(prune_graph(copy, 0.8, 0.98), prune_graph(graph, 0.8, 0.98))
        assert_same(prune_topk(copy, n_nodes=20, n_edges=60), prune_topk(graph, n_nodes=20, n_edges=60))
        assert_same(apply_prune(copy, prune_graph(copy)), apply_prune(graph, prune_graph(graph)))
        assert graph_scores(copy) == graph_scores(graph)
        exported, network = to_networkx(copy), to_networkx(graph)
        assert list(exported.nodes(data=True)) == list(network.nodes(data=True))
        assert list(exported.edges(data=True)) == list(network.edges(data=True))
    assert to_circuit_tracer_json(attached) == to_circuit_tracer_json(graph)
    # without a model, export has no tokenizer for its labels (the text is in the provenance); the rest is identical
    bare, full = to_circuit_tracer_json(loaded), to_circuit_tracer_json(graph)
    assert bare["links"] == full["links"]
    assert [{k: v for k, v in node.items() if k != "clerp"} for node in bare["nodes"]] == [
        {k: v for k, v in node.items() if k != "clerp"} for node in full["nodes"]]
    assert full["metadata"]["prompt_tokens"][1:] == [text.strip() for text in loaded.provenance["token_strings"][1:]]
    assert loaded.provenance["target_strings"] == [replacement.model.tokenizer.decode([t.token]) for t in graph.targets]


def test_dataset_graphs_and_graphs_without_provenance_roundtrip(replacement, tmp_path):
    mean = build_dataset_graph(replacement, prompts=["Once upon a time", "The little dog ran to the"],
                               answers=[281, 281], distractors=[410, 362], max_feature_nodes=30, progress=False)
    mean.save(tmp_path / "mean.safetensors")
    loaded = AttributionGraph.load(tmp_path / "mean", model=replacement.model)
    assert loaded.tokens is None and loaded.n_prompts == 2 and loaded.node_keys[:, 2].max() == -1
    assert_same(loaded, mean)
    assert loaded.provenance["model"]["name"] == "stories260k"
    unrecorded = AttributionGraph(**{f.name: getattr(mean, f.name) for f in dataclasses.fields(mean)
                                     if f.name != "provenance"})  # nothing recorded about its model
    unrecorded.save(tmp_path / "bare")
    assert_same(AttributionGraph.load(tmp_path / "bare"), unrecorded)
    with pytest.raises(ValueError, match="records no model .* load it without model="):
        AttributionGraph.load(tmp_path / "bare", model=replacement.model)


def copy_files(saved, folder):
    for suffix in (".safetensors", ".json"):
        (folder / f"g{suffix}").write_bytes(saved.with_suffix(suffix).read_bytes())
    return folder / "g"


def test_bad_files_fail_clearly(saved, tmp_path):
    path = copy_files(saved, tmp_path)
    meta = json.loads(path.with_suffix(".json").read_text())
    for version, fix in ((GRAPH_FORMAT_VERSION + 1, "upgrade featcircuits"), (0, "rebuild the graph")):
        path.with_suffix(".json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(ValueError, match=rf"format version {version} .* reads format version "
                                             rf"{GRAPH_FORMAT_VERSION}; {fix}"):
            AttributionGraph.load(path)
    path.with_suffix(".json").write_text(json.dumps({"nodes": []}))
    with pytest.raises(ValueError, match="not a saved featcircuits attribution graph"):
        AttributionGraph.load(path)
    path.with_suffix(".json").write_text(json.dumps(meta)[:100])
    with pytest.raises(ValueError, match="not valid JSON .* corrupt or truncated"):
        AttributionGraph.load(path)
    path.with_suffix(".json").write_text(json.dumps(meta))

    data = saved.with_suffix(".safetensors").read_bytes()
    path.with_suffix(".safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="g.safetensors does not match the checksum .* truncated or corrupt"):
        AttributionGraph.load(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # one adjacency byte: a file that still parses
    path.with_suffix(".safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="truncated or corrupt"):
        AttributionGraph.load(path)
    path.with_suffix(".safetensors").write_bytes(data[:7])  # checksum skipped: the safetensors reader refuses too
    path.with_suffix(".json").write_text(json.dumps({**meta, "tensors_sha256": __import__("hashlib").sha256(
        data[:7]).hexdigest()}))
    with pytest.raises(ValueError, match="not a readable safetensors file .* truncated or corrupt"):
        AttributionGraph.load(path)

    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match=r"No graph metadata at .*g\.json.*side by side"):
        AttributionGraph.load(path)
    copy_files(saved, tmp_path)
    path.with_suffix(".safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"No graph tensors at .*g\.safetensors"):
        AttributionGraph.load(path)


def test_a_graph_for_another_model_is_refused_naming_both(saved, stories_path, stories_model, tiny_llama):
    with pytest.raises(ValueError, match=r"built on model name=stories260k, n_layers=5, d_model=64, d_vocab=512, but "
                                         r"the model given has name=.*n_layers=2, d_model=32, d_vocab=97"):
        AttributionGraph.load(saved, model=tiny_llama)
    renamed = load_model(stories_path)
    renamed.cfg.model_name = "stories260k-other"
    with pytest.raises(ValueError, match=r"name=stories260k, .* has name=stories260k-other, .*differing: \['name'\]"):
        AttributionGraph.load(saved, model=renamed)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="built with other dictionaries .*mlp0: saved .*'d_sae': 64.*'d_sae': 32"):
        AttributionGraph.load(saved, model=ReplacementModel(stories_model, stories_dictionaries(d_sae=32)))
    with pytest.raises(ValueError, match="do not reproduce the feature activations"):
        AttributionGraph.load(saved, model=ReplacementModel(stories_model, stories_dictionaries()))
    assert AttributionGraph.load(saved, model=stories_model).replacement is None  # a bare model: checked only
