"""Offline feature labels from dashboards, and a detection score that says how well a label explains a feature.

A label is read off a feature's dashboard entry (:func:`featcircuits.viz.dashboards.compute_dashboards`): the
tokens it fires on (at the focus of its top activating contexts, weighted by activation) and the tokens its
decoder promotes through the unembedding, e.g. ``on " column"/" tag" -> "color"``. No network is needed, so
every node of a graph gets one.

The detection score checks a label against held-out text, as EleutherAI's delphi scores explanations: a
scorer given only the label (here: "the feature fires on these tokens") predicts, token by token, whether
the feature is active; the score is the balanced accuracy (mean of the true-positive and true-negative
rates, so a feature that rarely fires cannot score well by always saying no). 1 is a perfect label, 0.5 a
label that says nothing.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["label_entry", "trigger_tokens", "label_dashboards", "detection_score", "score_labels", "special_ids",
           "held_out_activations", "trigger_ids"]


# tokenizer pieces -> the text they stand for: SentencePiece's word start, GPT-2's byte-level space/newline/tab
_PIECE_TEXT = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": "\n", "ĉ": "\t"})


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece's byte fallback


def readable_piece(piece: str) -> str:
    """A tokenizer piece as the text it stands for (``"▁the"`` and ``"Ġthe"`` -> ``" the"``, ``"<0x0A>"`` -> a
    newline)."""
    byte = _BYTE_PIECE.match(piece)
    if byte and int(byte.group(1), 16) < 128:
        return chr(int(byte.group(1), 16))
    return piece.translate(_PIECE_TEXT)


def trigger_tokens(entry: Mapping[str, Any], max_tokens: int = 3, min_share: float = 0.1) -> list[str]:
    """The tokens a feature fires on: at the focus of its top contexts, ranked by summed activation; those
    holding at least ``min_share`` of it, at most ``max_tokens``."""
    weight: dict[str, float] = defaultdict(float)
    for context in entry.get("top_contexts") or []:
        tokens, focus = context.get("tokens") or [], int(context.get("focus", -1))
        if 0 <= focus < len(tokens):
            weight[str(tokens[focus])] += max(float(context.get("act", 0.0)), 0.0)
    total = sum(weight.values())
    if total <= 0:
        return []
    ranked = sorted(weight.items(), key=lambda item: -item[1])
    return [token for token, value in ranked[:max_tokens] if value >= min_share * total]


def label_entry(entry: Mapping[str, Any], max_tokens: int = 3, n_promoted: int = 2) -> str:
    """A short label: ``on "tok"/"tok" -> "promoted"``, tokens as the text they stand for, JSON-quoted (so a
    newline reads ``"\\n"``); either half may be missing; ``"(inactive)"`` when the feature never fired on the
    dashboard's text."""
    fires = trigger_tokens(entry, max_tokens)
    promoted = [str(pair[0]) for pair in (entry.get("top_logits") or [])[:n_promoted]]

    def quoted(tokens: Sequence[str]) -> str:
        return "/".join(json.dumps(readable_piece(token), ensure_ascii=False) for token in tokens)

    parts = []
    if fires:
        parts.append(f"on {quoted(fires)}")
    if promoted:
        parts.append(f"-> {quoted(promoted)}")
    if not parts:
        return "(inactive)"
    return " ".join(parts)


def label_dashboards(dashboards: Any, max_tokens: int = 3) -> dict[str, str]:
    """Label every entry of a :class:`~featcircuits.viz.dashboards.FeatureDashboards` in place (``entry["label"]``,
    saved with it) and return ``{dashboard key: label}``."""
    labels = {}
    for key, entry in dashboards.features.items():
        entry["label"] = label_entry(entry, max_tokens)
        labels[key] = entry["label"]
    return labels


def detection_score(triggers: Sequence[int], tokens: torch.Tensor, acts: torch.Tensor,
                    special: Sequence[int] = ()) -> float:
    """Balanced accuracy of predicting ``acts > 0`` from "the token is one of ``triggers``".

    Args:
        triggers: the label's token ids.
        tokens: held-out token ids ``[n]`` (any shape; flattened).
        acts: the feature's activations at those tokens, same shape.
        special: token ids to leave out (BOS and the like: no dictionary was trained on them).

    Returns NaN when the held-out text has no active or no inactive position to score against (stored as
    ``None`` in a dashboard entry by :func:`score_labels`).
    """
    tokens, acts = tokens.reshape(-1), acts.reshape(-1)
    if tokens.shape != acts.shape:
        raise ValueError(f"tokens {tuple(tokens.shape)} and acts {tuple(acts.shape)} must have one shape.")
    keep = ~torch.isin(tokens, torch.tensor(list(special), dtype=tokens.dtype, device=tokens.device))
    tokens, active = tokens[keep], acts[keep] > 0
    predicted = torch.isin(tokens, torch.tensor(list(triggers), dtype=tokens.dtype, device=tokens.device))
    n_active, n_inactive = int(active.sum()), int((~active).sum())
    if n_active == 0 or n_inactive == 0:
        return float("nan")
    true_positive = float((predicted & active).sum()) / n_active
    true_negative = float((~predicted & ~active).sum()) / n_inactive
    return 0.5 * (true_positive + true_negative)


def trigger_ids(model: Any, dashboards: Any) -> dict[str, list[int]]:
    """``{dashboard key: the token ids its label says it fires on}`` (every id of each named piece)."""
    from ..viz.dashboards import token_strings

    ids_of: dict[str, list[int]] = defaultdict(list)
    for index, piece in enumerate(token_strings(model)):
        ids_of[piece].append(index)
    return {key: [i for token in trigger_tokens(entry) for i in ids_of.get(token, [])]
            for key, entry in dashboards.features.items()}


def special_ids(model: Any) -> list[int]:
    """The tokenizer's special token ids (BOS and the like), left out of every score."""
    return list(getattr(getattr(model, "tokenizer", None), "all_special_ids", []) or [])


@torch.no_grad()
def held_out_activations(model: Any, dictionaries: Any, tokens: torch.Tensor, dashboards: Any,
                         batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Every dashboard feature's activations on ``tokens [n_seq, seq_len]``: ``{key: acts [n_seq, seq_len]}`` on the
    CPU (entries of layers with no dictionary are left out). One forward pass per batch, all features of a
    layer encoded at once."""
    from ..viz.dashboards import dictionaries_by_layer

    by_layer = dictionaries_by_layer(dictionaries)
    wanted: dict[str, list[tuple[str, int]]] = defaultdict(list)  # layer -> (key, feature)
    for key, entry in dashboards.features.items():
        if str(entry.get("layer")) in by_layer:
            wanted[str(entry.get("layer"))].append((key, int(entry["feature"])))
    acts: dict[str, list[torch.Tensor]] = defaultdict(list)
    hooks = {layer: by_layer[layer].cfg.hook_in for layer in wanted}
    for batch in tokens.split(batch_size):
        _, cache = model.run_with_cache(batch, names_filter=list(set(hooks.values())))
        for layer, hook in hooks.items():
            features = torch.tensor([feature for _, feature in wanted[layer]], device=batch.device)
            acts[layer].append(by_layer[layer].encode(cache[hook])[..., features].cpu())
    result = {}
    for layer, entries in wanted.items():
        layer_acts = torch.cat(acts[layer])  # [n_seq, seq_len, n_features]
        result.update({key: layer_acts[..., column] for column, (key, _) in enumerate(entries)})
    return result


def score_labels(model: Any, dictionaries: Any, tokens: torch.Tensor, dashboards: Any,
                 special: Sequence[int] | None = None, batch_size: int = 16,
                 activations: dict[str, torch.Tensor] | None = None, chunk: int = 64) -> dict[str, dict[str, float]]:
    """Detection and fuzzing scores (:mod:`.fuzzing`) of every labelled dashboard entry on held-out ``tokens
    [n_seq, seq_len]`` (text the dashboards were not computed on): ``{key: {"detection", "fuzzing"}}``, also
    stored as ``entry["detection"]`` and ``entry["fuzzing"]`` (None where the held-out text cannot score it).

    The scorer predicts "active" where the token is one the label says the feature fires on.
    ``activations``: :func:`held_out_activations` of these tokens, when already computed.
    """
    from .fuzzing import batched_scores

    special = special_ids(model) if special is None else list(special)
    acts = activations if activations is not None else held_out_activations(model, dictionaries, tokens, dashboards,
                                                                            batch_size)
    triggers = trigger_ids(model, dashboards)
    flat = tokens.cpu()
    vocab_size = max(int(model.cfg.d_vocab), int(flat.max()) + 1)
    keys = list(acts)
    scores = {}
    for start in range(0, len(keys), chunk):  # features in chunks: [chunk, n_seq, seq_len] at a time
        block = keys[start:start + chunk]
        detection, fuzzing = batched_scores([triggers[key] for key in block], flat,
                                            torch.stack([acts[key] for key in block]), vocab_size, special)
        for key, pair in zip(block, zip(detection.tolist(), fuzzing.tolist(), strict=True), strict=True):
            scores[key] = {"detection": pair[0], "fuzzing": pair[1]}
            for name, score in scores[key].items():
                # None where the held-out text cannot score it (the feature never, or always, fires there)
                dashboards.features[key][name] = None if math.isnan(score) else score
    return scores
