"""Activation-cache write and read throughput beside the disk's own ``dd`` figures, and peak RSS per cache size.

For each size, a fresh process writes a cache of that many bytes through ``write_cache`` (the background
shard writer) from a stand-in model that hands over ready rows at once (so the figure is the cache's, not a
model's), then all shards are flushed with ``fdatasync`` (``write_synced`` counts that time, as
``dd conv=fdatasync`` does). The shards are then evicted from the page cache (``posix_fadvise DONTNEED``
after the flush; ``fincore`` reports what stayed resident) and another fresh process reads one full epoch
through ``CacheSource`` as training does (blocks from across all shards, shuffled rows, float32 out).
Peak RSS is each child's own (``getrusage``), so flat figures across sizes mean memory does not grow with
the cache: the writer holds at most ``max_queued + 2`` shards (queued, being written, being handed over),
which a run reaches once the disk is slower than the source. Before each cache size, ``dd`` writes a file of that size with ``conv=fdatasync`` and reads it
back after the same eviction (beside each other, as the disk is shared and its speed varies).

The disk is whatever ``--dir`` lies on; on a virtual machine the host may cache below the guest, which
no eviction inside the guest can see: read the figures as this machine's, beside its own ``dd``.

    python benchmarks/cache_throughput.py                      # 0.5, 2 and 8 GB caches
    python benchmarks/cache_throughput.py --sizes-gb 0.1 0.4   # quick

Last line: ``write_gbps=<a>,... read_gbps=<b>,... dd_write_gbps=<c>,... dd_read_gbps=<d>,... rss_write_mb=...
rss_read_mb=... load=<1-min load average>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def evict(paths: list[Path]) -> None:
    """Flush each file and drop its pages from the page cache (only clean pages can be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_mb(paths: list[Path]) -> float | None:
    """MB of ``paths`` still in the page cache, from util-linux ``fincore``; None when it is not installed."""
    if not shutil.which("fincore") or not paths:
        return None
    result = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                            capture_output=True, text=True)
    if result.returncode:
        return None
    return sum(int(value) for value in result.stdout.split()) / 1e6


def dd_figures(folder: Path, size_mb: int) -> tuple[float, float, float | None]:
    """``(write GB/s with conv=fdatasync, read GB/s after eviction, MB resident before the read)``."""
    target = folder / "dd.bin"
    write = subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={size_mb}", "conv=fdatasync"],
                           capture_output=True, text=True, check=True)
    evict([target])
    resident = resident_mb([target])
    read = subprocess.run(["dd", f"if={target}", "of=/dev/null", "bs=1M"], capture_output=True, text=True, check=True)
    target.unlink()
    return _dd_rate(write.stderr), _dd_rate(read.stderr), resident


def _dd_rate(stderr: str) -> float:
    match = re.search(r"^(\d+) bytes.*copied, ([\d.,]+) s", stderr, re.MULTILINE)
    if not match:
        raise RuntimeError(f"could not read dd's output: {stderr!r}")
    return int(match.group(1)) / float(match.group(2).replace(",", ".")) / 1e9


def child_write(out: Path, size_bytes: int, width: int, n_hooks: int, dtype: str, rows_per_shard: int) -> dict:
    import torch

    from featcircuits.training.cache import CACHE_DTYPES, write_cache

    hooks = [f"blocks.{index}.hook_resid_post" for index in range(n_hooks)]
    chunk_rows = 4096  # what one model forward of 32 sequences x 128 tokens hands over
    row_bytes = width * n_hooks * CACHE_DTYPES[dtype].itemsize
    n_chunks = max(1, size_bytes // (row_bytes * chunk_rows))
    pool = {hook: torch.randn(chunk_rows * 4, width).to(CACHE_DTYPES[dtype]) for hook in hooks}

    class ReadyRows:
        """Hands over rows at once, so the cache's own speed is measured, not a model's: a fresh copy each
        time, as a model's forward hands over new tensors (so RSS counts the shards being gathered)."""

        position = 0

        def next_chunk(self) -> dict:
            start = (self.position % 4) * chunk_rows
            self.position += 1
            return {hook: rows[start : start + chunk_rows].clone() for hook, rows in pool.items()}

    started = time.perf_counter()
    manifest = write_cache(ReadyRows(), out, hooks, {hook: width for hook in hooks}, n_chunks, dtype=dtype,
                           rows_per_shard=rows_per_shard)
    written = time.perf_counter() - started
    shards = [out / shard["file"] for shard in manifest["shards"]]
    evict(shards)  # fdatasync, as dd's conv=fdatasync, then drop the pages for the cold read
    synced = time.perf_counter() - started
    return {"bytes": sum(path.stat().st_size for path in shards), "seconds_buffered": written,
            "seconds_synced": synced, "shards": len(shards), "wait_seconds": manifest["writer"]["wait_seconds"],
            "writer_seconds": manifest["writer"]["write_seconds"],
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "hooks": hooks}


def child_read(out: Path, hooks: list[str]) -> dict:
    from featcircuits.training.cache import CacheSource

    source = CacheSource(out, hooks, seed=0)
    started = time.perf_counter()
    rows = 0
    while rows < source.total_rows:
        rows += len(source.next_chunk()[hooks[0]])
    seconds = time.perf_counter() - started
    source.close()
    return {"seconds": seconds, "rows": rows, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _mb(value: float | None) -> str:
    return "?" if value is None else f"{value:.0f}"


def run_child(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"})
    if result.returncode:
        raise RuntimeError(f"child {args[0]} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--sizes-gb", type=float, nargs="+", default=[0.5, 2.0, 8.0])
    parser.add_argument("--width", type=int, default=768, help="d_hook (GPT-2 small's d_model)")
    parser.add_argument("--hooks", type=int, default=2, help="hooks per row (a transcoder's input and output)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--rows-per-shard", type=int, default=16384, help="about 100 MB shards at the default width")
    parser.add_argument("--dir", default="", help="where to write (default: a temporary folder); its disk is measured")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, out, *rest = args.child
        if kind == "write":
            result = child_write(Path(out), int(rest[0]), args.width, args.hooks, args.dtype, args.rows_per_shard)
        else:
            result = child_read(Path(out), rest)
        print(json.dumps(result))
        return

    folder = Path(tempfile.mkdtemp(prefix="fc-cache-bench-", dir=args.dir or None))
    try:
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
        print(f"settings: width={args.width} hooks={args.hooks} dtype={args.dtype} rows_per_shard={args.rows_per_shard} "
              f"dir={folder} (filesystem {shutil.disk_usage(folder).free / 1e9:.0f} GB free)")
        rows = []
        for size_gb in args.sizes_gb:
            # dd right beside each cache run, same size: the disk is shared, so each pair meets the same load
            dd_write, dd_read, dd_resident = dd_figures(folder, max(1, int(size_gb * 1000)))
            out = folder / f"cache_{size_gb:g}gb"
            written = run_child("write", str(out), str(int(size_gb * 1e9)))
            shards = sorted(out.glob("shard_*.safetensors"))
            resident = resident_mb(shards)
            read = run_child("read", str(out), *written["hooks"])
            shutil.rmtree(out)
            gb = written["bytes"] / 1e9
            row = {"gb": gb, "write_buffered": gb / written["seconds_buffered"], "write": gb / written["seconds_synced"],
                   "read": gb / read["seconds"], "rss_write": written["rss_mb"], "rss_read": read["rss_mb"],
                   "wait": written["wait_seconds"], "resident": resident, "shards": written["shards"],
                   "dd_write": dd_write, "dd_read": dd_read, "writer": gb / written["writer_seconds"]}
            rows.append(row)
            print(f"cache {gb:6.2f} GB in {row['shards']:4d} shards: write {row['write']:.2f} GB/s synced "
                  f"({row['write_buffered']:.2f} before the flush; writer thread {row['writer']:.2f} while busy; the source "
                  f"waited {row['wait']:.1f} s for it) beside dd "
                  f"{dd_write:.2f}; read {row['read']:.2f} GB/s beside dd {dd_read:.2f} (MB resident before the reads: "
                  f"cache {_mb(resident)}, dd {_mb(dd_resident)}); peak RSS write {row['rss_write']:.0f} MB, read "
                  f"{row['rss_read']:.0f} MB; load {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def joined(key: str, digits: int) -> str:
        return ",".join(f"{row[key]:.{digits}f}" for row in rows)

    print(f"write_gbps={joined('write', 2)} read_gbps={joined('read', 2)} dd_write_gbps={joined('dd_write', 2)} "
          f"dd_read_gbps={joined('dd_read', 2)} rss_write_mb={joined('rss_write', 0)} "
          f"rss_read_mb={joined('rss_read', 0)} load={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
