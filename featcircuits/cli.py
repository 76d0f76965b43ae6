"""``featcircuits ...``: a thin command line over the Python API.

Each sub-command is a module in ``featcircuits.commands`` defining ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``; they are discovered, so adding a command is adding
one file. Modules import their heavy dependencies inside ``run`` to keep ``--help`` fast.
"""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import pkgutil
import sys
from types import ModuleType
from typing import NoReturn

from . import commands
from ._version import __version__


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (``featcircuits CMD: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


@functools.cache
def _command_modules() -> list[tuple[str, ModuleType]]:
    """Every sub-command module, found and imported once (later parsers need no directory listing)."""
    names = sorted(info.name for info in pkgutil.iter_modules(commands.__path__) if not info.name.startswith("_"))
    return [(name, importlib.import_module(f"{commands.__name__}.{name}")) for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="featcircuits",
        description="Sparse-feature circuit discovery: train dictionaries, build attribution graphs, find circuits.",
    )
    parser.add_argument("--version", action="version", version=f"featcircuits {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="re-raise errors with their traceback (also: FEATCIRCUITS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _command_modules():
        command = sub.add_parser(name.replace("_", "-"), help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a usage error exits with status 2 and one line on stderr
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except (ValueError, KeyError, OSError) as err:
        if args.debug or os.environ.get("FEATCIRCUITS_DEBUG", "") not in ("", "0"):
            raise
        print(f"featcircuits {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


def _message(err: BaseException) -> str:
    """One line for the user: the error's own message, or for a bare OS error what failed, where, and the fix."""
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    elif isinstance(err, OSError) and err.strerror:  # raised by the OS itself (open, mkdir, write, ...)
        where = f" ({err.filename})" if err.filename else ""
        fix = _OS_FIXES.get(err.errno or 0, "check the path and try again")
        text = f"{err.strerror}{where}; {fix}."
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line


_OS_FIXES = {
    errno.ENOSPC: "free disk space or write elsewhere", errno.EACCES: "fix the permissions or write elsewhere",
    errno.EPERM: "fix the permissions or write elsewhere", errno.EROFS: "write elsewhere",
    errno.EISDIR: "give a file path, not a directory", errno.ENOTDIR: "give a directory path, not a file",
    errno.ENOENT: "check the path",
}


if __name__ == "__main__":
    sys.exit(main())
