"""Supernodes: a circuit's features grouped into the units a researcher reads and switches off together.

Two features of a graph fall into one supernode when they do the same thing from the same place: they sit at
the same token position and **write nearly the same direction** (cosine of their decoder rows, pushed to the
residual stream, at least ``min_cosine``) **and feed the rest of the graph alike** (cosine of their outgoing
edge-weight profiles at least ``min_profile``) — or, given labels, when they carry the same label at the same
position. Decoder direction says what a feature writes; the attribution profile says where it matters in
this prompt; either alone merges features that only look alike. Groups are closed transitively (union-find)
and each is named after its most influential member's label (or id).

A supernode is ablated as one unit through :func:`featcircuits.explain.intervene` with
``supernode.interventions("ablate")``, and exported in the Neuronpedia / circuit-tracer JSON's
``qParams.supernodes`` field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..graph.attribution_graph import FEATURE, AttributionGraph
from ..graph.influence import node_influence, normalize_adjacency

__all__ = ["Supernode", "group_supernodes"]


@dataclass
class Supernode:
    """``members``: node ids (most influential first); ``reason``: why they were grouped."""

    name: str
    members: list[str]
    reason: str

    def interventions(self, spec: float | str = "ablate") -> dict[str, float | str]:
        """The same intervention on every member, for :func:`featcircuits.explain.intervene`."""
        return {member: spec for member in self.members}


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def group_supernodes(graph: AttributionGraph, nodes: Sequence[str] | None = None, *, min_cosine: float = 0.6,
                     min_profile: float = 0.6, labels: Mapping[str, str] | None = None) -> list[Supernode]:
    """Group the feature nodes of ``graph`` (those in ``nodes``, e.g. a pruned circuit's; default all).

    Args:
        min_cosine: decoder rows (in the residual stream) at least this aligned.
        min_profile: outgoing edge-weight profiles (each feature's column of the adjacency) at least this aligned.
        labels: per dashboard key ``"<layer>_<feature>"``, a label; features with one label at one position join.

    Returns supernodes of two or more members, largest influence first. Needs the graph's ReplacementModel
    (for the decoders).
    """
    if graph.replacement is None:
        raise ValueError("group_supernodes needs the graph's ReplacementModel (its decoders): build the graph, or "
                         "load it with AttributionGraph.load(path, model=replacement).")
    ids = graph.node_ids
    wanted = set(nodes) if nodes is not None else None
    keys = graph.node_keys
    index = [i for i in (keys[:, 0] == FEATURE).nonzero()[:, 0].tolist() if wanted is None or ids[i] in wanted]
    if len(index) < 2:
        return []
    rm = graph.replacement
    rows = []
    for i in index:
        _, site_index, _, feature = keys[i].tolist()
        d = rm.sites[site_index].dictionary
        rows.append(d.W_dec.detach()[feature].float() / d.cfg.norm_scale)
    decoders = torch.nn.functional.normalize(torch.stack(rows), dim=-1)  # [m, d_model]
    profiles = torch.nn.functional.normalize(graph.adjacency[:, index].T.float(), dim=-1)  # [m, n_nodes]
    same_pos = keys[index, 2][:, None] == keys[index, 2][None, :]
    alike = same_pos & (decoders @ decoders.T >= min_cosine) & (profiles @ profiles.T >= min_profile)
    names = [labels.get(_dashboard_key(graph, i)) for i in index] if labels else []
    if labels:
        codes = {name: code for code, name in enumerate(sorted({n for n in names if n is not None}))}
        label_code = torch.tensor([codes.get(n, -1) if n is not None else -1 for n in names], device=alike.device)
        labelled = label_code >= 0
        alike |= same_pos & (label_code[:, None] == label_code[None, :]) & labelled[:, None] & labelled[None, :]
    parent = list(range(len(index)))
    for a, b in alike.triu(1).nonzero().tolist():
        parent[_find(parent, a)] = _find(parent, b)
    influence = node_influence(normalize_adjacency(graph.adjacency), graph.target_weights)
    groups: dict[int, list[int]] = {}
    for j in range(len(index)):
        groups.setdefault(_find(parent, j), []).append(j)
    found: list[tuple[float, Supernode]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort(key=lambda j: -float(influence[index[j]]))
        lead_label = names[members[0]] if labels else None
        lead = ids[index[members[0]]]
        found.append((float(influence[index[members[0]]]), Supernode(
            name=f"{lead_label or lead} (+{len(members) - 1})", members=[ids[index[j]] for j in members],
            reason=f"same position; decoder cosine >= {min_cosine} and edge-profile cosine >= {min_profile}"
                   + (", or the same label" if labels else ""))))
    return [supernode for _, supernode in sorted(found, key=lambda item: -item[0])]


def _dashboard_key(graph: AttributionGraph, i: int) -> str:
    """The dashboards' key of feature node ``i``: ``"<layer>_<feature>"``."""
    _, site_index, _, feature = graph.node_keys[i].tolist()
    return f"{graph.sites[site_index].lstrip('abcdefghijklmnopqrstuvwxyz_')}_{feature}"
