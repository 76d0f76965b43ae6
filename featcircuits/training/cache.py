"""Activation cache on disk: safetensors shards of chosen hooks plus a ``manifest.json``.

Each shard holds one tensor per hook, ``[rows, d_hook]``, row-aligned across hooks (so a transcoder's
input and output rows stay paired). Writing: the model's chunks are gathered into shards that a
background ``ShardWriter`` streams to disk (atomically, the manifest rewritten after each one), so the
model forward does not wait on the disk until ``max_queued`` shards are pending, and an interrupted
``featcircuits cache`` resumes at the first shard the manifest does not list. Reading: ``CacheSource``
cuts every shard into blocks of contiguous rows, visits all blocks of the cache in a seeded random order
per epoch and serves a few blocks (from as many shards) at a time, read ahead in a background thread; the
ActivationStore buffer then places rows in random slots and draws every batch at random, so a batch
mixes rows from many blocks and shards. Memory: a few shards when writing, a few chunks when reading,
whatever the cache's size.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from ..dictionaries.io.common import read_json, write_json
from .shard_reader import ReadAhead, ShardFiles
from .shard_writer import ShardWriter

__all__ = ["MANIFEST", "is_cache_dir", "read_manifest", "write_cache", "CacheSource", "CACHE_DTYPES"]

MANIFEST = "manifest.json"
FORMAT_TAG = "featcircuits-activation-cache"
CACHE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_cache_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    manifest = read_json(Path(path) / MANIFEST)
    if manifest.get("format") != FORMAT_TAG:
        raise ValueError(f"{path}/{MANIFEST} is not a featcircuits activation cache manifest.")
    return manifest


def check_cache_matches(manifest: dict[str, Any], path: str | Path, hooks: list[str], model_name: str = "") -> None:
    """Raise naming the mismatch when the cache lacks a hook or was written for another model."""
    missing = [hook for hook in hooks if hook not in manifest["hooks"]]
    if missing:
        raise ValueError(
            f"Activation cache {path} holds hooks {sorted(manifest['hooks'])}, not {missing}: it was written for "
            "other hooks. Write a cache for these hooks with `featcircuits cache`, or train on the cached hooks."
        )
    if model_name and manifest.get("model_name") and manifest["model_name"] != model_name:
        raise ValueError(
            f"Activation cache {path} was written for model {manifest['model_name']!r}, not {model_name!r}. "
            "Use a cache of this model's activations (or drop the model from the config)."
        )
    if not manifest.get("shards"):
        raise ValueError(f"Activation cache {path} has no complete shard yet; run `featcircuits cache` to fill it.")


def _clear_unlisted(out: Path, manifest: dict[str, Any]) -> None:
    """Remove what a killed run left beside the listed shards: temporary files and shards written after
    the manifest's last update (they are rewritten, from the same rows, by the resumed run)."""
    listed = {shard["file"] for shard in manifest["shards"]}
    for entry in out.glob(".shard_*.tmp"):
        entry.unlink(missing_ok=True)
    for entry in out.glob("shard_*.safetensors"):
        if entry.name not in listed:
            entry.unlink(missing_ok=True)


@torch.no_grad()
def write_cache(
    source: Any,
    out: str | Path,
    hooks: list[str],
    widths: dict[str, int],
    n_sequences: int | None,
    dtype: str = "float32",
    rows_per_shard: int = 65536,
    metadata: dict[str, Any] | None = None,
    max_queued: int = 2,
) -> dict[str, Any]:
    """Write activations from ``source`` (a ``ModelSource`` or ``StreamSource`` reading rows in order) into ``out``.

    ``n_sequences``: rows to cache; None: until the source returns an empty chunk (its stream ended).
    A shard closes at the first chunk boundary at or past ``rows_per_shard`` rows (so every shard ends on
    a whole sequence and a resumed run restarts at a sequence). Finished shards are written by a
    background thread; at most ``max_queued`` wait for the disk before the model waits for it.

    ``metadata`` (model_name, model_path, dataset, context_size, ...) must match an existing partial cache
    in ``out``, which is then resumed from its last complete shard.

    Returns the manifest, plus ``"reused": True`` when the cache was already complete, or else
    ``"writer"``: bytes written, seconds the writer thread spent writing and seconds the model waited for it.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"Cache dtype {dtype!r}; choose one of {sorted(CACHE_DTYPES)}.")
    out = Path(out)
    metadata = dict(metadata or {})
    header = {"format": FORMAT_TAG, "version": 1, "hooks": widths, "dtype": dtype, **metadata}
    if is_cache_dir(out):
        manifest = read_manifest(out)
        differing = [key for key in header if key != "version" and manifest.get(key) != header[key]]
        if differing:
            raise ValueError(
                f"{out} already holds a cache written with different settings ({differing}); "
                "choose another output directory or delete this one."
            )
    else:
        manifest = {**header, "shards": [], "sequences_done": 0, "total_sequences": n_sequences, "complete": False}
    if manifest.get("complete"):
        if n_sequences is not None and manifest.get("total_sequences") != n_sequences:
            raise ValueError(
                f"{out} already holds a complete cache of {manifest.get('total_sequences')} sequences, but this run "
                f"asks for {n_sequences}; a cache is reused only for the same size. Choose another output directory "
                "or delete this one.")
        return {**manifest, "reused": True}  # the same settings and size: nothing to write
    out.mkdir(parents=True, exist_ok=True)
    _clear_unlisted(out, manifest)
    source.position = manifest["sequences_done"]  # resume: skip sequences already in complete shards
    cache_dtype = CACHE_DTYPES[dtype]
    next_index = len(manifest["shards"])
    writer = ShardWriter(out, manifest, max_queued)  # from here on the writer thread owns ``manifest``
    try:
        pending: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
        n_pending, done = 0, False
        while not done:
            more = n_sequences is None or source.position < n_sequences
            chunk = source.next_chunk() if more else {}
            if chunk:
                for hook in hooks:
                    # convert where the rows are (half the bytes to move for 16-bit caches), then to the CPU
                    pending[hook].append(chunk[hook].to(cache_dtype).to("cpu"))
                n_pending += len(chunk[hooks[0]])
            done = not chunk or (n_sequences is not None and source.position >= n_sequences)
            if n_pending and (n_pending >= rows_per_shard or done):
                writer.submit(f"shard_{next_index:05d}.safetensors", pending, n_pending, source.position)
                next_index += 1
                pending = {hook: [] for hook in hooks}
                n_pending = 0
    except BaseException:
        # The model, the data or the user stopped the run: still finish the shards already handed over
        # (they are complete), so the next run resumes after them; the writer's own failure is already raised.
        with contextlib.suppress(OSError):
            writer.close()
        raise
    writer.close()
    manifest["total_sequences"] = manifest["sequences_done"] if n_sequences is None else n_sequences
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    stats = {"bytes": writer.bytes_written, "write_seconds": writer.write_seconds, "wait_seconds": writer.wait_seconds}
    return {**manifest, "writer": stats}


def _generator(*salts: int) -> torch.Generator:
    seed = 0
    for salt in salts:
        seed = (seed * 1_000_003 + salt) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def _read_into(read: tuple[Any, str, int, torch.Tensor]) -> None:
    shard, hook, start, out = read
    shard.read_rows(hook, start, out)


def _read_chunks(root: Path, manifest: dict[str, Any], widths: dict[str, int], blocks: torch.Tensor,
                 blocks_per_chunk: int, seed: int, epoch: int, position: int, io_threads: int = 1
                 ) -> Generator[tuple[int, int, dict[str, torch.Tensor]], None, None]:
    """From ``(epoch, position)`` on, forever: ``(epoch, position after the chunk, {hook: [rows, d_hook]})``.

    ``blocks [n_blocks, 3]``: ``(shard index, first row, end row)``. An epoch visits every block once, in a
    seeded order; a chunk is the next ``blocks_per_chunk`` blocks of that order, each block's rows in file
    order (the ActivationStore puts every row in a random slot and draws batches at random, so shuffling
    rows here too would only cost a pass over the bytes).
    A function of its arguments alone (no source object), so it can run in the read-ahead thread.
    """
    cache_dtype = CACHE_DTYPES[manifest["dtype"]]
    names = [shard["file"] for shard in manifest["shards"]]
    files = ShardFiles(root, manifest, widths, cache_dtype)
    # float32 rows are read straight into the chunk handed out; 16-bit rows into a scratch buffer reused
    # for every chunk, then converted into it. One pass over the bytes either way.
    most_rows = int((blocks[:, 2] - blocks[:, 1]).max()) * blocks_per_chunk
    scratch = None if cache_dtype == torch.float32 else {
        hook: torch.empty(most_rows, width, dtype=cache_dtype) for hook, width in widths.items()}
    pool = ThreadPoolExecutor(io_threads, thread_name_prefix="featcircuits-cache-io") if io_threads > 1 else None
    try:
        while True:
            order = torch.randperm(len(blocks), generator=_generator(seed, epoch))
            while position < len(blocks):
                picked = order[position : position + blocks_per_chunk]
                position += len(picked)
                spans = blocks[picked].tolist()
                n_rows = sum(end - start for _, start, end in spans)
                chunk = {hook: torch.empty(n_rows, width) for hook, width in widths.items()}
                landing = chunk if scratch is None else scratch
                reads, offset = [], 0
                for shard_index, start, end in spans:
                    shard = files.get(names[shard_index])
                    reads += [(shard, hook, start, landing[hook][offset : offset + end - start]) for hook in widths]
                    offset += end - start
                if pool is None:
                    for read in reads:
                        _read_into(read)
                else:  # several reads in flight: a disk (or a virtual disk) serves random blocks much faster so
                    list(pool.map(_read_into, reads))
                if scratch is not None:
                    for hook in widths:
                        chunk[hook].copy_(scratch[hook][:n_rows])
                yield epoch, position, chunk
            epoch, position = epoch + 1, 0
    finally:
        if pool is not None:
            pool.shutdown()
        files.close()


class CacheSource:
    """Streams row chunks from a cache: blocks of rows from across all shards, in a seeded order per epoch.

    Meant to feed an ``ActivationStore`` (which shuffles rows): within a block, rows keep their file order.

    Args:
        path: the cache directory.
        hooks: hooks to read (all in the cache).
        seed: seed of the block order (a new order every epoch).
        model_name: refuse a cache written for another model (when given).
        block_rows: contiguous rows read at once; default about 1 MiB per hook (at most ``chunk_rows``).
        chunk_rows: rows per chunk (rounded to whole blocks); default about 32 MiB of float32 rows.
        read_ahead: chunks read ahead in a background thread (0: read in the caller's thread).
        io_threads: block reads in flight at once (1: one after the other).

    ``state_dict``: epoch and blocks served in it (chunks read ahead but not served do not count), so a
    resumed run continues with the chunk that was next.
    """

    def __init__(self, path: str | Path, hooks: list[str], seed: int = 0, model_name: str = "",
                 block_rows: int | None = None, chunk_rows: int | None = None, read_ahead: int = 2,
                 io_threads: int = 4) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_cache_matches(self.manifest, self.path, hooks, model_name)
        self.hooks = list(dict.fromkeys(hooks))
        self.seed = seed
        self.epoch, self.position = 0, 0
        self.total_rows = sum(shard["rows"] for shard in self.manifest["shards"])
        element = CACHE_DTYPES[self.manifest["dtype"]].itemsize
        widths = self.widths()
        if chunk_rows is None:
            chunk_rows = max(1, 2**25 // (4 * sum(widths.values())))
        if block_rows is None:  # long enough runs for the disk's full speed, and no longer than a chunk
            block_rows = min(chunk_rows, max(64, math.ceil(2**20 / (element * max(widths.values())))))
        if block_rows < 1 or chunk_rows < 1 or io_threads < 1 or read_ahead < 0:
            raise ValueError(f"block_rows={block_rows}, chunk_rows={chunk_rows} and io_threads={io_threads} must be "
                             f"positive and read_ahead={read_ahead} not negative.")
        self.block_rows, self.blocks_per_chunk = block_rows, max(1, chunk_rows // block_rows)
        # blocks [n_blocks, 3]: (shard index, first row, end row), built without a Python object per block
        shard_rows = torch.tensor([int(shard["rows"]) for shard in self.manifest["shards"]], dtype=torch.long)
        counts = (shard_rows + block_rows - 1) // block_rows
        shard_index = torch.repeat_interleave(torch.arange(len(shard_rows)), counts)
        first_block = torch.cumsum(counts, 0) - counts
        start = (torch.arange(int(counts.sum())) - first_block[shard_index]) * block_rows
        self.blocks = torch.stack([shard_index, start, torch.minimum(start + block_rows, shard_rows[shard_index])], 1)
        self.read_ahead, self.io_threads = read_ahead, io_threads
        self._reader: ReadAhead | None = None
        self._chunks: Generator[tuple[int, int, dict[str, torch.Tensor]], None, None] | None = None

    def widths(self) -> dict[str, int]:
        return {hook: int(self.manifest["hooks"][hook]) for hook in self.hooks}

    def _produce(self) -> functools.partial[Generator[tuple[int, int, dict[str, torch.Tensor]], None, None]]:
        # The chunk iterator from the current position, holding no reference to ``self`` (a thread may run it).
        return functools.partial(_read_chunks, self.path, self.manifest, self.widths(), self.blocks,
                                 self.blocks_per_chunk, self.seed, self.epoch, self.position, self.io_threads)

    def next_chunk(self) -> dict[str, torch.Tensor]:
        """The next ``{hook: [rows, d_hook]}`` (float32, CPU), rows from up to ``blocks_per_chunk`` shards."""
        if self.read_ahead:
            if self._reader is None:
                self._reader = ReadAhead(self._produce(), self.read_ahead)
            self.epoch, self.position, chunk = self._reader.get()
        else:
            if self._chunks is None:
                self._chunks = self._produce()()
            self.epoch, self.position, chunk = next(self._chunks)
        return chunk

    def close(self) -> None:
        """Stop reading ahead and close the shard files (a later ``next_chunk`` starts again)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._chunks is not None:
            self._chunks.close()
            self._chunks = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "block_rows": self.block_rows,
                "blocks_per_chunk": self.blocks_per_chunk}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        layout = (state.get("block_rows"), state.get("blocks_per_chunk"))
        if layout != (self.block_rows, self.blocks_per_chunk):
            raise ValueError(
                f"The checkpoint's cache position counts blocks of {layout[0]} rows, {layout[1]} per chunk, but "
                f"this reader uses {self.block_rows} and {self.blocks_per_chunk} (or the checkpoint is from a version "
                "that read whole shards); resume with the same cache reader settings, or start the run afresh.")
        self.close()
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
