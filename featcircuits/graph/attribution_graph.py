"""AttributionGraph: the nodes and exact direct-effect edges of one prompt (or a mean over prompts).

``save`` / ``load`` keep a graph in two files side by side: ``NAME.safetensors`` (node keys, adjacency,
activations, tokens, target vectors) and ``NAME.json`` (everything else, with the format version, the
featcircuits version, the model's and dictionaries' identities and the tensors file's checksum).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..dictionaries.io.common import atomic_path, read_json, read_tensors
from ..nodes import NODE_KINDS, Node, parse_node_id
from .targets import Target

__all__ = ["AttributionGraph", "FEATURE", "ERROR", "EMBEDDING", "TARGET", "GRAPH_FORMAT", "GRAPH_FORMAT_VERSION",
           "graph_provenance"]

# node kind codes, in the order nodes are stored
FEATURE, ERROR, EMBEDDING, TARGET = range(4)

GRAPH_FORMAT = "featcircuits.attribution_graph"
GRAPH_FORMAT_VERSION = 1
_MODEL_KEYS = ("name", "n_layers", "d_model", "d_vocab")


def _model_identity(model: Any) -> dict[str, Any]:
    cfg = model.cfg
    return {"name": str(cfg.model_name), "n_layers": int(cfg.n_layers), "d_model": int(cfg.d_model),
            "d_vocab": int(cfg.d_vocab), "dtype": str(cfg.dtype).removeprefix("torch.")}


def _dictionary_identities(replacement: Any) -> list[dict[str, Any]]:
    rows = []
    for site in replacement.sites:
        cfg = site.dictionary.cfg if site.dictionary is not None else None
        rows.append({"site": site.name, "hook_in": site.hook_in, "hook_out": site.hook_out, "d_sae": site.d_sae,
                     "kind": cfg.kind if cfg else None, "activation": cfg.activation if cfg else None,
                     "k": cfg.k if cfg else None, "d_in": cfg.d_in if cfg else None,
                     "d_out": cfg.d_out if cfg else None, "model_name": cfg.model_name if cfg else None})
    return rows


def graph_provenance(replacement: Any, tokens: torch.Tensor | None = None,
                     targets: Sequence[Target] = ()) -> dict[str, Any]:
    """What a graph built on ``replacement`` (a ReplacementModel) records about it: the model's name and
    shape, every site's dictionary identity (hooks, ``d_sae``, kind; ``d_sae=0`` for a bare MLP) and, with
    a tokenizer, the text of the prompt's tokens and of logit targets (so a graph read without its model
    can still be labelled)."""
    provenance: dict[str, Any] = {"model": _model_identity(replacement.model),
                                  "dictionaries": _dictionary_identities(replacement)}
    tokenizer = getattr(replacement.model, "tokenizer", None)
    if tokenizer is not None:
        if tokens is not None:
            provenance["token_strings"] = [tokenizer.decode([t]) for t in tokens.tolist()]
        provenance["target_strings"] = [None if t.token is None else tokenizer.decode([t.token]) for t in targets]
    return provenance


@dataclass
class AttributionGraph:
    """Nodes in the order ``[features, errors, embeddings, targets]`` and their direct-effect edges.

    Attributes:
        node_keys: ``[n_nodes, 4]`` int64 rows ``(kind, site index, pos, index)``; ``index`` is the feature
            id for features, the index into ``targets`` for targets, ``-1`` otherwise; ``site index`` is
            ``-1`` for embeddings and targets. Features are sorted by (site, pos, feature id).
        adjacency: ``[n_nodes, n_nodes]`` dense; ``adjacency[t, s]`` is the direct effect of source ``s``
            on target ``t`` (activation times gradient through the frozen replacement model). Rows of
            embeddings and errors are zero (they have no inputs).
            An embedding node is the whole input of block 0 at its position (``blocks.0.hook_resid_pre``:
            the token embedding plus, on learned-position models such as GPT-2, the position embedding
            ``W_pos[pos]``), so its edge is the exact effect of that vector on the target and every target's
            incoming edges sum to its value minus its value with all sources zeroed (a run with no features,
            errors or embeddings). circuit-tracer's embedding node is the token embedding ``W_E[token]``
            alone; on learned-position models its edges therefore lack the position part
            ``(d target / d resid_pre_0) . W_pos[pos]``, which no node of its graph carries. The two agree
            on models without learned positions (rotary, as in Llama and Gemma).
        activations: ``[n_nodes]`` feature activation, error / embedding vector norm, or target value.
        sites: site names, indexed by ``node_keys[:, 1]``.
        targets: the targets, indexed by ``node_keys[:, 3]`` of target nodes.
        tokens: ``[n_pos]`` prompt tokens (None for dataset-level graphs, whose positions are negative,
            aligned at each prompt's end).
        replacement, clean: the model and clean run the graph was built from (what :func:`verify` needs).
        provenance: the model's and dictionaries' identities (:func:`graph_provenance`), filled from
            ``replacement`` when it is given and kept when the graph is saved, loaded or has no model
            attached; any other JSON-serialisable entries (a build's parameters) are saved with it.
        node_effects: per node id, the measured change of each target when that node alone is ablated in the
            live replacement model (:func:`featcircuits.explain.measure_node_effects`); empty until measured.
    """

    node_keys: torch.Tensor
    adjacency: torch.Tensor
    activations: torch.Tensor
    sites: list[str]
    targets: list[Target]
    tokens: torch.Tensor | None = None
    prompt: str = ""
    n_active_features: int = 0
    replacement: Any = field(default=None, repr=False)
    clean: Any = field(default=None, repr=False)
    n_prompts: int = 1
    provenance: dict[str, Any] = field(default_factory=dict, repr=False)
    node_effects: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.provenance and self.replacement is not None:
            self.provenance = graph_provenance(self.replacement, self.tokens, self.targets)

    # ---- counts and masks --------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return int(self.node_keys.shape[0])

    def mask(self, kind: int) -> torch.Tensor:
        """``[n_nodes]`` bool: nodes of ``kind`` (FEATURE, ERROR, EMBEDDING or TARGET)."""
        return self.node_keys[:, 0] == kind

    def count(self, kind: int) -> int:
        return int(self.mask(kind).sum())

    @property
    def n_features(self) -> int:
        return self.count(FEATURE)

    @property
    def n_edges(self) -> int:
        return int((self.adjacency != 0).sum())

    @property
    def target_weights(self) -> torch.Tensor:
        """``[n_nodes]`` target weight (logit probability or 1) on target nodes, zero elsewhere."""
        weights = torch.zeros(self.n_nodes, dtype=self.adjacency.dtype, device=self.adjacency.device)
        target_rows = self.mask(TARGET).nonzero().squeeze(1)
        index = self.node_keys[target_rows, 3]
        weights[target_rows] = torch.tensor([self.targets[i].weight for i in index.tolist()],
                                            dtype=weights.dtype, device=weights.device)
        return weights

    # ---- node ids ------------------------------------------------------------------------------

    def node(self, index: int) -> Node:
        kind, site, pos, idx = (int(v) for v in self.node_keys[index].tolist())
        if kind == FEATURE:
            return Node("feature", pos, site=self.sites[site], feature=idx)
        if kind == ERROR:
            return Node("error", pos, site=self.sites[site])
        if kind == EMBEDDING:
            return Node("embedding", pos)
        target = self.targets[idx]
        return Node("target", pos, name=target.name, is_logit=target.is_logit)

    @property
    def node_ids(self) -> list[str]:
        """Node id strings (``featcircuits.graph.nodes``), in node order."""
        return [self.node(i).id for i in range(self.n_nodes)]

    def index_of(self, node_id: str | Node) -> int:
        """Row/column of a node id; ``KeyError`` naming it when the graph lacks it."""
        node = parse_node_id(node_id) if isinstance(node_id, str) else node_id
        kind = NODE_KINDS.index(node.kind)
        site = self.sites.index(node.site) if node.site in self.sites else -1
        if kind == TARGET:
            names = [t.name for t in self.targets]
            idx = names.index(node.name) if node.name in names else -2
        else:
            idx = node.feature if node.feature is not None else -1
        key = torch.tensor([kind, site, node.pos, idx], device=self.node_keys.device)
        hits = (self.node_keys == key).all(dim=1).nonzero()
        if hits.numel() == 0:
            raise KeyError(f"Node {node.id!r} is not in this graph ({self.n_nodes} nodes).")
        return int(hits[0, 0])

    def edges(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Non-zero edges as ``(source index [m], target index [m], weight [m])``."""
        targets, sources = self.adjacency.nonzero(as_tuple=True)
        return sources, targets, self.adjacency[targets, sources]

    def to(self, device: str | torch.device) -> AttributionGraph:
        self.node_keys = self.node_keys.to(device)
        self.adjacency = self.adjacency.to(device)
        self.activations = self.activations.to(device)
        return self

    # ---- files ---------------------------------------------------------------------------------

    def save(self, path: str | Path, sparse: bool = False) -> tuple[Path, Path]:
        """Write the graph losslessly to ``NAME.safetensors`` and ``NAME.json`` (``path`` is either file or
        ``NAME``); both are written atomically. Returns their paths. The model and clean run are not saved:
        :meth:`load` attaches them again when given the ReplacementModel.

        ``sparse``: store only the non-zero edges (``adjacency.indices [2, m]`` int64 row/column and
        ``adjacency.values [m]``), 16 bytes per edge instead of 4 per entry: smaller once fewer than a quarter
        of the entries are non-zero (a pruned graph, or embedding and error rows, which are always empty).
        :meth:`load` reads either layout back into the same dense adjacency."""
        from .._version import __version__

        tensors_path, json_path = _graph_paths(path)
        tensors = {"node_keys": self.node_keys, "activations": self.activations}
        if sparse:
            rows, cols = self.adjacency.nonzero(as_tuple=True)
            tensors["adjacency.indices"] = torch.stack([rows, cols])
            tensors["adjacency.values"] = self.adjacency[rows, cols]
        else:
            tensors["adjacency"] = self.adjacency
        if self.tokens is not None:
            tensors["tokens"] = self.tokens
        for index, target in enumerate(self.targets):
            tensors[f"targets.{index}.vector"] = target.vector
        fields = {f.name for f in dataclasses.fields(Target)} - {"vector"}
        meta = {
            "format": GRAPH_FORMAT, "format_version": GRAPH_FORMAT_VERSION, "featcircuits_version": __version__,
            "n_nodes": self.n_nodes, "node_ids": self.node_ids, "sites": list(self.sites),
            "targets": [{name: getattr(t, name) for name in sorted(fields)} for t in self.targets],
            "has_tokens": self.tokens is not None, "prompt": self.prompt,
            "n_active_features": self.n_active_features, "n_prompts": self.n_prompts,
            "provenance": self.provenance, "node_effects": self.node_effects,
            "adjacency_layout": "coo" if sparse else "dense",
        }
        try:
            json.dumps(meta)
        except TypeError as err:  # before anything is written
            raise TypeError(f"The graph's provenance must be JSON-serialisable to be saved: {err}.") from None
        with ExitStack() as stack:  # both files are renamed into place on success; on failure neither changes
            json_tmp = stack.enter_context(atomic_path(json_path))  # renamed last: the tensors are in place first
            tensors_tmp = stack.enter_context(atomic_path(tensors_path))
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tensors_tmp),
                      metadata={"format": f"{GRAPH_FORMAT} {GRAPH_FORMAT_VERSION}"})  # one key: stable bytes
            meta["tensors_sha256"] = _sha256(tensors_tmp)
            json_tmp.write_text(json.dumps(meta, indent=1))
        return tensors_path, json_path

    @classmethod
    def load(cls, path: str | Path, model: Any = None, device: str | torch.device | None = None) -> AttributionGraph:
        """Read a graph written by :meth:`save` (``path``: either file, or ``NAME``).

        ``model``: a HookedTransformer or ReplacementModel to check the graph against (refused, naming both,
        when its name or shape differs from the one the graph was built on; a ReplacementModel's sites and
        dictionaries must match too). A ReplacementModel is attached and the clean run of a single-prompt
        graph recomputed, so :func:`verify` works again. ``device``: the model's, or CPU without one.
        """
        tensors_path, json_path = _graph_paths(path)
        if not json_path.is_file():
            raise FileNotFoundError(
                f"No graph metadata at {json_path}: a saved graph is two files, {tensors_path.name} and "
                f"{json_path.name}, side by side. Copy both, or save the graph again with AttributionGraph.save."
            )
        if not tensors_path.is_file():
            raise FileNotFoundError(
                f"No graph tensors at {tensors_path} (the metadata {json_path.name} is there): a saved graph is "
                "two files side by side. Copy both, or save the graph again with AttributionGraph.save."
            )
        meta = read_json(json_path)
        _check_format(meta, json_path)
        if _sha256(tensors_path) != meta.get("tensors_sha256"):
            raise ValueError(
                f"{tensors_path} does not match the checksum recorded in {json_path.name}: it is truncated or "
                "corrupt, or the two files come from different saves. Save the graph again."
            )
        # (the model is untyped, so the declared type says the value is no longer None)
        where: str | torch.device = device if device is not None else (
            model.cfg.device if model is not None else "cpu")
        n_nodes, n_targets = int(meta["n_nodes"]), len(meta["targets"])
        expected: dict[str, tuple[int, ...] | None] = {
            "node_keys": (n_nodes, 4), "activations": (n_nodes,),
            **{f"targets.{i}.vector": None for i in range(n_targets)}}
        sparse = meta.get("adjacency_layout", "dense") == "coo"  # files from before the option are dense
        if sparse:
            expected.update({"adjacency.indices": None, "adjacency.values": None})
        else:
            expected["adjacency"] = (n_nodes, n_nodes)
        if meta["has_tokens"]:
            expected["tokens"] = None
        tensors = read_tensors(tensors_path, expected, device=where)
        if sparse:
            tensors["adjacency"] = _dense_adjacency(tensors.pop("adjacency.indices"), tensors.pop("adjacency.values"),
                                                    n_nodes, tensors_path)
        targets = [Target(vector=tensors[f"targets.{i}.vector"], **fields) for i, fields in enumerate(meta["targets"])]
        graph = cls(node_keys=tensors["node_keys"], adjacency=tensors["adjacency"], activations=tensors["activations"],
                    sites=list(meta["sites"]), targets=targets, tokens=tensors.get("tokens"), prompt=meta["prompt"],
                    n_active_features=int(meta["n_active_features"]), n_prompts=int(meta["n_prompts"]),
                    provenance=meta["provenance"], node_effects=dict(meta.get("node_effects") or {}))
        if graph.node_ids != meta["node_ids"]:
            raise ValueError(f"The node keys in {tensors_path} do not give the node ids listed in {json_path.name}; "
                             "the files are corrupt or from different saves. Save the graph again.")
        if model is not None:
            graph._attach(model, json_path)
        return graph

    def _attach(self, model: Any, where: Path) -> None:
        """Check ``model`` against the provenance; attach a ReplacementModel and recompute the clean run."""
        replacement = model if hasattr(model, "sites") and hasattr(model, "model") else None
        base = replacement.model if replacement is not None else model
        saved = self.provenance.get("model")
        if not saved:
            raise ValueError(f"{where} records no model (the graph was built without one), so it cannot be checked "
                             "against a model; load it without model=.")
        have = _model_identity(base)
        differ = [key for key in _MODEL_KEYS if saved.get(key) != have[key]]
        if differ:
            show = ", ".join(f"{key}={{}}" for key in _MODEL_KEYS)
            raise ValueError(
                f"{where} was built on model {show.format(*(saved.get(k) for k in _MODEL_KEYS))}, but the model "
                f"given has {show.format(*(have[k] for k in _MODEL_KEYS))} (differing: {differ}). Load the graph "
                "with the model it was built on, or without model= to read it unattached."
            )
        if replacement is None:
            return
        wanted, given = self.provenance.get("dictionaries", []), _dictionary_identities(replacement)
        if wanted != given:
            mismatched = [f"{w.get('site')}: saved {w} vs given {g}" for w, g in zip(wanted, given, strict=False)
                          if w != g] or [f"saved {len(wanted)} sites, given {len(given)}"]
            raise ValueError(f"{where} was built with other dictionaries than the ReplacementModel given "
                             f"({'; '.join(mismatched[:3])}). Give the ReplacementModel with the dictionaries "
                             "the graph was built with.")
        self.replacement = replacement
        if self.tokens is None or self.n_prompts != 1:
            return  # dataset-level graphs have no single clean run
        clean = replacement.clean_run(self.tokens)
        features = self.node_keys[self.mask(FEATURE)]
        acts = torch.stack([clean.feature_acts[self.sites[s]][p, f] for s, p, f in features[:, 1:].tolist()]) \
            if features.numel() else self.activations[:0]
        saved_acts = self.activations[self.mask(FEATURE)].to(acts)
        scale = float(saved_acts.abs().max()) if saved_acts.numel() else 1.0
        if acts.numel() and float((acts - saved_acts).abs().max()) > 1e-3 * max(scale, 1.0):
            raise ValueError(f"The dictionaries given do not reproduce the feature activations saved in {where} "
                             "(same shapes, other weights?). Give the ReplacementModel the graph was built with.")
        self.clean = clean

    def __repr__(self) -> str:
        return (f"AttributionGraph({self.n_nodes} nodes: {self.n_features} features, {self.count(ERROR)} errors, "
                f"{self.count(EMBEDDING)} embeddings, {self.count(TARGET)} targets; {self.n_edges} edges)")


def _dense_adjacency(indices: torch.Tensor, values: torch.Tensor, n_nodes: int, where: Path) -> torch.Tensor:
    """The ``[n_nodes, n_nodes]`` adjacency from a sparse save, its indices checked first."""
    if indices.dim() != 2 or indices.shape[0] != 2 or values.shape != (indices.shape[1],) or (
            indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_nodes)):
        raise ValueError(f"The sparse adjacency in {where} does not fit its {n_nodes} nodes (indices "
                         f"{tuple(indices.shape)}, values {tuple(values.shape)}): the file is corrupt. Save the graph again.")
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=values.dtype, device=values.device)
    adjacency[indices[0], indices[1]] = values
    return adjacency


def _graph_paths(path: str | Path) -> tuple[Path, Path]:
    """``(NAME.safetensors, NAME.json)`` from ``NAME``, ``NAME.safetensors`` or ``NAME.json``."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_format(meta: dict[str, Any], where: Path) -> None:
    from .._version import __version__

    if meta.get("format") != GRAPH_FORMAT:
        raise ValueError(f"{where} is not a saved featcircuits attribution graph (format {meta.get('format')!r}, "
                         f"expected {GRAPH_FORMAT!r}).")
    version = meta.get("format_version")
    if version != GRAPH_FORMAT_VERSION:
        writer = meta.get("featcircuits_version", "unknown")
        fix = (f"upgrade featcircuits to {writer} or later to read it" if isinstance(version, int)
               and version > GRAPH_FORMAT_VERSION else
               f"rebuild the graph with build_graph (or load it with featcircuits {writer}, which wrote it) and save "
               "it again")
        raise ValueError(
            f"{where} holds graph format version {version} (written by featcircuits {writer}), but featcircuits "
            f"{__version__} reads format version {GRAPH_FORMAT_VERSION}; {fix}."
        )
