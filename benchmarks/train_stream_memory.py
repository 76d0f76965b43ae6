"""Peak memory and time of a short training run against corpus size: memory must not grow with the corpus.

Generates text corpora of the given sizes by repeating ``../shared/data/tinystories/train_head.txt``, then runs
``featcircuits train`` on each (a fresh process; peak RSS of the child from ``getrusage``), the same 20,480
tokens every time. Prints one row per size and a last line ``rss_mb=<a>,<b>,... seconds=<x>,<y>,...``.

    python benchmarks/train_stream_memory.py --sizes-mb 20 200 2000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260k"
TEXT = ROOT.parent / "shared" / "data" / "tinystories" / "train_head.txt"


def make_corpus(path: Path, size: int) -> None:
    piece = TEXT.read_bytes()
    with path.open("wb") as file:
        written = 0
        while written < size:
            chunk = piece[: size - written]
            file.write(chunk)
            written += len(chunk)


def run(corpus: Path, out: Path, tokens: int) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "featcircuits.cli", "train", "--model", str(STORIES),
                    "--hook", "blocks.1.ln2.hook_normalized", "--hook-out", "blocks.1.hook_mlp_out",
                    "--architecture", "topk", "--k", "8", "--d-sae", "128", "--tokens", str(tokens),
                    "--batch-size", "512", "--dataset", str(corpus), "--out", str(out), "--no-progress"],
                   check=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KB on Linux; the largest child so far
    return seconds, max(peak, before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--tokens", type=int, default=20480)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        # smallest first: getrusage reports the largest child so far, so a growing figure would show
        for size_mb in sorted(args.sizes_mb):
            corpus = Path(folder) / f"corpus_{size_mb:g}mb.txt"
            make_corpus(corpus, int(size_mb * 1e6))
            seconds, rss = run(corpus, Path(folder) / f"out_{size_mb:g}", args.tokens)
            corpus.unlink()
            rows.append((size_mb, seconds, rss))
            print(f"corpus {size_mb:>7g} MB: {seconds:6.1f} s, peak RSS so far {rss:7.0f} MB", flush=True)
    print(f"load={os.getloadavg()[0]:.2f} rss_mb={','.join(f'{r:.0f}' for _, _, r in rows)} "
          f"seconds={','.join(f'{s:.1f}' for _, s, _ in rows)}")


if __name__ == "__main__":
    main()
