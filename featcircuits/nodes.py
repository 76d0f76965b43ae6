"""The one node id scheme: graphs, circuits, ablations, the viewer and the exports all speak it.

A *site* is a place in the forward pass where the replacement model splices something in, named
after the hook it writes (``ReplacementModel.sites``):

    blocks.L.hook_mlp_out     -> "mlp{L}"         (a transcoder, or the bare MLP: error node only)
    blocks.L.hook_attn_out    -> "attn{L}"        (an SAE on the attention output)
    blocks.L.hook_resid_pre   -> "resid_pre{L}"   (an SAE on the residual stream; likewise mid/post)

Node ids are short strings, readable and parseable (:func:`parse_node_id`, the inverse of
:attr:`Node.id`). Feature-level nodes sit at a token position (``@pos``) or, without one, stand for the
same unit summed over every position:

    feature    "{site}:{feature}@{pos}"    e.g. "mlp3:1207@5"     summed: "mlp3:1207"
    error      "{site}:error@{pos}"        e.g. "attn1:error@5"   summed: "attn1:error"
    embedding  "embed@{pos}"               token (+ learned position) embedding, resid_pre of block 0;
                                           "embed": every position (a component graph's sender)
    target     "logit:{token_id}@{pos}"    a (demeaned) logit, or "target:{name}@{pos}" for a direction
                                           such as answer minus distractor
    logits     "logits"                    the model's output as a whole (edges into the metric)
    head       "L{layer}.H{head}"          an attention head (component graphs)
    mlp        "L{layer}.MLP"              an MLP as a whole (component graphs)

``pos`` is the token position; in dataset-level graphs, whose prompts are aligned at their last token,
it is negative (``-1`` is the last token of every prompt). The circuit-tracer / Neuronpedia export
translates these ids to its own "layer_feature_position" form (``featcircuits.graph.export``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NODE_KINDS", "Node", "parse_node_id", "site_name", "site_layer", "hook_order_key"]

NODE_KINDS = ("feature", "error", "embedding", "target", "logits", "head", "mlp")

_SITE_HOOKS = {
    "hook_mlp_out": "mlp",
    "hook_attn_out": "attn",
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
}
_SITE_RE = re.compile(r"^(mlp|attn|resid_pre|resid_mid|resid_post)(\d+)$")
_POS = r"(?:@(?P<pos>-?\d+))"
_NODE_RE = re.compile(
    r"^(?:(?P<site>[a-z_]+\d+):(?P<what>error|\d+)" + _POS + "?"
    r"|(?P<embed>embed)" + _POS.replace("pos", "epos") + "?"
    r"|(?P<tkind>logit|target):(?P<tname>[^@]+)" + _POS.replace("pos", "tpos") +
    r"|(?P<logits>logits)"
    r"|L(?P<layer>\d+)\.(?:H(?P<head>\d+)|(?P<mlp>MLP)))$"
)


def site_name(hook_out: str) -> str:
    """Site name of a writable hook: ``blocks.3.hook_mlp_out -> "mlp3"``.

    Raises ``ValueError`` for hooks the replacement model cannot splice at.
    """
    parts = hook_out.split(".")
    if len(parts) == 3 and parts[0] == "blocks" and parts[1].isdigit() and parts[2] in _SITE_HOOKS:
        return f"{_SITE_HOOKS[parts[2]]}{parts[1]}"
    raise ValueError(
        f"Cannot splice a dictionary that writes {hook_out!r}: a dictionary's hook_out must be one of "
        "blocks.L.hook_mlp_out (transcoders), blocks.L.hook_attn_out or blocks.L.hook_resid_pre/mid/post (SAEs)."
    )


def site_layer(site: str) -> int:
    """Block index of a site name (``"attn2" -> 2``)."""
    match = _SITE_RE.match(site)
    if not match:
        raise ValueError(f"{site!r} is not a site name (mlpL, attnL, resid_preL, resid_midL, resid_postL).")
    return int(match.group(2))


# Rank of each hook inside a block, in the order the forward pass reaches it.
_BLOCK_RANK = {
    "hook_resid_pre": 0, "ln1": 1, "hook_attn_in": 1, "hook_q_input": 1, "hook_k_input": 1, "hook_v_input": 1,
    "attn": 2, "ln1_post": 3, "hook_attn_out": 4, "hook_resid_mid": 5, "hook_mlp_in": 6, "ln2": 6,
    "mlp": 7, "ln2_post": 8, "hook_mlp_out": 9, "hook_resid_post": 10,
}


def hook_order_key(hook_name: str, n_layers: int) -> tuple[int, int]:
    """Sort key placing hook points in forward order: ``(block, rank within the block)``."""
    parts = hook_name.split(".")
    if parts[0] == "blocks" and len(parts) >= 3 and parts[1].isdigit():
        return int(parts[1]), _BLOCK_RANK.get(parts[2], 5)
    if parts[0] in ("hook_embed", "hook_pos_embed", "hook_tokens"):
        return -1, 0
    return n_layers, 0  # ln_final, unembed


@dataclass(frozen=True)
class Node:
    """One node of any graph or circuit. Fields a kind does not use are ``None``.

    Args:
        kind: one of :data:`NODE_KINDS`.
        pos: token position; ``None`` for a unit summed over positions (features, errors, the embedding)
            and for kinds without one (logits, heads, MLPs).
        site: the site name of features and errors (``"mlp3"``).
        feature: the feature index of a feature node.
        name: a target's name: the token id of a logit target (``is_logit``), a free label otherwise.
        layer, head: the block (and head) of a component node.
    """

    kind: str
    pos: int | None = None
    site: str | None = None
    feature: int | None = None
    name: str | None = None
    is_logit: bool = False
    layer: int | None = None
    head: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in NODE_KINDS:
            raise ValueError(f"Node kind {self.kind!r}; choose one of {NODE_KINDS}.")
        needs = {"feature": ("site", "feature"), "error": ("site",), "target": ("name", "pos"),
                 "head": ("layer", "head"), "mlp": ("layer",)}.get(self.kind, ())
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ValueError(f"A {self.kind} node needs {missing}; got {self!r}.")
        if self.site is not None:
            site_layer(self.site)

    @property
    def id(self) -> str:
        at = "" if self.pos is None else f"@{self.pos}"
        if self.kind == "feature":
            return f"{self.site}:{self.feature}{at}"
        if self.kind == "error":
            return f"{self.site}:error{at}"
        if self.kind == "embedding":
            return f"embed{at}"
        if self.kind == "target":
            return f"{'logit' if self.is_logit else 'target'}:{self.name}{at}"
        if self.kind == "logits":
            return "logits"
        if self.kind == "head":
            return f"L{self.layer}.H{self.head}"
        return f"L{self.layer}.MLP"

    @property
    def block(self) -> int | None:
        """The block the node belongs to (a site's or a component's layer; None for embeddings, targets
        and the logits)."""
        if self.site is not None:
            return site_layer(self.site)
        return self.layer

    def __str__(self) -> str:
        return self.id


def parse_node_id(node_id: str) -> Node:
    """Inverse of :attr:`Node.id`; raises ``ValueError`` naming the id when it is malformed."""
    match = _NODE_RE.match(node_id) if isinstance(node_id, str) else None
    if not match:
        raise ValueError(
            f"{node_id!r} is not a node id; expected 'site:feature@pos', 'site:error@pos' (or without @pos: summed "
            "over positions), 'embed@pos', 'logit:token@pos', 'target:name@pos', 'logits', 'L3.H2' or 'L3.MLP' "
            "(see featcircuits.nodes)."
        )
    groups = match.groupdict()

    def position(key: str) -> int | None:
        return None if groups[key] is None else int(groups[key])

    if groups["site"]:
        site = groups["site"]
        if not _SITE_RE.match(site):
            raise ValueError(f"{node_id!r} names site {site!r}, which is not a site name (mlpL, attnL, "
                             "resid_preL, resid_midL, resid_postL).")
        if groups["what"] == "error":
            return Node("error", position("pos"), site=site)
        return Node("feature", position("pos"), site=site, feature=int(groups["what"]))
    if groups["embed"]:
        return Node("embedding", position("epos"))
    if groups["tkind"]:
        return Node("target", position("tpos"), name=groups["tname"], is_logit=groups["tkind"] == "logit")
    if groups["logits"]:
        return Node("logits")
    if groups["mlp"]:
        return Node("mlp", layer=int(groups["layer"]))
    return Node("head", layer=int(groups["layer"]), head=int(groups["head"]))
