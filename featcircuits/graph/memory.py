"""What build_graph will hold, estimated before anything is allocated, and the largest cap that fits a budget.

The estimate follows the builder's layout: rows of the kept features and targets over every column
(``[n_targets + N, n_active + (n_sites + 1) * n_pos]`` fp32, only when features are capped), the final
adjacency over the kept nodes (``[n_final, n_final]``), the decoder layout (every active feature's decoder
vector times its activation, zero-padded per site to its busiest position; on the CPU with ``offload``),
the gradients of one batch (with the linear engine's fp32 copies of a bf16 model's attention maps), and the chunk that
influence ranking works on. Not counted: the model, the dictionaries and the clean run (per site, the
``[pos, d_sae]`` pre-activations and activations), which exist before build_graph allocates anything. The decoder layout and the
gradients are freed before the final adjacency is gathered, so the peak is the larger of the two phases.
"""

from __future__ import annotations

import torch

from ..patching.replacement import ReplacementModel

__all__ = ["estimate_graph_memory", "largest_that_fits", "INFLUENCE_CHUNK_ENTRIES"]

# influence ranking and the final gather work on row chunks of at most this many entries (fp32)
INFLUENCE_CHUNK_ENTRIES = 1 << 24


def estimate_graph_memory(rm: ReplacementModel, n_pos: int, n_active: int, n_feature_rows: int,
                          n_targets: int, batch_size: int, engine: str = "autograd", *,
                          layout_vectors: int | None = None, offload: bool = False) -> dict[str, int]:
    """Bytes needed by :func:`build_graph`, by part, and their peak ``"total"`` (on the model's device).

    ``layout_vectors``: decoder vectors in the layout (:func:`featcircuits.graph.rows.layout_entries`; default
    ``n_active``, no padding). With ``offload`` the decoder layout is held on the CPU: it is reported as
    ``"host"`` and left out of ``"total"``.
    """
    cfg = rm.cfg
    model_itemsize = torch.finfo(cfg.dtype).bits // 8
    n_sites = len(rm.sites)
    layout_vectors = n_active if layout_vectors is None else layout_vectors
    if engine == "autograd":
        d_mlp = cfg.d_mlp or 0  # None: an attention-only model, no MLP activations
        per_token = cfg.n_layers * (16 * cfg.d_model + 4 * d_mlp + 4 * cfg.n_heads * cfg.d_head + 2 * cfg.n_heads * n_pos)
        per_token += n_sites * 2 * cfg.d_model  # deltas and their gradients
        forward = 2 * batch_size * n_pos * per_token * model_itemsize
        # one gradient per site alive at once, and a site's contraction
        forward += (n_sites + 1) * batch_size * n_pos * cfg.d_model * model_itemsize
        layout_itemsize = model_itemsize
    else:  # fp32 gradients: a few [batch, pos, width] tensors alive at once, and one site's contraction
        width = max(cfg.d_model, cfg.n_heads * cfg.d_head)
        forward = 8 * batch_size * n_pos * width * 4
        # the engine's transposed clean patterns, and fp32 copies of the value / output maps of a model in
        # another dtype (an fp32 model's are used in place)
        copies = 2 * cfg.d_model * cfg.n_heads * cfg.d_head if cfg.dtype != torch.float32 else 0
        forward += cfg.n_layers * (copies + cfg.n_heads * n_pos * n_pos) * 4
        layout_itemsize = 4
    busiest_site = -(-layout_vectors // max(1, n_sites))  # the contraction's [pos, batch, slots] and its copy
    forward += 2 * batch_size * busiest_site * 4
    layout = layout_vectors * cfg.d_model * layout_itemsize
    n_cols = n_active + (n_sites + 1) * n_pos
    capped = n_feature_rows < n_active
    rows = (n_feature_rows + n_targets) * n_cols * 4 if capped else 0
    influence = min(rows // 4, INFLUENCE_CHUNK_ENTRIES) * 4 * 2 + 8 * n_cols * 4 if capped else 0
    n_final = (n_feature_rows if capped else n_active) + (n_sites + 1) * n_pos + n_targets
    adjacency = n_final * n_final * 4
    on_device = 0 if offload else layout
    if capped:  # rows first, then the adjacency gathered from them once the layout and gradients are freed
        total = rows + max(on_device + forward + influence, adjacency + min(rows, INFLUENCE_CHUNK_ENTRIES * 4))
    else:  # rows straight into the adjacency
        total = adjacency + on_device + forward
    return {"forward_backward": forward, "row_buffer": rows, "adjacency": adjacency, "decoder_layout": layout,
            "influence": influence, "host": layout if offload else 0, "total": total}


def largest_that_fits(rm: ReplacementModel, n_pos: int, n_active: int, n_targets: int, batch_size: int,
                      engine: str, budget_gb: float, layout_vectors: int | None = None,
                      offload: bool = False) -> int | None:
    """The largest ``max_feature_nodes`` whose estimate is within the budget (bisection: the estimate grows
    with N), or None when not even one feature node fits."""
    def fits(n_keep: int) -> bool:
        batch = max(1, min(batch_size, max(n_keep, n_targets)))  # as build_graph sizes it
        total = estimate_graph_memory(rm, n_pos, n_active, n_keep, n_targets, batch, engine,
                                      layout_vectors=layout_vectors, offload=offload)["total"]
        return total <= budget_gb * 2**30

    if not fits(1):
        return None
    low, high = 1, n_active  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
