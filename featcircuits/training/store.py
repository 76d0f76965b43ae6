"""``ActivationStore``: a shuffled buffer of activation rows on the training device, within a byte budget.

Rows from a source (a model forward, or cache shards) fill a preallocated buffer ``{hook: [capacity,
d_hook]}``. Batches are gathered through a random permutation; once half the buffer has been served,
the served slots are overwritten with fresh rows and a new permutation is drawn, so every batch mixes
rows from many sequences (and shards) and nothing is reallocated. Given the rows the run will use
(``max_rows``), the store reads no more than those: once they are all read, the buffer's unserved rows
are served without refilling, so every row read is trained on once (more are read only when asked for).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

__all__ = ["ActivationStore", "ActivationSource", "NonFiniteActivationError"]


class NonFiniteActivationError(ValueError):
    """Activations contain NaN or Inf."""


class ActivationSource(Protocol):
    def next_chunk(self) -> dict[str, torch.Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ActivationStore:
    """Serve ``{hook: [batch_size, d_hook]}`` batches, shuffled, from ``source``.

    Args:
        source: yields row-aligned chunks ``{hook: [rows, d_hook]}``.
        widths: ``{hook: d_hook}``.
        batch_size: rows per batch.
        buffer_bytes: memory budget of the buffer (float32 rows of all hooks together).
        device: where the buffer lives (the training device).
        seed: seed of the shuffling generator (its state is part of ``state_dict``).
        max_rows: rows the run will read in all; the buffer is not made larger than that, and no more rows
            are read unless more batches are asked for.
    """

    def __init__(
        self,
        source: ActivationSource,
        widths: dict[str, int],
        batch_size: int,
        buffer_bytes: int,
        device: str | torch.device = "cpu",
        seed: int = 0,
        max_rows: int | None = None,
    ) -> None:
        self.source, self.widths, self.batch_size = source, dict(widths), batch_size
        self.device = torch.device(device)
        row_bytes = 4 * sum(self.widths.values())
        self.capacity = int(buffer_bytes // row_bytes)
        if max_rows is not None:
            # A run that will only ever read max_rows rows needs no larger buffer (nor the time to fill it).
            self.capacity = min(self.capacity, max(2 * batch_size, max_rows))
        if self.capacity < 2 * batch_size:
            raise ValueError(
                f"buffer_bytes={buffer_bytes} holds {self.capacity} rows of {row_bytes} bytes, but the buffer must "
                f"hold at least two batches (2 x batch_size={batch_size}): raise buffer_bytes to at least "
                f"{2 * batch_size * row_bytes} or lower batch_size."
            )
        self.buffers = {hook: torch.empty(self.capacity, d, device=self.device) for hook, d in self.widths.items()}
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.order = torch.arange(self.capacity)
        self.cursor = self.capacity  # everything "served": the first batch triggers a full fill
        self.unread = max_rows  # rows still to read before the run's budget is met; None: no budget
        self.pending: dict[str, torch.Tensor] = {}  # rows of the last chunk that did not fit
        self.step = 0  # for error messages only

    def _take_rows(self, n_rows: int) -> dict[str, torch.Tensor]:
        """Exactly ``n_rows`` new rows per hook, pulling chunks from the source as needed."""
        parts: dict[str, list[torch.Tensor]] = {hook: [] for hook in self.widths}
        have = 0
        if self.pending:
            for hook in self.widths:
                parts[hook].append(self.pending[hook])
            have = len(self.pending[next(iter(self.widths))])
            self.pending = {}
        while have < n_rows:
            chunk = self.source.next_chunk()
            self._check_finite(chunk)
            for hook in self.widths:
                parts[hook].append(chunk[hook].to(self.device, torch.float32))
            have += len(chunk[next(iter(self.widths))])
        rows = {}
        for hook in self.widths:
            joined = torch.cat(parts[hook]) if len(parts[hook]) > 1 else parts[hook][0]
            rows[hook] = joined[:n_rows]
            if have > n_rows:
                self.pending[hook] = joined[n_rows:].clone()
        return rows

    def _check_finite(self, chunk: dict[str, torch.Tensor]) -> None:
        for hook, acts in chunk.items():
            if hook in self.widths and not torch.isfinite(acts).all():
                raise NonFiniteActivationError(
                    f"Activations at hook {hook!r} contain NaN or Inf (refill before training step {self.step}). "
                    "Check the model's dtype (fp16 overflows) and the input data; training stopped before using them."
                )

    def _refill(self) -> None:
        free = self.order[: self.cursor]  # slots already served
        if self.unread is not None and self.unread < len(free):
            # The run's last rows: fill only as many slots, and serve just the unserved and new ones.
            free = free[: self.unread]
        rows = self._take_rows(len(free))
        if self.unread is not None:
            self.unread -= len(free)
        free_device = free.to(self.device)
        for hook, buffer in self.buffers.items():
            buffer.index_copy_(0, free_device, rows[hook])
        if len(self.order) - self.cursor + len(free) == self.capacity:
            self.order = torch.randperm(self.capacity, generator=self.generator)
        else:  # some slots hold served rows that no refill replaced: leave them out
            valid = torch.cat([self.order[self.cursor :], free])
            self.order = valid[torch.randperm(len(valid), generator=self.generator)]
        self.cursor = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        """``{hook: [batch_size, d_hook]}``, float32 on the training device."""
        exhausted = self.cursor + self.batch_size > len(self.order)
        if exhausted and self.unread == 0:
            self.unread = None  # asked for more than the run's budget (e.g. calibration batches): read on
        # Half served: refill the served slots. capacity >= 2 * batch_size, so a batch always fits.
        if exhausted or (self.cursor >= self.capacity // 2 and self.unread != 0):
            self._refill()
        index = self.order[self.cursor : self.cursor + self.batch_size].to(self.device)
        self.cursor += self.batch_size
        self.step += 1
        return {hook: buffer.index_select(0, index) for hook, buffer in self.buffers.items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact same stream: buffer, order, cursor, source position."""
        return {
            "buffers": {hook: buffer.cpu().clone() for hook, buffer in self.buffers.items()},
            "order": self.order.clone(),
            "cursor": self.cursor,
            "pending": {hook: rows.cpu().clone() for hook, rows in self.pending.items()},
            "generator": self.generator.get_state(),
            "source": self.source.state_dict(),
            "step": self.step,
            "unread": -1 if self.unread is None else self.unread,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for hook, buffer in self.buffers.items():
            buffer.copy_(state["buffers"][hook])
        self.order = state["order"].clone()
        self.cursor = int(state["cursor"])
        self.pending = {hook: rows.to(self.device) for hook, rows in state["pending"].items()}
        self.generator.set_state(state["generator"])
        self.source.load_state_dict(state["source"])
        self.step = int(state["step"])
        unread = int(state.get("unread", -1))
        self.unread = None if unread < 0 else unread
