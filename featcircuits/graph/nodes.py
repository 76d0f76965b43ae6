"""The one node id scheme used by graphs, circuits, ablations and the viewer.

A *site* is a place in the forward pass where the replacement model splices something in, named
after the hook it writes (``ReplacementModel.sites``):

    blocks.L.hook_mlp_out     -> "mlp{L}"         (a transcoder, or the bare MLP: error node only)
    blocks.L.hook_attn_out    -> "attn{L}"        (an SAE on the attention output)
    blocks.L.hook_resid_pre   -> "resid_pre{L}"   (an SAE on the residual stream; likewise mid/post)

Node ids are short strings, readable and parseable (:func:`parse_node_id`):

    feature    "{site}:{feature}@{pos}"    e.g. "mlp3:1207@5"
    error      "{site}:error@{pos}"        e.g. "attn1:error@5"   (reconstruction error of the site)
    embedding  "embed@{pos}"               token (+ learned position) embedding, resid_pre of block 0
    target     "logit:{token_id}@{pos}"    a (demeaned) logit, or "target:{name}@{pos}" for a direction
                                           such as answer minus distractor

``pos`` is the token position; in dataset-level graphs, whose prompts are aligned at their last token,
it is negative (``-1`` is the last token of every prompt). The circuit-tracer / Neuronpedia export
translates these ids to its own "layer_feature_position" form (``featcircuits.graph.export``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["NODE_KINDS", "Node", "parse_node_id", "site_name", "site_layer", "hook_order_key"]

NODE_KINDS = ("feature", "error", "embedding", "target")

_SITE_HOOKS = {
    "hook_mlp_out": "mlp",
    "hook_attn_out": "attn",
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
}
_SITE_RE = re.compile(r"^(mlp|attn|resid_pre|resid_mid|resid_post)(\d+)$")
_NODE_RE = re.compile(
    r"^(?:(?P<site>[a-z_]+\d+):(?P<what>error|\d+)|(?P<embed>embed)|(?P<tkind>logit|target):(?P<tname>[^@]+))"
    r"@(?P<pos>-?\d+)$"
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
    """One graph node. ``site``/``feature`` are ``None`` where the kind has none.

    ``target`` nodes carry ``name``: the token id for logit targets (``"logit"`` kind prefix) or a
    free label for direction targets.
    """

    kind: str
    pos: int
    site: str | None = None
    feature: int | None = None
    name: str | None = None
    is_logit: bool = False

    @property
    def id(self) -> str:
        if self.kind == "feature":
            return f"{self.site}:{self.feature}@{self.pos}"
        if self.kind == "error":
            return f"{self.site}:error@{self.pos}"
        if self.kind == "embedding":
            return f"embed@{self.pos}"
        return f"{'logit' if self.is_logit else 'target'}:{self.name}@{self.pos}"

    def __str__(self) -> str:
        return self.id


def parse_node_id(node_id: str) -> Node:
    """Inverse of :attr:`Node.id`; raises ``ValueError`` naming the id when it is malformed."""
    match = _NODE_RE.match(node_id)
    if not match:
        raise ValueError(
            f"{node_id!r} is not a node id; expected 'site:feature@pos', 'site:error@pos', 'embed@pos', "
            "'logit:token@pos' or 'target:name@pos'."
        )
    pos = int(match.group("pos"))
    if match.group("site"):
        site = match.group("site")
        site_layer(site)
        what = match.group("what")
        if what == "error":
            return Node("error", pos, site=site)
        return Node("feature", pos, site=site, feature=int(what))
    if match.group("embed"):
        return Node("embedding", pos)
    return Node("target", pos, name=match.group("tname"), is_logit=match.group("tkind") == "logit")
