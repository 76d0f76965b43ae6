"""Output paths, prepared once the same way by every command that writes: checked before any work is done.

``output_dir`` and ``output_file`` create what is missing, refuse a file where a directory is wanted (or
the reverse) and prove the location writable by writing (and removing) a probe file, so a run that would
fail at its very end fails at its start instead, naming the path and the fix. ``RunLock`` claims a
directory for one run: an exclusive lock file holding the owner's pid, created atomically.
"""

from __future__ import annotations

import errno
import os
import socket
import tempfile
import warnings
from pathlib import Path
from types import TracebackType

__all__ = ["OutputPathError", "output_dir", "output_file", "RunLock", "LOCK_NAME"]

LOCK_NAME = ".featcircuits.lock"


class OutputPathError(ValueError):
    """An output location that cannot be written; the message names the path and the fix."""


def _probe(directory: Path, what: str) -> None:
    """Write and remove a file in ``directory``: the only check that holds for read-only mounts and root."""
    try:
        handle, name = tempfile.mkstemp(prefix=".featcircuits-probe-", dir=directory)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        reason = "the disk is full" if err.errno == errno.ENOSPC else (err.strerror or str(err))
        raise OutputPathError(
            f"{what} {directory} is not writable ({reason}); choose a writable location, or fix its permissions "
            "(nothing was written)."
        ) from None


def _existing_ancestor(directory: Path, what: str) -> Path:
    for ancestor in [directory, *directory.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OutputPathError(
                    f"{what} {directory}: {ancestor} is a file, not a directory; choose another path, or move the "
                    "file away (nothing was written)."
                )
            return ancestor
    return Path(".")


def _make_dir(directory: Path, what: str) -> None:
    _existing_ancestor(directory, what)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputPathError(
            f"{what} {directory} cannot be created ({err.strerror or err}); choose a writable location "
            "(nothing was written)."
        ) from None


def _unreachable(path: str | Path, what: str, err: OSError) -> OutputPathError:
    return OutputPathError(f"{what} {path} cannot be reached ({err.strerror or err}); choose a writable location, "
                           "or fix the permissions of the folders above it (nothing was written).")


def output_dir(path: str | Path, what: str = "output directory", create: bool = True) -> Path:
    """See :func:`_output_dir`; an OS error while looking (a folder above that cannot be entered) is named too."""
    try:
        return _output_dir(path, what, create)
    except OutputPathError:
        raise
    except OSError as err:
        raise _unreachable(path, what, err) from None


def output_file(path: str | Path, what: str = "output file") -> Path:
    """See :func:`_output_file`; an OS error while looking (a folder above that cannot be entered) is named too."""
    try:
        return _output_file(path, what)
    except OutputPathError:
        raise
    except OSError as err:
        raise _unreachable(path, what, err) from None


def _output_dir(path: str | Path, what: str, create: bool) -> Path:
    """The directory ``path``, created if missing and proven writable; ``what`` names it in errors (``--out``).

    ``create=False`` (for writers that build their directory elsewhere and rename it in) creates nothing:
    it proves the nearest existing ancestor writable instead.
    """
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise OutputPathError(
            f"{what} {directory} is a file, but a directory is needed; give a directory path, or move the file "
            "away (it was not changed)."
        )
    if create:
        _make_dir(directory, what)
        _probe(directory, what)
    else:
        ancestor = _existing_ancestor(directory, what)
        _probe(ancestor, what)
        if ancestor == directory and directory.parent.exists():
            _probe(directory.parent, what)  # atomic writers build a sibling and rename it in
    return directory


def _output_file(path: str | Path, what: str) -> Path:
    """The file ``path`` made ready to be written: its directory exists and is writable; not a directory."""
    file = Path(path)
    if str(path).endswith(os.sep) or file.is_dir():
        raise OutputPathError(
            f"{what} {file} is a directory, but a file is needed; give a file path such as {file / 'out.json'}."
        )
    parent = file.parent if str(file.parent) else Path(".")
    _make_dir(parent, what)
    _probe(parent, what)
    if file.exists() and not os.access(file, os.W_OK):
        raise OutputPathError(f"{what} {file} exists and is read-only; choose another path or make it writable.")
    return file


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class RunLock:
    """An exclusive claim on ``directory`` for one run: ``directory/.featcircuits.lock`` with ``pid host``.

    Created with ``O_CREAT | O_EXCL`` (atomic: of two runs starting together exactly one gets it). A lock
    left by a process that is gone (on this host) is taken over with a warning; a live one is refused,
    naming the lock file and its pid. Removed on exit.
    """

    def __init__(self, directory: str | Path, what: str = "--out") -> None:
        self.path = Path(directory) / LOCK_NAME
        self.what = what
        self._held = False

    def _create(self) -> bool:
        try:
            handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "w") as file:
            file.write(f"{os.getpid()} {socket.gethostname()}\n")
        return True

    def acquire(self) -> None:
        for _ in range(2):
            if self._create():
                self._held = True
                return
            owner = self.path.read_text(errors="replace").split() if self.path.exists() else []
            pid = int(owner[0]) if owner and owner[0].isdigit() else None
            host = owner[1] if len(owner) > 1 else socket.gethostname()
            if pid is not None and (host != socket.gethostname() or _alive(pid)):
                raise OutputPathError(
                    f"{self.what} {self.path.parent} is in use by another featcircuits run (pid {pid} on {host}, "
                    f"lock file {self.path}); wait for it to finish or choose another {self.what}. If that run "
                    f"is gone, delete {self.path}."
                )
            warnings.warn(f"{self.path}: taking over the lock of a run that is gone (pid {pid}); its outputs may be "
                          "incomplete.", stacklevel=2)
            self.path.unlink(missing_ok=True)
        raise OutputPathError(f"{self.what} {self.path.parent}: another run took the lock {self.path} meanwhile; "
                              f"choose another {self.what}.")

    def release(self) -> None:
        if self._held:
            self._held = False
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()
