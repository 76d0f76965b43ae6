"""Reading and writing dictionaries in every supported layout, with the layout detected on read.

Each format is a module with ``detect(path) -> bool``, ``load(path, device) -> list[Dictionary]`` and
``save(dictionaries, path)``, registered in ``FORMATS``. Adding a format is one small module here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from ..base import Dictionary
from . import circuit_tracer, native, saelens, sparsify

__all__ = ["FORMATS", "register_format", "detect_format", "load_dictionary", "load_dictionaries", "save_dictionary"]

# Detection tries these in order; each looks for its own file names (cfg.json + which weights file).
FORMATS: dict[str, ModuleType] = {
    "native": native,
    "saelens": saelens,
    "sparsify": sparsify,
    "circuit_tracer": circuit_tracer,
}


def register_format(name: str, module: ModuleType) -> None:
    FORMATS[name] = module


def detect_format(path: str | Path) -> str:
    """Name of the format stored in directory ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No dictionary at {path}: the path does not exist.")
    for name, module in FORMATS.items():
        if module.detect(path):
            return name
    raise ValueError(
        f"{path} holds no dictionary in a known format ({sorted(FORMATS)}); found {sorted(p.name for p in path.iterdir())[:10] if path.is_dir() else 'a file'}. "
        "A dictionary directory has cfg.json + weights (native, SAELens, sparsify) or config.yaml (circuit-tracer)."
    )


def load_dictionaries(path: str | Path, device: str | torch.device = "cpu", format: str | None = None) -> list[Dictionary]:
    """All dictionaries in the local files under ``path``.

    ``path`` is one format directory (or file), a directory of such directories (one dictionary per
    sub-directory, as ``featcircuits train --out`` writes), or a directory of training runs (per-layer runs
    trained separately: ``tc/layer0/<hook>/...``), searched up to three levels down. Releases on the Hub are
    loaded by :func:`featcircuits.load_dictionaries`, which also takes a release name.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No dictionary at {path}: the path does not exist.")
    if format is not None:
        return FORMATS[format].load(path, device=device)
    found = _search(path, device, depth=3)
    if found is None:
        detect_format(path)  # raises, naming what is there and what each format expects
    return found or []


def _search(path: Path, device: str | torch.device, depth: int) -> list[Dictionary] | None:
    """Dictionaries at ``path`` or, if it holds none in a known format, in its sub-directories (sorted;
    checkpoint directories skipped); None when there are none within ``depth`` levels."""
    try:
        return FORMATS[detect_format(path)].load(path, device=device)
    except ValueError as err:
        if "no dictionary in a known format" not in str(err):
            raise
        if depth == 0 or not path.is_dir():
            return None
    found: list[Dictionary] | None = None
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "checkpoint"):
        inside = _search(sub, device, depth - 1)
        if inside is not None:
            found = (found or []) + inside
    return found


def load_dictionary(path: str | Path, device: str | torch.device = "cpu", format: str | None = None) -> Dictionary:
    """The one dictionary stored at ``path``."""
    dictionaries = load_dictionaries(path, device=device, format=format)
    if len(dictionaries) != 1:
        raise ValueError(f"{path} holds {len(dictionaries)} dictionaries; use load_dictionaries to read them all.")
    return dictionaries[0]


def save_dictionary(dictionary: Dictionary | list[Dictionary], path: str | Path, format: str = "native") -> None:
    """Write one dictionary (or, for multi-dictionary formats such as circuit-tracer, a list)."""
    format = format.replace("-", "_")  # "circuit-tracer" as on the command line
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; known: {sorted(FORMATS)}.")
    dictionaries = dictionary if isinstance(dictionary, list) else [dictionary]
    FORMATS[format].save(dictionaries, Path(path))
