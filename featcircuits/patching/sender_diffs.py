"""Senders' outputs minus their ablations during a batched edge-patching forward, and the removed edges' sums.

An edge ablation takes ``sender_out - sender_ablated`` out of one receiver's input, so each receiver needs
``sum_s removed[r, s] * diff[s]`` over its senders, per batch row (``copies * n``: every ablation pattern
over every prompt). Senders in the clean prefix (before the first block the forward runs) have the clean
run's outputs in every copy, so their differences are held once per prompt rather than once per copy: the
copy-wide tensor ``[copies * n, senders, pos, d_model]`` was the largest write of a late-starting forward.
"""

from __future__ import annotations

import copy

import torch

from .workspace import Workspace

__all__ = ["SenderDiffs"]


class SenderDiffs:
    """``sender output - ablation`` for ``copies x n`` batch rows (copy-major, ``row = copy * n + prompt``).

    Differences are held sender-major (``[senders, rows, pos, d_model]``), so a sender's block is written in
    one contiguous pass: a layer's heads straight from their ``z`` by one matmul per head.

    Args:
        clean: clean sender outputs ``[n, senders, pos, d_model]``.
        ablated: their ablation values ``[n | 1, senders, pos, d_model]``.
        copies: ablation patterns in the batch.
        prefix: senders before the first block the forward runs: theirs are ``clean - ablated`` in every copy.
        workspace: where the differences (role ``sender_diffs``) and the removed sums (role ``correction``,
            valid until the next :meth:`removed_sum`) are written; fresh tensors without one.
    """

    def __init__(self, clean: torch.Tensor, ablated: torch.Tensor, copies: int, prefix: int,
                 workspace: Workspace | None = None) -> None:
        self.copies, self.n, self.prefix = copies, clean.shape[0], prefix
        self.ablated, self.workspace = ablated, workspace
        self.prefix_diffs = clean[:, :prefix] - ablated[:, :prefix]  # [n, prefix, pos, d_model]
        # later senders, written as the forward runs, always before a receiver reads them
        shape = (ablated.shape[1] - prefix, copies * self.n, *ablated.shape[2:])
        self.diffs = ablated.new_empty(shape) if workspace is None else workspace.take("sender_diffs", shape, ablated)

    @torch.no_grad()
    def store(self, start: int, value: torch.Tensor) -> None:
        """Sender ``start`` from its output ``value [copies * n, pos, d_model]``."""
        rows = self.diffs[start - self.prefix].view(self.copies, self.n, *value.shape[1:])
        torch.sub(value.view(rows.shape), self.ablated[:, start], out=rows)

    @torch.no_grad()
    def store_heads(self, start: int, z: torch.Tensor, ablated_z: torch.Tensor, W_O: torch.Tensor) -> None:
        """Senders ``start .. start + heads`` from the heads' ``z [head, copies * n, pos, d_head]`` (head-major;
        a permuted view will do), their ablations ``ablated_z [head, n | 1, pos, d_head]`` and ``W_O [head,
        d_head, d_model]``: a head's output is ``z W_O`` (the bias is the layer's, not a head's), so its
        difference is ``(z - ablated_z) W_O``, one matmul per head written straight into its sender's block."""
        heads, _, pos, d_head = z.shape
        z_diff = z.unflatten(1, (self.copies, self.n)) - ablated_z.unsqueeze(1)  # [head, copies, n, pos, d_head]
        block = self.diffs[start - self.prefix:start - self.prefix + heads]
        torch.bmm(z_diff.reshape(heads, -1, d_head), W_O, out=block.view(heads, -1, block.shape[-1]))

    def differences(self, n_senders: int) -> torch.Tensor:
        """The first ``n_senders`` senders' differences ``[n, n_senders, pos, d_model]`` of a one-copy forward."""
        if self.copies != 1:
            raise ValueError(f"differences() reads a one-copy forward; this one holds {self.copies} copies.")
        own = self.diffs[:max(0, n_senders - self.prefix)].transpose(0, 1)  # [n, own, pos, d_model]
        return torch.cat([self.prefix_diffs[:, :n_senders], own], dim=1)

    def at(self, positions: torch.Tensor) -> SenderDiffs:
        """The differences at one position per prompt (``positions [n]``, the same in every copy), senders
        stored so far included: ``pos`` becomes 1, and later senders are stored at that position only."""
        prompts = torch.arange(self.n, device=positions.device)
        single = copy.copy(self)
        single.workspace = None  # its tensors are small, and the full-width ones may still be read
        ablated = self.ablated.expand(self.n, *self.ablated.shape[1:])
        single.ablated = ablated[prompts, :, positions].unsqueeze(2)  # [n, senders, 1, d_model]
        single.prefix_diffs = self.prefix_diffs[prompts, :, positions].unsqueeze(2)
        diffs = self.diffs.view(self.diffs.shape[0], self.copies, self.n, *self.diffs.shape[2:])
        single.diffs = diffs[:, :, prompts, positions].reshape(self.diffs.shape[0], self.copies * self.n, 1,
                                                                self.diffs.shape[-1])
        return single

    def removed_sum(self, removed: torch.Tensor) -> torch.Tensor:
        """``removed [copies * n, receivers, senders]`` (1 removes the edge) -> the sum of the removed senders'
        differences for each receiver, ``[copies * n, receivers, pos, d_model]``.

        The output is written once by the prefix senders' matmuls and accumulated in place by the later
        senders' (no permuted copy, no separate sum): it is as large as every receiver's input together."""
        rows, n_receivers, n_senders = removed.shape
        removed = removed.to(self.ablated.dtype)
        pos, d_model = self.ablated.shape[2:]
        shape = (rows, n_receivers, pos * d_model)
        total = self.ablated.new_empty(shape) if self.workspace is None else self.workspace.take(
            "correction", shape, self.ablated)
        shared = min(n_senders, self.prefix)
        own = n_senders - shared
        own_diffs = self.diffs[:own].view(own, rows, pos * d_model).transpose(0, 1)  # [rows, own, pos * d_model]
        if shared:
            # prefix differences are per prompt, the pattern per copy: one matmul batched over prompts per copy
            per_copy = removed[:, :, :shared].reshape(self.copies, self.n, n_receivers, shared)
            prefix = self.prefix_diffs[:, :shared].reshape(self.n, shared, pos * d_model)
            out = total.view(self.copies, self.n, n_receivers, pos * d_model)
            for pattern in range(self.copies):
                torch.bmm(per_copy[pattern], prefix, out=out[pattern])
            if own:
                total.baddbmm_(removed[:, :, shared:], own_diffs)
        else:
            torch.bmm(removed, own_diffs, out=total)
        return total.view(rows, n_receivers, pos, d_model)
