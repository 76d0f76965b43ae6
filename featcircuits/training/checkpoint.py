"""Atomic training checkpoints: ``OUT/checkpoint/rank{r}.pt``, written to a temporary file then renamed.

A checkpoint holds every dictionary's weights and optimiser state, the step, the activation stream
(buffer, permutation, data position) and the RNG states, so a resumed run continues bit-for-bit.
It holds only tensors, numbers, strings and plain containers, and is read with ``weights_only=True``:
loading a checkpoint never runs code, whoever wrote the file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..dictionaries.io.common import atomic_path
from .config import TrainConfig

__all__ = ["checkpoint_path", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


def checkpoint_path(out: str | Path, rank: int = 0) -> Path:
    return Path(out) / "checkpoint" / f"rank{rank}.pt"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())


def load_checkpoint(path: Path, config: TrainConfig) -> dict[str, Any]:
    """Read a checkpoint and check it was written by a run of the same configuration."""
    if not path.exists():
        raise FileNotFoundError(
            f"--resume: no checkpoint at {path}. Resume needs an output directory of a run with "
            "checkpoint_every > 0 that wrote at least one checkpoint."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"Checkpoint {path} holds objects other than tensors, numbers, strings and containers "
            f"({str(err).splitlines()[0][:200]}): featcircuits checkpoints never do, and unpickling them could run "
            "code, so it was not loaded. Delete the checkpoint directory (or choose a new --out) and train afresh."
        ) from None
    except Exception as err:  # a truncated file raises several different errors inside torch.load
        raise ValueError(f"Checkpoint {path} is unreadable ({err}); it is corrupt or truncated.") from None
    if not isinstance(state, dict):
        raise ValueError(f"Checkpoint {path} holds a {type(state).__name__}, not a featcircuits checkpoint.")
    saved = state.get("fingerprint", {})
    current = config.resume_fingerprint()
    differing = sorted(key for key in set(current) | set(saved) if saved.get(key) != current.get(key))
    if differing:
        details = ", ".join(f"{key}: checkpoint {saved.get(key)!r} vs now {current.get(key)!r}" for key in differing)
        raise ValueError(
            f"--resume: the checkpoint in {path.parent.parent} was written by a different configuration ({details}). "
            "Resume with the original configuration, or train into a new output directory."
        )
    return state
