"""The circuit-tracer / Neuronpedia attribution-graph JSON schema, as pydantic models.

Written from the pydantic models in circuit-tracer's ``circuit_tracer/frontend/graph_models.py``
(first written from commit d797c82; ``schema_version`` and the cantor-paired ``feature`` follow the
current main, decoderesearch/circuit-tracer 4bb8c0e): the same fields, types and defaults, so a file that
validates here validates there. ``GraphFile.model_validate(json.load(f))`` checks a file.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["GraphMetadata", "GraphQParams", "GraphNode", "GraphLink", "GraphFile"]


class GraphMetadata(BaseModel):
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = 1


class GraphQParams(BaseModel):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class GraphNode(BaseModel):
    # Extra keys (featcircuits adds "featcircuits_id") are allowed, as in circuit-tracer's models.
    model_config = ConfigDict(extra="allow")

    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None


class GraphLink(BaseModel):
    source: str
    target: str
    weight: float


class GraphFile(BaseModel):
    metadata: GraphMetadata
    qParams: GraphQParams
    nodes: list[GraphNode]
    links: list[dict]
