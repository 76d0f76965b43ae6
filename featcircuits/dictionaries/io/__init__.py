"""Reading and writing dictionaries in every supported layout, with the layout detected on read.

Each format is a module with ``detect(path) -> bool``, ``load(path, device) -> list[Dictionary]`` and
``save(dictionaries, path)``, registered in ``FORMATS``. Adding a format is one small module here.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch

from ..base import Dictionary
from . import circuit_tracer, circuit_tracer_clt, native, saelens, sparsify
from .common import read_json, unfinished_save_of

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
        leftovers = sorted(p.name for p in path.parent.glob(f".{path.name}.*") if unfinished_save_of(p))
        hint = (f" {path.parent} holds {leftovers}, left by a save of it that was interrupted; rename the "
                f".old-* one back to {path.name!r} or save the dictionary again.") if leftovers else ""
        raise FileNotFoundError(f"No dictionary at {path}: the path does not exist.{hint}")
    if format is not None:
        return FORMATS[format].load(path, device=device)
    found = _search(path, device, depth=3)
    if found is None:
        detect_format(path)  # raises, naming what is there and what each format expects
    return found or []


def _search(path: Path, device: str | torch.device, depth: int) -> list[Dictionary] | None:
    """Dictionaries at ``path`` or, if it holds none in a known format, in its sub-directories (sorted;
    checkpoint directories skipped); None when there are none within ``depth`` levels.

    A set loads whole or not at all: a directory that holds dictionary files but no complete dictionary
    (a config without its weights, a config lacking its format, an interrupted save) is an error naming
    it, never skipped, so that a graph cannot silently run on four of five transcoders.
    """
    try:
        return FORMATS[detect_format(path)].load(path, device=device)
    except ValueError as err:
        if "no dictionary in a known format" not in str(err):
            raise
        if not path.is_dir():
            return None
    _reject_incomplete(path)
    if depth == 0:
        return None
    found: list[Dictionary] | None = None
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and p.name != "checkpoint"):
        if (unfinished := unfinished_save_of(sub)) is not None:
            _reject_unfinished(sub, *unfinished)
            continue
        inside = _search(sub, device, depth - 1)
        if inside is not None:
            found = (found or []) + inside
    return found


# File names only dictionaries have: a directory holding one is meant to be a dictionary.
_WEIGHTS_FILES = (native.WEIGHTS_FILE, saelens.WEIGHTS_FILE, sparsify.WEIGHTS_FILE)
_DICTIONARY_FILES = (native.CONFIG_FILE, *_WEIGHTS_FILES)


def _reject_incomplete(path: Path) -> None:
    """Raise when ``path`` (in no known format) holds files of a dictionary, naming what is wrong."""
    names = {p.name for p in path.iterdir() if p.is_file()}
    half_written = sorted(n for n in names if n.endswith(".tmp") and n.startswith(tuple(f".{f}." for f in _DICTIONARY_FILES)))
    layers = sorted(n for n in names if circuit_tracer._LAYER_FILE.match(n) or circuit_tracer_clt.is_layer_file(n))
    weights = [n for n in _WEIGHTS_FILES if n in names]
    if half_written:
        problem = f"{half_written} are temporary files of a write that never finished"
    elif native.CONFIG_FILE in names and not weights:
        problem = f"{native.CONFIG_FILE} has no weights file beside it (one of {list(_WEIGHTS_FILES)})"
    elif weights and native.CONFIG_FILE not in names:
        problem = f"{weights[0]} has no {native.CONFIG_FILE} beside it to say what it computes"
    elif weights:  # cfg.json with a weights file that does not match it
        keys = sorted(read_json(path / native.CONFIG_FILE))
        problem = (f"{native.CONFIG_FILE} lacks \"format\": \"{native.FORMAT_TAG}\" that a featcircuits "
                   f"{native.WEIGHTS_FILE} needs (its keys: {keys[:12]})") if native.WEIGHTS_FILE in weights \
            else f"its {native.CONFIG_FILE} and {weights[0]} belong to no known format"
    elif layers:
        problem = f"{layers[:3]} have no circuit-tracer {circuit_tracer.CONFIG_FILE} beside them"
    else:
        return
    raise ValueError(
        f"{path} holds dictionary files but no complete dictionary: {problem}. Save that dictionary again or "
        "move the directory out; a directory of dictionaries loads whole, so that nothing runs on part of a set."
    )


def _reject_unfinished(entry: Path, name: str, stage: str) -> None:
    """An interrupted :class:`~.common.atomic_directory` save beside ``name``: an error, unless it is only the
    previous version of a directory whose replacement finished (then ``entry`` is left for the user)."""
    target = entry.parent / name
    if stage == "old" and target.is_dir():
        return
    state = ("holds the previous version" if target.is_dir() else "is missing") if stage == "tmp" else "is missing"
    fix = (f"Delete {entry.name} and save {name} again" if stage == "tmp"
           else f"Rename {entry.name} back to {name}, or save {name} again")
    raise ValueError(f"{entry} was left by an interrupted save of {target}, which {state}: the set is not the one "
                     f"that was being written. {fix}.")


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
