"""AttributionGraph: the nodes and exact direct-effect edges of one prompt (or a mean over prompts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .nodes import NODE_KINDS, Node, parse_node_id
from .targets import Target

__all__ = ["AttributionGraph", "FEATURE", "ERROR", "EMBEDDING", "TARGET"]

# node kind codes, in the order nodes are stored
FEATURE, ERROR, EMBEDDING, TARGET = range(4)


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
        activations: ``[n_nodes]`` feature activation, error / embedding vector norm, or target value.
        sites: site names, indexed by ``node_keys[:, 1]``.
        targets: the targets, indexed by ``node_keys[:, 3]`` of target nodes.
        tokens: ``[n_pos]`` prompt tokens (None for dataset-level graphs, whose positions are negative,
            aligned at each prompt's end).
        replacement, clean: the model and clean run the graph was built from (what :func:`verify` needs).
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

    def __repr__(self) -> str:
        return (f"AttributionGraph({self.n_nodes} nodes: {self.n_features} features, {self.count(ERROR)} errors, "
                f"{self.count(EMBEDDING)} embeddings, {self.count(TARGET)} targets; {self.n_edges} edges)")
