"""Reading activation-cache shards in blocks of rows, and reading ahead in a background thread.

A shard is a safetensors file; ``ShardFile`` parses its header once and reads any run of rows of one
tensor with a single positioned read (``os.preadv``, which releases the GIL) straight into a preallocated
tensor, so reading a block costs one system call and no intermediate copy, whatever the shard's size.

``ReadAhead`` runs a producer function in a thread and keeps at most ``depth`` of its results waiting:
the next chunk is read from disk while the current one trains. A failure in the thread is raised in the
consumer's thread at its next ``get``.
"""

from __future__ import annotations

import atexit
import json
import os
import queue
import struct
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["ShardFile", "ShardFiles", "ReadAhead"]

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class ShardFile:
    """One shard's header: per tensor ``(dtype, [rows, width], absolute byte offset of row 0)``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FileNotFoundError(f"Cache shard {path} listed in the manifest is missing.") from None
        try:
            self.tensors = self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse_header(self) -> dict[str, tuple[torch.dtype, tuple[int, int], int]]:
        size = os.fstat(self.fd).st_size
        head = os.pread(self.fd, 8, 0)
        bad = f"Cache shard {self.path} is unreadable"
        if len(head) < 8:
            raise ValueError(f"{bad} (truncated to {size} bytes); rewrite the cache.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise ValueError(f"{bad} (header length {header_len} in a file of {size} bytes); rewrite the cache.")
        try:
            header = json.loads(os.pread(self.fd, header_len, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{bad} (corrupt header: {err}); rewrite the cache.") from None
        header.pop("__metadata__", None)
        data_start, tensors, end = 8 + header_len, {}, 0
        for name, entry in header.items():
            begin, stop = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if entry["dtype"] not in _DTYPES or len(shape) != 2:
                raise ValueError(f"{bad} (tensor {name!r} is {entry['dtype']} {list(shape)}, not a 2-d float table); "
                                 "rewrite the cache.")
            tensors[name] = (_DTYPES[entry["dtype"]], (int(shape[0]), int(shape[1])), data_start + int(begin))
            end = max(end, int(stop))
        if data_start + end > size:
            raise ValueError(f"{bad} (truncated: {size} bytes of {data_start + end}); rewrite the cache.")
        return tensors

    def check(self, hooks: dict[str, int], rows: int, dtype: torch.dtype) -> None:
        """Raise naming the shard when it lacks a hook or disagrees with the manifest on rows, width or dtype."""
        for hook, width in hooks.items():
            if hook not in self.tensors:
                raise ValueError(f"Cache shard {self.path} has no tensor {hook!r}; the shard does not belong to this "
                                 "cache. Rewrite the cache.")
            got_dtype, shape, _ = self.tensors[hook]
            if shape != (rows, width) or got_dtype != dtype:
                raise ValueError(f"Cache shard {self.path} holds {hook!r} as {got_dtype} {list(shape)}, but the "
                                 f"manifest says {dtype} [{rows}, {width}]; the cache is corrupt. Rewrite it.")

    def read_rows(self, hook: str, start: int, out: torch.Tensor) -> None:
        """Fill ``out [n, width]`` (contiguous, the shard's dtype) with rows ``start : start + n`` of ``hook``."""
        dtype, (_, width), base = self.tensors[hook]
        view = out.view(torch.uint8).numpy()
        offset = base + start * width * out.element_size()
        done = 0
        while done < view.nbytes:  # a positioned read may return less than asked for; loop until all is in
            got = os.preadv(self.fd, [view.data[done:]], offset + done)
            if got == 0:
                raise ValueError(f"Cache shard {self.path} ended early reading {hook!r} (truncated); rewrite the cache.")
            done += got

    def close(self) -> None:
        os.close(self.fd)


class ShardFiles:
    """Open ``ShardFile``s by shard file name, at most ``max_open`` at a time (least recently used closed)."""

    def __init__(self, root: Path, manifest: dict[str, Any], hooks: dict[str, int], dtype: torch.dtype,
                 max_open: int = 64) -> None:
        self.root, self.hooks, self.dtype, self.max_open = root, hooks, dtype, max_open
        self.rows = {shard["file"]: int(shard["rows"]) for shard in manifest["shards"]}
        self.open: OrderedDict[str, ShardFile] = OrderedDict()

    def get(self, name: str) -> ShardFile:
        if name in self.open:
            self.open.move_to_end(name)
            return self.open[name]
        shard = ShardFile(self.root / name)
        try:
            shard.check(self.hooks, self.rows[name], self.dtype)
        except BaseException:
            shard.close()
            raise
        self.open[name] = shard
        if len(self.open) > self.max_open:
            self.open.popitem(last=False)[1].close()
        return shard

    def close(self) -> None:
        while self.open:
            self.open.popitem()[1].close()


_LIVE: weakref.WeakSet[ReadAhead] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    # A thread still inside a torch op while the interpreter tears torch down aborts the process: stop first.
    for reader in list(_LIVE):
        reader.close()


class ReadAhead:
    """Iterate ``produce()`` (an iterator factory) in a thread, ``depth`` results ahead of ``get``."""

    def __init__(self, produce: Callable[[], Iterator[Any]], depth: int) -> None:
        self.queue: queue.Queue[tuple[bool, Any]] = queue.Queue(depth)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(produce, self.queue, self.stop), daemon=True,
                                       name="featcircuits-cache-reader")
        self.thread.start()
        _LIVE.add(self)

    @staticmethod
    def _run(produce: Callable[[], Iterator[Any]], results: queue.Queue, stop: threading.Event) -> None:
        # A static method holding no reference to the ReadAhead, so dropping the source ends the thread.
        def put(result: tuple[bool, Any]) -> bool:
            while not stop.is_set():
                try:
                    results.put(result, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            for item in produce():
                if not put((True, item)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer's thread
            put((False, err))

    def get(self) -> Any:
        if self.error is not None:  # the thread has ended: raise its failure again rather than wait forever
            raise self.error
        ok, item = self.queue.get()
        if not ok:
            self.error = item
            raise item
        return item

    def close(self) -> None:
        self.stop.set()
        self.thread.join()

    def __del__(self) -> None:
        self.stop.set()
