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


def load_dictionaries(path: str | Path, device: str | torch.device = "cpu", format: str | None = None,
                      revision: str | None = None) -> list[Dictionary]:
    """All dictionaries under ``path``: one format directory, or a directory of such sub-directories.

    ``path`` may also name a pretrained release (e.g. ``"gpt2-small-res-jb"``), fetched through the
    Hugging Face Hub cache at ``revision``.
    """
    if isinstance(path, str) and "/" not in path and not path.startswith((".", "~")) and not Path(path).exists():
        from ...hub.loading import load_release
        from ...hub.registry import UnknownReleaseError

        try:
            return load_release(path, revision=revision, device=device)
        except UnknownReleaseError as err:
            raise FileNotFoundError(f"No dictionary at {path}: the path does not exist, nor is it a release. {err}") from None
    path = Path(path)
    if format is None:
        try:
            format = detect_format(path)
        except ValueError:
            subdirs = sorted(p for p in path.iterdir() if p.is_dir()) if path.is_dir() else []
            found = [d for sub in subdirs for d in _try_load(sub, device)]
            if not found:
                raise
            return found
    return FORMATS[format].load(path, device=device)


def _try_load(path: Path, device: str | torch.device) -> list[Dictionary]:
    try:
        return FORMATS[detect_format(path)].load(path, device=device)
    except ValueError as err:
        if "no dictionary in a known format" in str(err):
            return []
        raise


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
