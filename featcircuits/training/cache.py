"""Activation cache on disk: safetensors shards of chosen hooks plus a ``manifest.json``.

Each shard holds one tensor per hook, ``[rows, d_hook]``, row-aligned across hooks (so a transcoder's
input and output rows stay paired). Shards are written atomically and the manifest is rewritten after
each one, so an interrupted ``featcircuits cache`` resumes at the first missing shard. Training reads
shards in a seeded random order and shuffles rows within and (through the ActivationStore buffer)
across shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..dictionaries.io.common import read_json, write_json, write_tensors

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
) -> dict[str, Any]:
    """Write activations from ``source`` (a ``ModelSource`` or ``StreamSource`` reading rows in order) into ``out``.

    ``n_sequences``: rows to cache; None: until the source returns an empty chunk (its stream ended).

    ``metadata`` (model_name, model_path, dataset, context_size, ...) must match an existing partial cache
    in ``out``, which is then resumed from its last complete shard.
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
    source.position = manifest["sequences_done"]  # resume: skip sequences already in complete shards
    pending: dict[str, list[torch.Tensor]] = {hook: [] for hook in hooks}
    n_pending, done = 0, False
    while not done:
        more = n_sequences is None or source.position < n_sequences
        chunk = source.next_chunk() if more else {}
        if chunk:
            for hook in hooks:
                pending[hook].append(chunk[hook].to("cpu", CACHE_DTYPES[dtype]))
            n_pending += len(chunk[hooks[0]])
        done = not chunk or (n_sequences is not None and source.position >= n_sequences)
        if n_pending and (n_pending >= rows_per_shard or done):
            name = f"shard_{len(manifest['shards']):05d}.safetensors"
            write_tensors(out / name, {hook: torch.cat(parts) for hook, parts in pending.items()})
            manifest["shards"].append({"file": name, "rows": n_pending})
            manifest["sequences_done"] = source.position
            write_json(out / MANIFEST, manifest)
            pending = {hook: [] for hook in hooks}
            n_pending = 0
    manifest["total_sequences"] = manifest["sequences_done"] if n_sequences is None else n_sequences
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    return manifest


class CacheSource:
    """Streams row chunks from a cache: shards in a seeded random order per epoch, rows shuffled in each."""

    def __init__(self, path: str | Path, hooks: list[str], seed: int = 0, model_name: str = "") -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        check_cache_matches(self.manifest, self.path, hooks, model_name)
        self.hooks = list(dict.fromkeys(hooks))
        self.seed = seed
        self.epoch, self.position = 0, 0
        self.total_rows = sum(shard["rows"] for shard in self.manifest["shards"])

    def widths(self) -> dict[str, int]:
        return {hook: int(self.manifest["hooks"][hook]) for hook in self.hooks}

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 100_003 + self.epoch * 1_009 + salt)

    def _order(self) -> torch.Tensor:
        return torch.randperm(len(self.manifest["shards"]), generator=self._generator(0))

    def next_chunk(self) -> dict[str, torch.Tensor]:
        if self.position >= len(self.manifest["shards"]):
            self.epoch, self.position = self.epoch + 1, 0
        shard_index = int(self._order()[self.position])
        shard = self.manifest["shards"][shard_index]
        self.position += 1
        file = self.path / shard["file"]
        try:
            tensors = load_file(str(file))
        except FileNotFoundError:
            raise FileNotFoundError(f"Cache shard {file} listed in the manifest is missing.") from None
        except Exception as err:
            raise ValueError(f"Cache shard {file} is unreadable ({err}); rewrite the cache.") from None
        permutation = torch.randperm(shard["rows"], generator=self._generator(1 + shard_index))
        return {hook: tensors[hook][permutation].float() for hook in self.hooks}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
