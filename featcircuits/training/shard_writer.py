"""Background writing of activation-cache shards: the model keeps running while the disk catches up.

``ShardWriter`` owns one thread and a bounded queue of finished shards. ``submit`` hands a shard over and
returns at once unless ``max_queued`` shards are already waiting (then it blocks: the disk is the
bottleneck and memory stays bounded at ``max_queued + 2`` shards: queued, being written, being filled).
The thread writes each shard file atomically, then rewrites ``manifest.json`` to list it, so the manifest
only ever names complete shards and an interrupted run resumes after the last one listed. A failure in the
thread (disk full, a directory removed) is raised in the caller's thread at its next ``submit`` or at
``close``, naming the shard; the shards written before it stay listed.

Shards are streamed into the safetensors layout (8-byte header length, JSON header, raw row-major data)
straight from the chunks the model produced, so a shard is never concatenated in memory.
"""

from __future__ import annotations

import json
import queue
import struct
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..dictionaries.io.common import atomic_path, write_json

__all__ = ["ShardWriter", "write_shard", "SAFETENSORS_DTYPES"]

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def write_shard(path: str | Path, parts: Mapping[str, list[torch.Tensor]]) -> int:
    """Write ``{name: [chunks of [rows_i, d]]}`` as one safetensors file ``{name: [sum rows_i, d]}``, atomically.

    Chunks of one name are written one after the other (no concatenated copy); every name must have the
    same dtype and width across its chunks. Returns the bytes written.
    """
    header: dict[str, Any] = {}
    offset = 0
    names = sorted(parts)  # a fixed order: the data section follows the header's offsets
    for name in names:
        chunks = parts[name]
        dtype, width = chunks[0].dtype, int(chunks[0].shape[1])
        rows = sum(int(chunk.shape[0]) for chunk in chunks)
        size = rows * width * chunks[0].element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": [rows, width], "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header so the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for name in names:
            for chunk in parts[name]:
                # raw bytes of the contiguous CPU rows (bf16 has no numpy dtype: go through uint8)
                file.write(chunk.contiguous().view(torch.uint8).numpy().data)
    return 8 + len(encoded) + offset


class ShardWriter:
    """Write shards of ``out`` in a background thread, keeping ``manifest`` (owned by the thread) current.

    Args:
        out: the cache directory.
        manifest: the manifest dict; the thread appends ``{"file", "rows"}`` to ``manifest["shards"]`` and
            sets ``sequences_done`` after each shard, then rewrites ``manifest.json``. Read it only after
            ``close``.
        max_queued: finished shards that may wait for the disk before ``submit`` blocks.
    """

    def __init__(self, out: str | Path, manifest: dict[str, Any], max_queued: int = 2) -> None:
        if max_queued < 1:
            raise ValueError(f"max_queued={max_queued} must be at least 1 (shards waiting for the disk).")
        self.out, self.manifest = Path(out), manifest
        self.queue: queue.Queue[tuple[str, dict[str, list[torch.Tensor]], int, int] | None] = queue.Queue(max_queued)
        self.error: BaseException | None = None
        self.failed_file = ""
        self.bytes_written = 0
        self.write_seconds = 0.0  # time the thread spent writing (files and manifest)
        self.wait_seconds = 0.0  # time the caller spent blocked in submit: the disk holding the model up
        self.thread = threading.Thread(target=self._run, name="featcircuits-cache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.queue.get()
            if job is None:
                return
            name, parts, rows, sequences_done = job
            if self.error is not None:
                continue  # after a failure: drain what was queued, write nothing more
            started = time.perf_counter()
            try:
                self.bytes_written += write_shard(self.out / name, parts)
                self.manifest["shards"].append({"file": name, "rows": rows})
                self.manifest["sequences_done"] = sequences_done
                write_json(self.out / "manifest.json", self.manifest)
            except BaseException as err:  # noqa: BLE001 - any failure is handed to the caller's thread
                self.error, self.failed_file = err, name
            self.write_seconds += time.perf_counter() - started

    def _raise_if_failed(self) -> None:
        if self.error is None:
            return
        done = len(self.manifest["shards"])
        raise OSError(
            f"Writing activation cache shard {self.out / self.failed_file} failed ({self.error}). The {done} complete "
            f"shard{'s' * (done != 1)} before it stay listed in {self.out / 'manifest.json'}: fix the cause (free disk "
            "space, check the directory) and rerun the same command to resume after them."
        ) from self.error

    def submit(self, name: str, parts: dict[str, list[torch.Tensor]], rows: int, sequences_done: int) -> None:
        """Queue shard ``name`` (``{hook: [chunks of [rows_i, d_hook]]}`` on the CPU, not modified afterwards)."""
        self._raise_if_failed()
        started = time.perf_counter()
        while True:
            try:
                self.queue.put((name, parts, rows, sequences_done), timeout=0.1)
                break
            except queue.Full:
                self._raise_if_failed()  # a writer that failed drains the queue, but say why at once
        self.wait_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Write what is queued, stop the thread, and raise a failure it met."""
        started = time.perf_counter()
        self.queue.put(None)
        self.thread.join()
        self.wait_seconds += time.perf_counter() - started
        self._raise_if_failed()
