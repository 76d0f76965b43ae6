"""A seeded, bounded-memory shuffle buffer over a stream of token rows, exactly resumable.

Streaming rows in dataset order feeds a run's first steps from the start of the corpus only (and every
epoch in the same order); a dictionary trained that way reconstructs worse than one trained on shuffled
rows. ``ShuffledRows`` keeps at most ``buffer_rows`` rows: once full, every block of ``BLOCK_ROWS`` new
rows displaces ``BLOCK_ROWS`` random buffered ones, which are served. What is served does not depend on
how many rows each call asks for, and ``state_dict`` holds the buffer, the rows ready to serve, the
generator and the stream's own position, so a resumed run serves the very same rows.

Given the rows a run will read (``read_limit``), the buffer stops reading there and serves what it holds,
so the run reads no more rows than it trains on; a buffer at least that large is then a full uniform
shuffle of them. Asked for more afterwards, it reads on.
"""

from __future__ import annotations

from typing import Any

import torch

from .packing import TokenRows

__all__ = ["ShuffledRows", "BLOCK_ROWS"]

BLOCK_ROWS = 64  # rows read (and served) per buffer exchange: fixed, so the output is independent of callers
_FILL_ROWS = 1024  # rows read per call while filling: keeps the packer's Python lists small


class ShuffledRows:
    """Rows ``[n, context_size]`` int64 of ``rows`` in a seeded shuffled order, ``buffer_rows`` held at most.

    Offers what ``StreamSource`` reads of a ``TokenRows`` (``next_rows``, ``rows_done``, ``ended``,
    ``first_epoch_rows``, ``repeat``, ``source``, ``context_size``, ``state_dict``).

    Args:
        rows: the stream in dataset order.
        buffer_rows: rows held (memory ``4 * buffer_rows * context_size`` bytes: ids are held as int32).
        seed: seed of the shuffling generator.
        read_limit: rows to read before serving the buffer out without refilling; None: read on.
    """

    def __init__(self, rows: TokenRows, buffer_rows: int, seed: int = 0, read_limit: int | None = None) -> None:
        if buffer_rows < 1:
            raise ValueError(f"buffer_rows={buffer_rows}: a shuffle buffer holds at least one row.")
        self.inner, self.capacity, self.read_limit = rows, buffer_rows, read_limit
        self.generator = torch.Generator().manual_seed(seed)
        self.rows_done = 0  # rows served
        self.rows_read = 0  # rows read from the stream
        self._buffer = torch.empty(0, rows.context_size, dtype=torch.int32)  # grows to capacity while filling
        self._ready = torch.empty(0, rows.context_size, dtype=torch.int32)  # rows drawn, not yet served

    # -- what StreamSource reads of a TokenRows --------------------------------------------------

    @property
    def context_size(self) -> int:
        return self.inner.context_size

    @property
    def source(self) -> Any:
        return self.inner.source

    @property
    def repeat(self) -> bool:
        return self.inner.repeat

    @property
    def first_epoch_rows(self) -> int | None:
        return self.inner.first_epoch_rows

    @property
    def held_rows(self) -> int:
        """Rows held in memory: the buffer and the rows drawn from it, not yet served."""
        return len(self._buffer) + len(self._ready)

    @property
    def ended(self) -> bool:
        return self.inner.ended and not len(self._buffer) and not len(self._ready)

    # -- reading --------------------------------------------------------------------------------

    def _read(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows of the stream, within the read limit."""
        if self.read_limit is not None:
            n_rows = min(n_rows, self.read_limit - self.rows_read)
        if n_rows <= 0 or self.inner.ended:
            return self._buffer[:0]
        new = self.inner.next_rows(n_rows).to(torch.int32)
        self.rows_read += len(new)
        return new

    def _exchange(self) -> None:
        """Fill the buffer, then swap one block of new rows for random buffered ones (made ready to serve);
        when the stream gives no more, serve the whole buffer in a random order."""
        while len(self._buffer) < self.capacity:
            new = self._read(min(_FILL_ROWS, self.capacity - len(self._buffer)))
            if not len(new):
                break
            self._buffer = torch.cat([self._buffer, new])
        new = self._read(BLOCK_ROWS) if len(self._buffer) == self.capacity else self._buffer[:0]
        if len(new):
            slots = torch.randperm(len(self._buffer), generator=self.generator)[: len(new)]
            self._ready = torch.cat([self._ready, self._buffer[slots]])
            self._buffer[slots] = new
            return
        order = torch.randperm(len(self._buffer), generator=self.generator)
        self._ready = torch.cat([self._ready, self._buffer[order]])
        self._buffer = self._buffer[:0]

    def next_rows(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows ``[k, context_size]``; fewer only once a non-repeating stream is served out."""
        while len(self._ready) < n_rows:
            if self.inner.ended and not len(self._buffer):
                break  # a non-repeating stream served out: what is ready is all there is
            if self.read_limit is not None and self.rows_read >= self.read_limit and not len(self._buffer):
                self.read_limit = None  # asked for more than the run's rows (e.g. calibration batches): read on
            self._exchange()
        served, self._ready = self._ready[:n_rows], self._ready[n_rows:]
        self.rows_done += len(served)
        return served.long()

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"rows_done": self.rows_done, "rows_read": self.rows_read, "stream": self.inner.state_dict(),
                "buffer": self._buffer.clone(), "ready": self._ready.clone(),
                "generator": self.generator.get_state(),
                "read_limit": -1 if self.read_limit is None else self.read_limit}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["stream"])
        self.rows_done, self.rows_read = int(state["rows_done"]), int(state["rows_read"])
        self._buffer, self._ready = state["buffer"].to(torch.int32), state["ready"].to(torch.int32)
        self.generator.set_state(state["generator"])
        limit = int(state["read_limit"])
        self.read_limit = None if limit < 0 else limit
