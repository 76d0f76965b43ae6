"""Checked tensor reading and atomic writing shared by every file format."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

__all__ = ["read_tensors", "write_tensors", "write_json", "read_json", "atomic_path"]


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
            # mkstemp makes the file private (0600); give it the permissions any new file would get
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self.tmp, 0o666 & ~umask)
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_json(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


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
) -> dict[str, torch.Tensor]:
    """Read named tensors from a safetensors file, checking presence and shape.

    Args:
        expected: tensor name -> required shape (``None`` for any shape); each must be present.
        optional: the same, for tensors that may be absent.
        aliases: alternative file-side names, file name -> our name.

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
    return tensors
