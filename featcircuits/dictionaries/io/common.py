"""Checked tensor reading and atomic writing shared by every file format."""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["read_tensors", "write_tensors", "write_json", "read_json", "atomic_path", "atomic_directory", "write_layer_files",
           "check_finite", "unfinished_save_of", "DICTIONARY_NONFINITE_FIX"]


class atomic_path:
    """Context manager yielding a temporary path next to ``path``; renamed onto it only on success.

    A crash or an exception leaves the previous file untouched, never a half-written one.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self.tmp = Path(tmp)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            _default_permissions(self.tmp, directory=False)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


# The sibling directories atomic_directory works in: ``.<name>.tmp-<random>`` (being written) and
# ``.<name>.old-<random>`` (the previous version, about to be deleted). Loaders that meet one know a save
# was interrupted there.
_UNFINISHED = re.compile(r"^\.(?P<name>.+)\.(?P<stage>tmp|old)-[A-Za-z0-9_]+$")


def unfinished_save_of(entry: Path) -> tuple[str, str] | None:
    """``(dictionary directory name, "tmp" | "old")`` when ``entry`` is a directory an interrupted
    :class:`atomic_directory` left behind, else None."""
    match = _UNFINISHED.match(entry.name)
    return (match.group("name"), match.group("stage")) if match and entry.is_dir() else None


def _default_permissions(path: Path, directory: bool) -> None:
    # mkstemp/mkdtemp make private entries (0600/0700); give them what any new file or directory gets
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)


class atomic_directory:
    """Context manager yielding a fresh temporary directory beside ``path``; on success it replaces
    ``path`` as a unit, so the files of one dictionary (weights and config) are always from one save.

    Entries of an existing ``path`` for which ``owned(name)`` is false (files of other tools, nested
    dictionaries) are moved into the new directory first, so nothing that is not being rewritten is lost.
    The old directory is renamed aside, the new one renamed in, the old one deleted: a crash at any point
    leaves ``path`` intact (old or new) or, in the instant between the two renames, both versions in the
    ``.<name>.tmp-*`` / ``.<name>.old-*`` siblings, which loaders report by name. On an exception the
    temporary directory is removed and ``path`` is untouched.
    """

    def __init__(self, path: str | Path, owned: Callable[[str], bool]) -> None:
        self.path = Path(path).resolve()  # a symlinked directory: replace its target, keep the link
        self.owned = owned

    def __enter__(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; a dictionary is saved as a directory. Choose another "
                             "path or move the file away (nothing was written).")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        _default_permissions(self.tmp, directory=True)
        if not self.path.exists():
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise
            return
        kept = [entry.name for entry in self.path.iterdir() if not self.owned(entry.name)]
        moved: list[str] = []
        old = self.path.parent / f".{self.path.name}.old-{secrets.token_hex(4)}"
        cwd = os.getcwd()
        try:
            for name in kept:
                os.rename(self.path / name, self.tmp / name)
                moved.append(name)
            os.rename(self.path, old)
            try:
                os.rename(self.tmp, self.path)
            except OSError:
                os.rename(old, self.path)
                raise
        except OSError:
            for name in moved:  # put back what was moved: the old directory is as it was
                os.rename(self.tmp / name, self.path / name)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if cwd == str(self.path) or cwd.startswith(str(self.path) + os.sep):
            os.chdir(cwd)  # the process was inside the old directory; follow the path to the new one
        shutil.rmtree(old, ignore_errors=True)


# A NaN weight makes every downstream number NaN (graphs, faithfulness) without failing anywhere: every
# dictionary reader refuses one.
DICTIONARY_NONFINITE_FIX = ("the dictionary diverged in training or the file is corrupt; retrain it (e.g. with a "
                            "lower learning rate) or use an intact copy.")


def check_finite(tensors: Mapping[str, torch.Tensor], where: str, fix: str) -> None:
    """Raise ``ValueError`` naming the first tensor of ``tensors`` holding NaN or infinity."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise ValueError(f"Tensor {name!r} in {where} holds {bad} NaN or infinite value(s) of {tensor.numel()}; "
                             f"{fix}")


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _strict_json_values(value: Any) -> Any:
    """``value`` with NaN and infinities (floats, numpy/torch scalars) replaced by None."""
    if isinstance(value, Mapping):
        return {key: _strict_json_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json_values(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if not isinstance(value, bool | int | str) and callable(getattr(value, "item", None)) \
            and getattr(value, "ndim", None) == 0:
        return _strict_json_values(value.item())  # numpy or torch scalar
    return value


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as strict JSON. A non-finite float is written as ``null`` (JSON has no NaN; Python's
    bare ``NaN`` makes the file unreadable to other JSON parsers): null means "no value", which is what a
    NaN metric is (e.g. CE recovered when zero ablation costs nothing)."""
    text = json.dumps(_strict_json_values(data), indent=2, default=str, allow_nan=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"Expected a config file at {path}; it does not exist.") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt or truncated.") from None


def read_tensors(
    path: str | Path,
    expected: Mapping[str, tuple[int, ...] | None],
    optional: Mapping[str, tuple[int, ...] | None] | None = None,
    device: str | torch.device = "cpu",
    aliases: Mapping[str, str] | None = None,
    nonfinite_fix: str | None = None,
) -> dict[str, torch.Tensor]:
    """Read named tensors from a safetensors file, checking presence and shape.

    Args:
        expected: tensor name -> required shape (``None`` for any shape); each must be present.
        optional: the same, for tensors that may be absent.
        aliases: alternative file-side names, file name -> our name.
        nonfinite_fix: when given, a tensor holding NaN or infinity is an error (naming file and tensor)
            ending with this advice; dictionary readers pass :data:`DICTIONARY_NONFINITE_FIX`.

    Raises errors that name the file, the tensor and what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Weights file {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            stored = {(aliases or {}).get(name, name): name for name in handle.keys()}
            tensors: dict[str, torch.Tensor] = {}
            wanted = {**{k: (v, True) for k, v in expected.items()}, **{k: (v, False) for k, v in (optional or {}).items()}}
            for name, (shape, required) in wanted.items():
                if name not in stored:
                    if required:
                        raise KeyError(
                            f"{path} lacks tensor {name!r} (it holds {sorted(handle.keys())}); "
                            "the file is incomplete or of another format."
                        )
                    continue
                tensor = handle.get_tensor(stored[name])
                if shape is not None and tuple(tensor.shape) != tuple(shape):
                    raise ValueError(
                        f"Tensor {name!r} in {path} has shape {tuple(tensor.shape)}, expected {tuple(shape)} "
                        "from the config next to it; the weights and config do not belong together."
                    )
                tensors[name] = tensor
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); it is truncated or corrupt.") from None
    except (OSError, RuntimeError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path} could not be read as safetensors ({err}); it is truncated or corrupt.") from None
    if nonfinite_fix is not None:
        check_finite(tensors, str(path), nonfinite_fix)
    return tensors


def write_layer_files(path: Path, owns: Callable[[str], bool], files: Mapping[str, Mapping[str, torch.Tensor]],
                      config_name: str, config_text: str, what: str) -> None:
    """Write circuit-tracer's layout: each of ``files`` (``{file name: tensors}``) and the config, all into a fresh
    directory that replaces ``path`` whole, so that every layer comes from one save and stale layer files (which
    circuit-tracer would count) are gone. Non-finite tensors are refused before anything is written; ``what``
    names the dictionaries in that error (``"the set"``, ``"the CLT"``)."""
    for name, tensors in files.items():
        check_finite(tensors, f"{name} of {what} for {path}",
                     f"refusing to write {what} (anything there is unchanged); retrain with a lower learning rate.")
    with atomic_directory(path, owns) as tmp:
        for name, tensors in files.items():
            save_file(dict(tensors), str(tmp / name))
        (tmp / config_name).write_text(config_text)
