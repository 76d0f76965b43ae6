"""Export attribution graphs: circuit-tracer / Neuronpedia graph JSON, and networkx.

The JSON follows circuit-tracer's ``create_graph_files`` output (``featcircuits.graph.schema`` holds the
schema): node ids ``"{layer}_{feature}_{pos}"`` for features, ``"err_{layer}_{pos}"`` for errors (circuit-tracer writes
``"0_{layer}_{pos}"``, which can equal a layer-0 feature's id; the viewer treats ids as opaque keys),
``"E_{token}_{pos}"`` for embeddings and ``"{n_layers + 1}_{token}_{pos}"`` for logits. ``layer`` is the
block index when every site sits in its own block (transcoders only, or SAEs only); when two sites
share a block (say a transcoder and an attention SAE) it is the site's index in forward order, so ids
stay unique. Every node also carries ``featcircuits_id``, its id in featcircuits' own scheme.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..dictionaries.io.common import atomic_path
from ..nodes import site_layer
from .attribution_graph import EMBEDDING, ERROR, FEATURE, AttributionGraph
from .prune import PruneResult, prune_graph
from .schema import GraphFile

__all__ = ["to_circuit_tracer_json", "write_circuit_tracer_json", "write_graph_files", "to_networkx", "export_layers",
           "cantor_pairing", "circuit_tracer_feature"]


def export_layers(graph: AttributionGraph) -> list[int]:
    """Exported ``layer`` of each site (see the module docstring)."""
    featured = sorted({int(s) for s in graph.node_keys[graph.mask(FEATURE), 1].tolist()})
    blocks = [site_layer(name) for name in graph.sites]
    featured_blocks = [blocks[i] for i in featured]
    if len(set(featured_blocks)) == len(featured_blocks):
        return blocks
    return list(range(len(graph.sites)))


def _token_strings(graph: AttributionGraph) -> list[str]:
    if graph.tokens is None:
        return [f"pos {p}" for p in sorted(set(graph.node_keys[:, 2].tolist()))]
    tokenizer = getattr(getattr(graph.replacement, "model", None), "tokenizer", None)
    ids = graph.tokens.tolist()
    if tokenizer is None:
        return [str(t) for t in ids]
    return [tokenizer.decode([t]).replace("\n", "⏎").replace("\t", "→").replace("\r", "↵") for t in ids]


def to_circuit_tracer_json(graph: AttributionGraph, slug: str = "featcircuits-graph", node_threshold: float = 0.8,
                           edge_threshold: float = 0.98, pruned: PruneResult | None = None,
                           scan: str | None = None, labels: Mapping[str, str] | None = None,
                           supernodes: Sequence[Any] | None = None, bos_nodes: bool = True) -> dict:
    """The graph, pruned (``prune_graph`` with the thresholds unless ``pruned`` is given), as a dict in
    circuit-tracer's graph-file format, validated against its schema. ``labels``: per dashboard key
    (``"<layer>_<feature>"``, :func:`featcircuits.explain.label_dashboards`) a feature's label, written as its
    ``clerp`` (HTML-escaped, see :func:`_clerp`). ``supernodes``: groups with ``name`` and ``members``
    (featcircuits node ids; :func:`featcircuits.explain.group_supernodes`), written to ``qParams.supernodes`` as
    Neuronpedia reads them (``[name, node_id, ...]``, members the pruning kept; names escaped as clerps are).
    ``bos_nodes=False`` leaves out the feature and error nodes at a leading BOS token, as circuit-tracer's
    graphs do (they attribute nothing through BOS)."""
    result = pruned if pruned is not None else prune_graph(graph, node_threshold, edge_threshold)
    layers = export_layers(graph)
    logit_layer = str(max(layers) + 2)
    keys = graph.node_keys.tolist()
    ids, activations, cumulative = graph.node_ids, graph.activations.tolist(), result.cumulative.tolist()
    tokens = graph.tokens.tolist() if graph.tokens is not None else None
    token_text = _token_strings(graph)
    kept = result.node_mask.nonzero().squeeze(1).tolist()
    if not bos_nodes and _starts_with_bos(graph):
        kept = [i for i in kept if not (keys[i][0] in (FEATURE, ERROR) and keys[i][2] == 0)]
    # dataset-level graphs count positions from the end (negative); the viewer wants 0-based positions
    shift = -min(0, int(graph.node_keys[:, 2].min())) if graph.n_nodes else 0
    first_target = True
    nodes, export_id = [], {}
    for i in kept:
        kind, site, pos, index = keys[i]
        pos += shift
        common = {"ctx_idx": pos, "influence": cumulative[i], "featcircuits_id": ids[i]}
        if kind == FEATURE:
            layer = layers[site]
            # circuit-tracer's feature field is cantor(layer, index), a global id its dashboard lookups use
            node = {"node_id": f"{layer}_{index}_{pos}", "feature": cantor_pairing(layer, index), "layer": str(layer),
                    "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{index}-0",
                    "activation": activations[i], **common}
            if labels and f"{layer}_{index}" in labels:  # the dashboards' key of this feature
                node["clerp"] = _clerp(labels[f"{layer}_{index}"])
        elif kind == ERROR:
            layer = layers[site]
            kind_name = graph.sites[site].rstrip("0123456789").split("_")[0]  # mlp, attn or resid
            node = {"node_id": f"err_{layer}_{pos}", "feature": -1, "layer": str(layer),
                    "feature_type": f"{kind_name} reconstruction error", "jsNodeId": f"{layer}_{pos}-0", **common}
        elif kind == EMBEDDING:
            token = tokens[pos] if tokens is not None else "pos"
            node = {"node_id": f"E_{token}_{pos}", "feature": pos, "layer": "E", "feature_type": "embedding",
                    "jsNodeId": f"E_{token}-{pos}", **common}
        else:
            target = graph.targets[index]
            vocab = target.token if target.token is not None else index
            label = target.name if target.token is None else _decode(graph, target.token)
            prob = target.weight if target.is_logit else 0.0
            node = {"node_id": f"{logit_layer}_{vocab}_{pos}", "feature": vocab, "layer": logit_layer,
                    "feature_type": "logit", "token_prob": prob, "is_target_logit": first_target,
                    "jsNodeId": f"L_{vocab}-{pos}",
                    "clerp": _clerp(f'Output "{label}" (p={prob:.3f})' if target.is_logit else f'Target "{label}"'),
                    **common}
            first_target = False
        if ids[i] in graph.node_effects:  # measured by featcircuits.explain.measure_node_effects
            node["ablation_effect"] = graph.node_effects[ids[i]][0]  # on the first (main) target
        export_id[i] = node["node_id"]
        nodes.append(node)
    masked = graph.adjacency * result.edge_mask
    targets, sources = masked.nonzero(as_tuple=True)
    weights = masked[targets, sources].tolist()
    links = [{"source": export_id[s], "target": export_id[t], "weight": w}
             for s, t, w in zip(sources.tolist(), targets.tolist(), weights, strict=True)
             if s in export_id and t in export_id]
    model = graph.replacement.model if graph.replacement is not None else None
    featured = sorted({int(s) for s in graph.node_keys[graph.mask(FEATURE), 1].tolist()})
    transcoders = [graph.sites[i] for i in featured]
    data = {
        "metadata": {
            "slug": slug, "scan": scan or (model.cfg.model_name if model is not None else "featcircuits"),
            "transcoder_list": transcoders, "prompt_tokens": token_text, "prompt": graph.prompt,
            "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION, "clerp_html_escaped": True,
        },
        "qParams": {"pinnedIds": [], "supernodes": _supernode_lists(supernodes, ids, export_id), "linkType": "both",
                    "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }
    GraphFile.model_validate(data)
    return data


def _clerp(text: str) -> str:
    """A label as circuit-tracer's frontend may place it: its tooltip sets ``clerp`` as HTML, so a token string
    like ``<img onerror=...>`` would run there; ``&``, ``<`` and ``>`` go as entities (the graph's metadata says
    ``clerp_html_escaped``, and featcircuits' viewer reads them back as text)."""
    return html.escape(str(text), quote=False)


def _decode(graph: AttributionGraph, token: int) -> str:
    tokenizer = getattr(getattr(graph.replacement, "model", None), "tokenizer", None)
    return tokenizer.decode([token]) if tokenizer is not None else str(token)


SCHEMA_VERSION = 1  # circuit-tracer's graph-file schema version


def _starts_with_bos(graph: AttributionGraph) -> bool:
    tokenizer = getattr(getattr(graph.replacement, "model", None), "tokenizer", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    return graph.tokens is not None and bos is not None and int(graph.tokens[0]) == int(bos)


def cantor_pairing(layer: int, index: int) -> int:
    """circuit-tracer's global feature id: ``(layer + index) (layer + index + 1) / 2 + index``."""
    return (layer + index) * (layer + index + 1) // 2 + index


def write_graph_files(graph: AttributionGraph, directory: str | Path, slug: str, dashboards: Any = None,
                      **kwargs: Any) -> Path:
    """Write ``{slug}.json`` into ``directory`` and add it to the directory's ``graph-metadata.json`` (replacing
    an entry of the same slug), the layout circuit-tracer's ``start-server`` and frontend read. ``kwargs`` go
    to :func:`to_circuit_tracer_json`. Returns the graph file's path.

    ``dashboards`` (a ``FeatureDashboards`` or its JSON dict): the graph's features get dashboard files in the
    layout circuit-tracer's frontend fetches, ``features/{scan}/{feature}.json`` (``feature`` the node's
    cantor-paired id, content :func:`circuit_tracer_feature`), and the graph's ``scan`` becomes
    ``./data/features/{scan}``: a scan starting ``./`` tells the frontend to fetch ``{scan}/{feature}.json``
    from the server (which maps ``./data/`` onto ``directory``) rather than from its cloud bucket.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is a file; give a directory for the graph files.")
    features = _dashboard_features(dashboards)
    if features is not None:
        model = graph.replacement.model if graph.replacement is not None else None
        name = str(kwargs.get("scan") or (model.cfg.model_name if model is not None else "featcircuits"))
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "featcircuits"
        kwargs["scan"] = f"./data/features/{name}"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{slug}.json"
    data = write_circuit_tracer_json(graph, path, slug=slug, **kwargs)
    if features is not None:
        _write_feature_files(graph, data, features, directory / "features" / kwargs["scan"].rsplit("/", 1)[1])
    index_path = directory / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.is_file() else {"graphs": []}
    if not isinstance(index, dict) or not isinstance(index.get("graphs"), list):
        raise ValueError(f"{index_path} is not a graph index ({{'graphs': [...]}}); move it aside and write again.")
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [data["metadata"]]
    with atomic_path(index_path) as tmp, open(tmp, "w") as file:
        json.dump(index, file, indent=2)
    return path


def _dashboard_features(dashboards: Any) -> Mapping[str, Any] | None:
    if dashboards is None:
        return None
    data = dashboards.to_json_dict() if hasattr(dashboards, "to_json_dict") else dashboards
    if not isinstance(data, Mapping) or not isinstance(data.get("features"), Mapping):
        raise ValueError("dashboards needs a 'features' mapping of '<layer>_<feature>' entries (a FeatureDashboards "
                         "or the JSON dict FeatureDashboards.save writes).")
    hooks = {str(layer): info.get("hook_in") for layer, info in (data.get("dictionaries") or {}).items()}
    return {**data["features"], "__edges__": data.get("histogram_edges") or [], "__hooks__": hooks}


def _write_feature_files(graph: AttributionGraph, data: dict, features: Mapping[str, Any], folder: Path) -> None:
    """One file per exported feature with a dashboard entry (each written atomically)."""
    layers = export_layers(graph)
    # the dictionary's input hook names it, as circuit-tracer's transcoder ids do; else the graph's site name
    site_of: dict[str, str] = {str(layers[site]): graph.sites[site] for site in range(len(graph.sites))}
    site_of.update({str(layer): str(hook) for layer, hook in features["__hooks__"].items() if hook})
    folder.mkdir(parents=True, exist_ok=True)
    written = set()
    for node in data["nodes"]:
        entry = features.get(f"{node['layer']}_{node['node_id'].split('_')[1]}")
        if node["feature_type"] != "cross layer transcoder" or entry is None or node["feature"] in written:
            continue
        feature = circuit_tracer_feature(entry, node["feature"], site_of.get(node["layer"], str(node["layer"])),
                                         features["__edges__"])
        with atomic_path(folder / f"{node['feature']}.json") as tmp, open(tmp, "w") as file:
            json.dump(feature, file, ensure_ascii=False, allow_nan=False)
        written.add(node["feature"])


# tokenizer pieces -> the text they stand for (SentencePiece's word start, GPT-2's byte-level space/newline/tab);
# byte-fallback pieces "<0xNN>" -> the "\xNN" escapes circuit-tracer's frontend joins back into characters
_PIECE_TEXT = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": "\n", "ĉ": "\t"})
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _piece_text(piece: Any) -> str:
    match = _BYTE_PIECE.match(str(piece))
    return f"\\x{match.group(1).lower()}" if match else str(piece).translate(_PIECE_TEXT)


def circuit_tracer_feature(entry: Mapping[str, Any], feature_id: int, transcoder_id: str,
                           histogram_edges: Sequence[float] = (), n_bins: int = 20) -> dict[str, Any]:
    """A dashboard entry (:func:`featcircuits.viz.compute_dashboards`) as the feature file circuit-tracer's frontend
    reads (its ``frontend/feature_models.py`` Model): the top activating contexts as one quantile of examples,
    promoted and suppressed tokens, activation frequency.

    The frontend draws ``histogram`` on a linear axis from ``act_min`` to ``act_max`` and places the node's
    activation among ``quantile_values``; dashboards bin ``log10`` of the activations, so both are rebinned from
    that histogram, each log bin's count spread evenly over its span (exact to one log bin's width)."""
    max_act = float(entry.get("max_act") or 0.0)
    examples = [{"tokens": [_piece_text(token) for token in context.get("tokens", [])],
                 "tokens_acts_list": [float(a) for a in context.get("acts", [])],
                 "train_token_ind": int(context.get("focus", 0)), "is_repeated_datapoint": False}
                for context in entry.get("top_contexts") or []]
    histogram, quantiles = _linear_histogram(entry.get("histogram") or [], histogram_edges, max_act, n_bins)
    return {
        "transcoder_id": str(transcoder_id), "index": int(feature_id),
        "examples_quantiles": [{"quantile_name": "Top activations", "examples": examples}] if examples else [],
        "top_logits": [_piece_text(pair[0]) for pair in entry.get("top_logits") or []],
        "bottom_logits": [_piece_text(pair[0]) for pair in entry.get("bottom_logits") or []],
        "act_min": 0.0, "act_max": max_act, "quantile_values": quantiles, "histogram": histogram,
        "activation_frequency": float(entry.get("density") or 0.0),
    }


def _linear_histogram(counts: Sequence[float], log_edges: Sequence[float], max_act: float,
                      n_bins: int) -> tuple[list[float], list[float]]:
    """``n_bins`` counts over ``[0, max_act]`` and the 100 percentiles, from counts over ``log10`` edges (the
    first and last log bins also hold what fell below and above the edges)."""
    if not counts or len(log_edges) != len(counts) + 1 or max_act <= 0 or sum(counts) <= 0:
        return [0.0] * n_bins, [max_act] * 100
    low = torch.tensor([10.0 ** e for e in log_edges[:-1]], dtype=torch.float64).clamp(max=max_act)
    high = torch.tensor([10.0 ** e for e in log_edges[1:]], dtype=torch.float64).clamp(max=max_act)
    low[0], high[-1] = 0.0, max_act
    weight = torch.tensor(counts, dtype=torch.float64)
    width = high - low
    # a log bin wholly above max_act spans nothing (its count can only be rounding at the top): the last linear bin
    low = torch.where(width > 0, low, torch.full_like(low, max_act * (1 - 1 / n_bins)))
    high = torch.where(width > 0, high, torch.full_like(high, max_act))
    edges = torch.linspace(0.0, max_act, n_bins + 1, dtype=torch.float64)
    overlap = (torch.minimum(high[:, None], edges[None, 1:]) - torch.maximum(low[:, None], edges[None, :-1])).clamp(min=0)
    linear = (overlap / (high - low)[:, None] * weight[:, None]).sum(0)  # [n_bins]
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), linear.cumsum(0) / linear.sum()])
    wanted = torch.arange(1, 101, dtype=torch.float64) / 100
    # the activation at each percentile, linear inside the bin where the cumulative count crosses it
    upper = torch.searchsorted(cdf, wanted).clamp(1, n_bins)
    below, above = cdf[upper - 1], cdf[upper]
    fraction = ((wanted - below) / (above - below).clamp(min=1e-12)).clamp(0, 1)
    quantiles = edges[upper - 1] + fraction * (edges[upper] - edges[upper - 1])
    return [round(float(v), 6) for v in linear], [round(float(v), 6) for v in quantiles]


def _supernode_lists(supernodes: Sequence[Any] | None, ids: list[str], export_id: dict[int, str]) -> list[list[str]]:
    """``[[name, exported node id, ...], ...]`` for the groups with at least two members kept by the pruning."""
    if not supernodes:
        return []
    exported = {ids[i]: node_id for i, node_id in export_id.items()}
    lists = []
    for group in supernodes:
        name, members = (group.name, group.members) if hasattr(group, "members") else (group[0], group[1])
        kept = [exported[m] for m in members if m in exported]
        if len(kept) >= 2:
            lists.append([_clerp(str(name)), *kept])  # shown as a clerp by circuit-tracer's frontend
    return lists


def write_circuit_tracer_json(graph: AttributionGraph, path: str | Path, **kwargs) -> dict:
    """Write :func:`to_circuit_tracer_json` to ``path`` atomically (temporary file, then rename)."""
    data = to_circuit_tracer_json(graph, **kwargs)
    with atomic_path(path) as tmp, open(tmp, "w") as file:
        json.dump(data, file)
    return data


def to_networkx(graph: AttributionGraph, pruned: PruneResult | None = None):
    """A ``networkx.DiGraph`` keyed by featcircuits node ids, edges source -> target with ``weight``;
    node attributes ``kind, site, pos, feature, activation``. Only kept nodes/edges when ``pruned``."""
    import networkx as nx

    ids = graph.node_ids
    keys = graph.node_keys.tolist()
    activations = graph.activations.tolist()
    kinds = ("feature", "error", "embedding", "target")
    node_mask = pruned.node_mask if pruned is not None else torch.ones(graph.n_nodes, dtype=torch.bool, device=graph.adjacency.device)
    adjacency = graph.adjacency * pruned.edge_mask if pruned is not None else graph.adjacency
    digraph = nx.DiGraph()
    for i in node_mask.nonzero().squeeze(1).tolist():
        kind, site, pos, index = keys[i]
        digraph.add_node(ids[i], kind=kinds[kind], site=graph.sites[site] if site >= 0 else None, pos=pos,
                         feature=index if kind == FEATURE else None, activation=activations[i])
    targets, sources = adjacency.nonzero(as_tuple=True)
    weights = adjacency[targets, sources].tolist()
    keep = node_mask.tolist()
    digraph.add_weighted_edges_from(
        (ids[s], ids[t], w) for s, t, w in zip(sources.tolist(), targets.tolist(), weights, strict=True)
        if keep[s] and keep[t]
    )
    return digraph
