"""Feature dashboards: top activating contexts, activation density and logit effects, from one pass.

:func:`compute_dashboards` streams a token dataset through the model once, encodes every chosen
dictionary's ``hook_in`` activation and keeps, per feature and on the device:

* the top-``k`` activating contexts (a running top-k merged batch by batch, so memory is
  ``k * n_features * window`` whatever the dataset's size), with the tokens and activations around each;
* how often it fires and a histogram of ``log10`` of its non-zero activations;
* its direct logit effects: the decoder row pushed through the final norm's gain and the unembedding
  (``W_dec @ W_U``; for a transcoder writing ``hook_mlp_out`` that is its output direction), with the
  most promoted and suppressed tokens.

The result saves to a JSON file that :func:`featcircuits.viz.write_viewer` reads for its node cards, and
to a standalone HTML page per feature set (:meth:`FeatureDashboards.write_html`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featcircuits.dictionaries.cross_layer import CrossLayerTranscoder
from featcircuits.dictionaries.cross_layer_slice import cross_layer_slices
from featcircuits.dictionaries.io.common import atomic_path

from .graph_data import dashboard_key
from .page import make_readable, write_page

__all__ = ["FeatureDashboards", "compute_dashboards", "dictionaries_by_layer", "token_strings"]

FORMAT = "featcircuits-dashboards"


@dataclass
class FeatureDashboards:
    """Dashboard entries keyed ``"<layer>_<feature>"`` (the viewer's key), plus what was scanned."""

    features: dict[str, dict[str, Any]]
    n_tokens: int
    model: str = ""
    histogram_edges: list[float] = field(default_factory=list)
    dictionaries: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "model": self.model, "n_tokens": self.n_tokens,
                "histogram_edges": self.histogram_edges, "dictionaries": self.dictionaries,
                "features": self.features}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON file the viewer reads (atomically) and return its path."""
        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json_dict(), ensure_ascii=False, allow_nan=False), encoding="utf-8")
            make_readable(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureDashboards:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a featcircuits dashboard file (format {data.get('format')!r}).")
        return cls(features=data["features"], n_tokens=data["n_tokens"], model=data.get("model", ""),
                   histogram_edges=data.get("histogram_edges", []), dictionaries=data.get("dictionaries", {}))

    def write_html(self, path: str | os.PathLike, title: str | None = None, page_size: int = 200) -> Path:
        """A standalone page showing every feature's dashboard (self-contained, works offline); cards are
        drawn ``page_size`` at a time behind a "Show more" button."""
        title = title or f"Feature dashboards ({len(self.features)} features)"
        payload = {"mode": "dashboards", "title": title, "dashboards": self.features, "page_size": int(page_size),
                   "order": list(self.features),
                   "dashboard_info": {"n_tokens": self.n_tokens, "model": self.model,
                                      "histogram_edges": self.histogram_edges}}
        return write_page(payload, path, title)


def _layer_key(dictionary: Any) -> str:
    if dictionary.cfg.layer is not None:
        return str(dictionary.cfg.layer)
    match = re.match(r"blocks\.(\d+)\.", dictionary.cfg.hook_in)
    if match:
        return match.group(1)
    raise ValueError(f"Cannot tell the layer of the dictionary on {dictionary.cfg.hook_in!r}; pass dictionaries "
                     "as a dict {layer_key: dictionary}.")


def dictionaries_by_layer(dictionaries: Any) -> dict[str, Any]:
    """``{layer key: dictionary}`` (the keys dashboard entries are filed under) from a dict, list or one; a
    cross-layer transcoder counts as one dictionary per layer (its latents of that layer)."""
    if isinstance(dictionaries, Mapping):
        return {str(key): value for key, value in dictionaries.items()}
    if isinstance(dictionaries, CrossLayerTranscoder):
        dictionaries = cross_layer_slices(dictionaries)
    if isinstance(dictionaries, Sequence):
        dictionaries = [part for d in dictionaries
                        for part in (cross_layer_slices(d) if isinstance(d, CrossLayerTranscoder) else [d])]
        mapping = {}
        for dictionary in dictionaries:
            key = _layer_key(dictionary)
            if key in mapping:
                raise ValueError(f"Two dictionaries share layer {key}; pass a dict {{key: dictionary}} with distinct "
                                 "keys matching the graph's layer names.")
            mapping[key] = dictionary
        return mapping
    return {_layer_key(dictionaries): dictionaries}


def _token_batches(tokens: Any, batch_size: int) -> Iterable[torch.Tensor]:
    if isinstance(tokens, torch.Tensor):
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [n_sequences, seq_len] token ids, got shape {tuple(tokens.shape)}.")
        yield from tokens.split(batch_size)
    else:
        for batch in tokens:
            batch = torch.as_tensor(batch)
            yield batch if batch.ndim == 2 else batch.unsqueeze(0)


def token_strings(model: Any) -> list[str]:
    """Every token id's string ``[d_vocab]`` as dashboards show it (the tokenizer's pieces)."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        return [str(index) for index in range(model.cfg.d_vocab)]
    pieces = tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
    return [piece if piece is not None else f"<{index}>" for index, piece in enumerate(pieces)]


class _RunningFeatureStats:
    """Per-feature running statistics for one dictionary, all on the model's device."""

    def __init__(self, feature_ids: torch.Tensor, k: int, window: tuple[int, int], edges: torch.Tensor) -> None:
        n_features, width = len(feature_ids), window[0] + window[1] + 1
        device = feature_ids.device
        self.feature_ids, self.k, self.window, self.edges = feature_ids, k, window, edges
        self.top_values = torch.zeros(k, n_features, device=device)  # 0 = empty slot: only firing counts
        self.top_tokens = torch.full((k, n_features, width), -1, dtype=torch.int32, device=device)
        self.top_acts = torch.zeros(k, n_features, width, device=device)
        self.n_fired = torch.zeros(n_features, dtype=torch.long, device=device)
        self.histogram = torch.zeros(n_features, len(edges) - 1, dtype=torch.long, device=device)
        self.offsets = torch.arange(-window[0], window[1] + 1, device=device)

    def update(self, acts: torch.Tensor, tokens: torch.Tensor, counted: torch.Tensor) -> None:
        """acts ``[batch, pos, n_features]``, tokens ``[batch, pos]``, counted ``[batch, pos]`` bool."""
        batch, n_pos, n_features = acts.shape
        acts = acts * counted.unsqueeze(-1)
        flat = acts.reshape(batch * n_pos, n_features)
        # Density and histogram from the firing entries only: few of them for a sparse dictionary.
        rows, features = (flat > 0).nonzero(as_tuple=True)
        n_bins = self.histogram.shape[1]
        self.n_fired += torch.bincount(features, minlength=n_features)
        bins = torch.bucketize(torch.log10(flat[rows, features]), self.edges[1:-1], right=True)  # ends catch the rest
        self.histogram += torch.bincount(features * n_bins + bins, minlength=n_features * n_bins).view(n_features, n_bins)

        # topk along a contiguous last dimension is about twice as fast as along dim 0.
        batch_values, flat_index = flat.T.contiguous().topk(min(self.k, batch * n_pos), dim=1)  # [n_features, k']
        batch_values, flat_index = batch_values.T, flat_index.T  # [k', n_features]
        seq, pos = flat_index // n_pos, flat_index % n_pos
        window_pos = pos.unsqueeze(-1) + self.offsets  # [k', n_features, width]
        inside = (window_pos >= 0) & (window_pos < n_pos)
        window_pos = window_pos.clamp(0, n_pos - 1)
        seq = seq.unsqueeze(-1).expand_as(window_pos)
        window_tokens = torch.where(inside, tokens[seq, window_pos].to(torch.int32), -1)
        feature = torch.arange(n_features, device=acts.device).view(1, -1, 1).expand_as(window_pos)
        window_acts = torch.where(inside, acts[seq, window_pos, feature], 0.0)

        values = torch.cat([self.top_values, batch_values])
        self.top_values, keep = values.topk(self.k, dim=0)
        gather = keep.unsqueeze(-1).expand(-1, -1, window_pos.shape[-1])
        self.top_tokens = torch.cat([self.top_tokens, window_tokens]).gather(0, gather)
        self.top_acts = torch.cat([self.top_acts, window_acts]).gather(0, gather)


def _logit_effects(model: Any, dictionary: Any, feature_ids: torch.Tensor, n_logits: int,
                   chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top and bottom ``n_logits`` direct logit effects ``([n, n_logits] values, ids)`` x2, or None.

    The decoder row is the direction the feature writes; the final norm's gain (and LayerNorm's centring)
    applies to it before ``W_U``, so both are included. Chunked over features to bound memory.
    """
    d_model = model.cfg.d_model
    if dictionary.cfg.d_out != d_model:
        return None
    W_U = model.W_U.detach()
    ln_final = getattr(model, "ln_final", None)
    gain = getattr(ln_final, "w", None)
    centre = model.cfg.normalization_type in ("LN", "LNPre")
    chunk = max(1, chunk_elements // W_U.shape[1])
    n_logits = min(n_logits, W_U.shape[1])
    results: list[list[torch.Tensor]] = [[], [], [], []]
    for rows in feature_ids.split(chunk):
        directions = dictionary.W_dec.detach()[rows].to(W_U.device, W_U.dtype)  # [chunk, d_model]
        if centre:
            directions = directions - directions.mean(-1, keepdim=True)
        if gain is not None:
            directions = directions * gain.detach()
        effects = directions @ W_U  # [chunk, d_vocab]
        top, bottom = effects.topk(n_logits, dim=-1), effects.topk(n_logits, dim=-1, largest=False)
        for store, value in zip(results, (top.values, top.indices, bottom.values, bottom.indices), strict=True):
            store.append(value)
    return tuple(torch.cat(store) for store in results)  # type: ignore[return-value]


@torch.no_grad()
def compute_dashboards(
    model: Any,
    dictionaries: Any,
    tokens: Any,
    *,
    features: Mapping[str, Sequence[int]] | Sequence[int] | None = None,
    k: int = 10,
    window: tuple[int, int] = (8, 3),
    batch_size: int = 16,
    n_logits: int = 8,
    histogram_range: tuple[float, float] = (-3.0, 2.0),
    histogram_bins: int = 25,
    skip_bos: bool = True,
) -> FeatureDashboards:
    """Stream ``tokens`` once through ``model`` and build dashboards for the chosen features.

    ``dictionaries``: one ``Dictionary``, a list (keyed by their layer) or a dict ``{layer_key: dictionary}``
    whose keys match the graph's layer names. ``tokens``: ``[n_sequences, seq_len]`` token ids or an
    iterable of such batches. ``features``: per key, the feature indices to keep (a plain list when there
    is one dictionary); all features when None. ``window``: tokens kept before and after each top
    activation. Positions holding the BOS token are skipped when ``skip_bos`` (they dwarf everything).
    """
    dictionary_map = dictionaries_by_layer(dictionaries)
    if not dictionary_map:
        raise ValueError("No dictionaries given; pass one Dictionary, a list or a {layer_key: Dictionary} dict.")
    if features is not None and not isinstance(features, Mapping):
        if len(dictionary_map) != 1:
            raise ValueError("With several dictionaries, pass features as {layer_key: [feature indices]}.")
        features = {next(iter(dictionary_map)): features}
    device = model.W_U.device
    edges = torch.linspace(histogram_range[0], histogram_range[1], histogram_bins + 1, device=device)
    stats: dict[str, _RunningFeatureStats] = {}
    for key, dictionary in dictionary_map.items():
        chosen = list(range(dictionary.cfg.d_sae)) if features is None else list(features.get(key, []))
        bad = [index for index in chosen if not 0 <= int(index) < dictionary.cfg.d_sae]
        if bad:
            raise ValueError(f"Feature indices {bad[:5]} are out of range for the layer {key} dictionary "
                             f"(d_sae={dictionary.cfg.d_sae}).")
        if features is not None and key not in features:
            continue
        ids = torch.tensor(sorted(set(int(index) for index in chosen)), dtype=torch.long, device=device)
        stats[key] = _RunningFeatureStats(ids, k, window, edges)
    unknown = set(features or {}) - set(dictionary_map)
    if unknown:
        raise ValueError(f"features names layers {sorted(unknown)} with no dictionary; known: {sorted(dictionary_map)}.")

    hooks = {dictionary_map[key].cfg.hook_in for key in stats}
    layers = [re.match(r"blocks\.(\d+)\.", hook) for hook in hooks]
    stop_at = max(int(m.group(1)) for m in layers) + 1 if layers and all(layers) else None
    stop_at = stop_at if stop_at is not None and stop_at < model.cfg.n_layers else None
    bos = getattr(getattr(model, "tokenizer", None), "bos_token_id", None)

    n_tokens = 0
    for batch in _token_batches(tokens, batch_size):
        batch = batch.to(device)
        _, cache = model.run_with_cache(batch, names_filter=lambda name: name in hooks, stop_at_layer=stop_at)
        counted = batch != bos if (skip_bos and bos is not None) else torch.ones_like(batch, dtype=torch.bool)
        n_tokens += int(counted.sum())
        for key, running in stats.items():
            dictionary = dictionary_map[key]
            activation = cache[dictionary.cfg.hook_in].to(dictionary.dtype)
            feature_acts = dictionary.encode(activation)
            if len(running.feature_ids) != dictionary.cfg.d_sae:  # a chosen subset
                feature_acts = feature_acts[..., running.feature_ids.to(activation.device)]
            running.update(feature_acts.float().to(device), batch, counted)
    if n_tokens == 0:
        raise ValueError("The token dataset was empty (or held only BOS tokens); nothing to build dashboards from.")

    vocabulary = token_strings(model)
    entries: dict[str, dict[str, Any]] = {}
    info: dict[str, dict[str, Any]] = {}
    for key, running in stats.items():
        dictionary = dictionary_map[key]
        info[key] = {"hook_in": dictionary.cfg.hook_in, "hook_out": dictionary.cfg.hook_out,
                     "kind": dictionary.cfg.kind, "d_sae": dictionary.cfg.d_sae}
        logits = _logit_effects(model, dictionary, running.feature_ids, n_logits)
        entries.update(_entries_for(key, running, logits, vocabulary, n_tokens))
    return FeatureDashboards(features=entries, n_tokens=n_tokens, model=str(getattr(model.cfg, "model_name", "")),
                             histogram_edges=[round(float(edge), 6) for edge in edges], dictionaries=info)


def _entries_for(key: str, running: _RunningFeatureStats, logits: Any, vocabulary: list[str],
                 n_tokens: int) -> dict[str, dict[str, Any]]:
    """JSON entries for one dictionary: trimming and rounding on the tensors, one transfer, then lists."""
    inside = running.top_tokens >= 0  # [k, n_features, width]
    width = inside.shape[-1]
    first = inside.int().argmax(-1)  # window start, where it ran off the sequence's beginning
    stop = width - inside.flip(-1).int().argmax(-1)
    values, fired = running.top_values.cpu().tolist(), running.n_fired.cpu().tolist()
    # Token strings looked up in one numpy indexing (-1, outside the sequence, maps to the appended "").
    token_lists = np.array([*vocabulary, ""], dtype=object)[running.top_tokens.cpu().numpy()].tolist()
    act_lists = torch.round(running.top_acts, decimals=5).cpu().tolist()
    first_lists, stop_lists, histogram = first.cpu().tolist(), stop.cpu().tolist(), running.histogram.cpu().tolist()
    logit_lists = None
    if logits is not None:
        top_values, top_ids, bottom_values, bottom_ids = logits
        logit_lists = [torch.round(top_values, decimals=5).cpu().tolist(), top_ids.cpu().tolist(),
                       torch.round(bottom_values, decimals=5).cpu().tolist(), bottom_ids.cpu().tolist()]
    focus = running.window[0]
    entries = {}
    for column, feature in enumerate(running.feature_ids.cpu().tolist()):
        contexts = []
        for slot in range(running.k):
            if values[slot][column] <= 0:
                break  # slots are sorted; the rest are empty
            start, end = first_lists[slot][column], stop_lists[slot][column]
            contexts.append({"act": values[slot][column], "focus": focus - start,
                             "tokens": token_lists[slot][column][start:end],
                             "acts": act_lists[slot][column][start:end]})
        entry: dict[str, Any] = {
            "layer": key, "feature": feature, "n_fired": fired[column], "n_tokens": n_tokens,
            "density": fired[column] / n_tokens, "max_act": values[0][column],
            "histogram": histogram[column], "top_contexts": contexts,
        }
        if logit_lists is not None:
            top_v, top_i, bottom_v, bottom_i = (lst[column] for lst in logit_lists)
            entry["top_logits"] = [[vocabulary[t], v] for t, v in zip(top_i, top_v, strict=True)]
            entry["bottom_logits"] = [[vocabulary[t], v] for t, v in zip(bottom_i, bottom_v, strict=True)]
        else:
            entry["logit_note"] = "This dictionary does not write the residual stream's width; no logit effects."
        entries[dashboard_key(key, feature)] = entry
    return entries
