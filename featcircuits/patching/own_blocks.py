"""The edge-patching forward run by featcircuits itself rather than through transformer_lens's hooks.

For pre-norm causal models with standard or rotary positions (:func:`.attention.own_blocks_supported`), a
batched edge-patching forward runs its blocks here: each head's query, key and value come from its own
corrected input, head-major (:func:`.head_inputs.head_qkv_head_major`), and the attention is
:func:`.attention.causal_attention`. Each prompt runs only its window of positions (:class:`.PromptWindows`:
under patch ablation, from its first token where clean and corrupt differ, with the clean run's keys and
values before it), and the last block only at each prompt's last token, the one position the metric reads.
The same forward, with zero corrections that gradients flow into, gives plain AtP edge scores.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .ablation import repeat_copies
from .attention import causal_attention, rotate
from .head_inputs import head_qkv_head_major, shared_qkv_head_major
from .sender_diffs import SenderDiffs
from .windows import PromptWindows
from .workspace import Workspace

__all__ = ["Correction", "OwnBlocks"]

# (receiver group, senders) -> what the group's receivers' inputs lose, ``[rows, receivers, pos, d_model]``
# (``None``: nothing), over the senders' positions
Correction = Callable[[int, SenderDiffs], "torch.Tensor | None"]


class OwnBlocks:
    """The blocks of ``graph``'s model run for edge patching, over each prompt's window of positions.

    ``graph`` is a :class:`featcircuits.circuits.ComponentGraph` (its task, senders and receiver groups).

    Holds what the forwards reuse: the windows, the senders' outputs at them, the clean prefix's rotated keys
    and values per layer, and scratch buffers (:class:`.Workspace`).
    """

    def __init__(self, graph: Any) -> None:
        self.graph = graph
        task = graph.task
        self.windows = PromptWindows.of(task.clean_tokens, task.corrupt_tokens, task.clean_last,
                                        patch=graph.ablation == "patch")
        self.workspace = Workspace()  # the batched forward's scratch buffers, reused across forwards
        self._windowed_senders: tuple[torch.Tensor, torch.Tensor] | None = None
        self._prefix_kv_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._ablated_z_cache: dict[int, torch.Tensor] = {}

    def edge_metric(self, removed: torch.Tensor, copies: int, start_layer: int) -> torch.Tensor:
        """The metric ``[copies]`` of ``removed [copies * n, n_edges]`` (1 removes an edge), every copy from the
        clean residual stream at ``start_layer``."""
        graph = self.graph
        n = len(graph.task)

        def removed_sum(group: int, senders: SenderDiffs) -> torch.Tensor | None:
            _, first, n_receivers, n_senders = graph._receiver_groups[group]
            off = removed[:, first:first + n_receivers * n_senders]
            return senders.removed_sum(off.view(-1, n_receivers, n_senders)) if bool(off.any()) else None

        graph.forwards += 1
        final = self.forward(copies, start_layer, removed_sum, self.workspace)
        return graph._metric_from_last(final.view(copies, n, -1))

    def forward(self, copies: int, start_layer: int, correction: Correction,
                workspace: Workspace | None) -> torch.Tensor:
        """The blocks from ``start_layer`` on, run here (:meth:`block`) over each prompt's window of
        positions (:class:`.PromptWindows`), the last block at each prompt's last token.

        Args:
            copies: patterns; rows are ``copies * n``, copy-major.
            start_layer: every row reads the clean residual stream there.
            correction: what each receiver group's input loses (see :data:`Correction`).
            workspace: scratch buffers for the large tensors (``None``: fresh ones, as autograd needs).

        Returns:
            The final residual stream at each row's last token, ``[rows, d_model]``.
        """
        graph = self.graph
        n, windows = len(graph.task), self.windows
        clean, ablated = self._windowed_sender_outputs()  # [n | 1, senders, width, d_model]
        if start_layer == graph.n_layers:  # only edges into the logits: no block runs, every sender is clean
            senders = SenderDiffs(clean, ablated, copies, len(graph.sender_ids)).at(windows.last)
            last = graph._clean_final[torch.arange(n, device=clean.device), graph.task.clean_last]  # [n, d_model]
            resid = repeat_copies(last, copies, n).unsqueeze(1)
        else:
            senders = SenderDiffs(clean, ablated, copies, 1 + start_layer * graph.per_layer, workspace)
            resid = repeat_copies(windows.gather(graph._clean_resid[start_layer], 1), copies, n)
            for layer in range(start_layer, graph.n_layers - 1):
                resid, _ = self.block(layer, resid, senders, correction, workspace)
            # the metric reads the last block at each prompt's last token only
            resid, senders = self.block(graph.n_layers - 1, resid, senders, correction, workspace,
                                        last_token=True)
        logits_correction = correction(len(graph._receiver_groups) - 1, senders)
        return resid[:, 0] if logits_correction is None else resid[:, 0] - logits_correction[:, 0, 0]

    def block(self, layer: int, resid: torch.Tensor, senders: SenderDiffs, correction: Correction,
              workspace: Workspace | None, last_token: bool = False) -> tuple[torch.Tensor, SenderDiffs]:
        """One block of the edge-patching forward, run here rather than through transformer_lens's hooks.

        Each head reads ``resid - correction[head]``, the MLP likewise after the heads, and the block records
        its own senders' differences in ``senders``.

        Args:
            resid: the block's input ``[rows, width, d_model]`` over each prompt's window (rows ``copies * n``,
                copy-major).
            senders: every earlier sender's difference over the same positions.
            correction: what each receiver group's input loses (see :data:`Correction`).
            workspace: scratch buffers, or ``None``.
            last_token: compute queries, MLP and senders at each prompt's last token only.

        Returns:
            The block's output (``[rows, 1, d_model]`` at the last token with ``last_token``) and the senders
            (at the last token with ``last_token``).
        """
        graph = self.graph
        block, attn = graph.model.blocks[layer], graph.model.blocks[layer].attn
        n, windows = len(graph.task), self.windows
        copies = resid.shape[0] // n
        heads = 2 * layer if graph.has_mlp else layer  # this layer's receiver groups: heads, then the MLP
        head_correction = correction(heads, senders)  # [rows, head, width, d_model]
        if head_correction is None:  # every head reads the residual stream itself
            qkv = shared_qkv_head_major(block, resid)
        else:
            inputs = None if workspace is None else workspace.take("head_inputs", (graph.n_heads, *resid.shape), resid)
            qkv = head_qkv_head_major(block, resid, head_correction, inputs)
        d_head = attn.W_Q.shape[-1]
        q, k, v = qkv.split(d_head, dim=-1)  # [head, rows, width, d_head] each
        if graph.model.cfg.positional_embedding_type == "rotary":  # at each prompt's own positions, q and k at once
            qk = qkv[..., :2 * d_head].unflatten(1, (copies, n)).unflatten(-1, (2, d_head))
            q, k = rotate(attn, qk, windows.positions[..., None]).flatten(1, 2).unbind(-2)
        if windows.prefix:  # keys and values before the windows: the clean run's
            prefix_k, prefix_v = self._prefix_kv(layer, windows.prefix)
            k = torch.cat([prefix_k.repeat(1, copies, 1, 1), k], dim=2)
            v = torch.cat([prefix_v.repeat(1, copies, 1, 1), v], dim=2)
        ablated_z = self._windowed_ablated_z(layer)  # [head, n, width, d_head]
        if last_token:
            rows_last = windows.last.repeat(copies)
            rows = torch.arange(resid.shape[0], device=resid.device)
            z = causal_attention(attn, q[:, rows, rows_last].unsqueeze(2), k, v, windows.mask(last_only=True))
            resid = resid[rows, rows_last].unsqueeze(1)
            senders = senders.at(windows.last)
            ablated_z = ablated_z[:, torch.arange(n, device=rows.device), windows.last].unsqueeze(2)
        else:
            z = causal_attention(attn, q, k, v, windows.mask())  # [head, rows, width, d_head]
        start = 1 + layer * graph.per_layer
        senders.store_heads(start, z, ablated_z, attn.W_O)
        resid = resid + torch.einsum("hbpd,hdm->bpm", z, attn.W_O) + attn.b_O
        if graph.has_mlp:
            mlp_correction = correction(heads + 1, senders)
            mlp_out = block.mlp(block.ln2(resid if mlp_correction is None else resid - mlp_correction[:, 0]))
            senders.store(start + graph.n_heads, mlp_out)
            resid = resid + mlp_out
        return resid, senders

    def edge_attribution(self) -> torch.Tensor:
        """Plain AtP edge scores ``[n_edges]`` through the own blocks: every receiver group's input gets a zero
        correction that gradients flow into (``-grad`` of its input), and the senders' differences are the
        ones the clean forward records."""
        graph = self.graph
        n = len(graph.task)
        probes: dict[int, tuple[torch.Tensor, SenderDiffs]] = {}

        def probe(group: int, senders: SenderDiffs) -> torch.Tensor:
            _, _, n_receivers, _ = graph._receiver_groups[group]
            shape = (n, n_receivers, *senders.ablated.shape[2:])  # [n, receivers, pos, d_model]
            probes[group] = (senders.ablated.new_zeros(shape).requires_grad_(), senders)
            return probes[group][0]

        with torch.enable_grad():
            final = self.forward(1, 0, probe, workspace=None)
            total = graph._metric_from_last(final.view(1, n, -1)).sum()
            grads = torch.autograd.grad(total, [leaf for leaf, _ in probes.values()])
        graph.forwards += 1
        scores = torch.zeros(len(graph.edge_ids), device=final.device)
        for (group, (_, senders)), grad in zip(probes.items(), grads, strict=True):
            _, first, n_receivers, n_senders = graph._receiver_groups[group]
            # input = x - probe, and the senders' differences are clean - ablated: two sign flips cancel
            diffs = senders.differences(n_senders)  # [n, senders, pos, d_model]
            scores[first:first + n_receivers * n_senders] = torch.einsum("nspd,nrpd->rs", diffs, grad).flatten()
        return scores

    def _windowed_sender_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and ablated sender outputs at each prompt's window, ``[n, senders, width, d_model]``."""
        graph = self.graph
        if self._windowed_senders is None:
            windows = self.windows
            clean, ablated = graph._sender_outputs()
            self._windowed_senders = (windows.gather(clean, 2), windows.gather(ablated, 2))
        return self._windowed_senders

    def _windowed_ablated_z(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s heads' ablated ``z`` at each prompt's window, head-major ``[head, n, width, d_head]``."""
        if layer not in self._ablated_z_cache:
            self._ablated_z_cache[layer] = self.windows.gather(self.graph._ablated_z[layer], 1).permute(2, 0, 1, 3)
        return self._ablated_z_cache[layer]

    def _prefix_kv(self, layer: int, skip: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The clean run's keys (rotated) and values at the first ``skip`` positions, ``[head, n, skip, d_head]``."""
        graph = self.graph
        key = (layer, skip)
        if key not in self._prefix_kv_cache:
            keys, values = (x[:, :skip].permute(2, 0, 1, 3) for x in graph._clean_kv[layer])
            if graph.model.cfg.positional_embedding_type == "rotary":
                keys = rotate(graph.model.blocks[layer].attn, keys, torch.arange(skip, device=keys.device))
            self._prefix_kv_cache[key] = (keys.contiguous(), values.contiguous())
        return self._prefix_kv_cache[key]
