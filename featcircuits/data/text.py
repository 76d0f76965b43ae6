"""Plain text files -> documents: read in pieces cut at blank lines, decoded as UTF-8, never whole.

A piece (about ``PIECE_CHARS`` characters, cut at the last blank line, else the last newline) is one
document for the packer, so memory stays at one piece however large the file is.
"""

from __future__ import annotations

import codecs
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["TextFiles", "TEXT_SUFFIXES", "PIECE_CHARS"]

TEXT_SUFFIXES = (".txt", ".text", ".md")
PIECE_CHARS = 65536
_READ_BYTES = 1 << 16
_REPLACEMENT = "\ufffd"


def _check_not_binary(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(8192)
    if b"\x00" in head:
        raise ValueError(
            f"Dataset file {path} is binary (it holds NUL bytes), not text: give a UTF-8 text file, or a "
            ".jsonl/.parquet/.arrow file with a text or input_ids column."
        )


class TextFiles:
    """Documents from text files in order: each file's pieces, cut at blank lines.

    Bytes that are not valid UTF-8 are replaced with U+FFFD and counted; a warning per file gives the count
    (of the part read) when the file is closed.
    """

    def __init__(self, paths: list[Path], name: str) -> None:
        if not paths:
            raise ValueError(f"Dataset {name} holds no text files ({', '.join(TEXT_SUFFIXES)}).")
        for path in paths:
            _check_not_binary(path)
        self.paths, self.name = paths, name

    def documents(self, skip: int = 0) -> Iterator[str]:
        """Every piece of every file, after the first ``skip`` pieces."""
        index = 0
        for path in self.paths:
            for piece in _pieces(path):
                if index >= skip:
                    yield piece
                index += 1


def _pieces(path: Path) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    replaced, buffer = 0, ""
    try:
        with open(path, "rb") as handle:
            while True:
                raw = handle.read(_READ_BYTES)
                text = decoder.decode(raw, final=not raw)
                # U+FFFD already in the file is text, not a replacement: count only the new ones.
                replaced += max(0, text.count(_REPLACEMENT) - raw.count(b"\xef\xbf\xbd"))
                buffer += text
                while len(buffer) >= PIECE_CHARS:
                    cut = buffer.rfind("\n\n", 0, 4 * PIECE_CHARS)
                    if cut <= 0:
                        cut = buffer.rfind("\n", 0, 4 * PIECE_CHARS)
                    if cut <= 0:
                        if len(buffer) < 4 * PIECE_CHARS and raw:
                            break  # no line break yet: read more before cutting mid-line
                        cut = min(len(buffer), 4 * PIECE_CHARS)
                    piece, buffer = buffer[:cut], buffer[cut:].lstrip("\n")
                    if piece.strip():
                        yield piece
                if not raw:
                    break
        if buffer.strip():
            yield buffer
    finally:
        if replaced:
            warnings.warn(
                f"Dataset file {path}: {replaced} byte sequence(s) are not valid UTF-8 and were replaced with U+FFFD "
                "(counted in the part read); re-encode the file as UTF-8 to train on its real text.",
                stacklevel=2,
            )
