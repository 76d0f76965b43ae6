"""Build the bundled model's corpus: the Python standard library's own ``.py`` source files.

Every machine running Python has this text, so the bundled model is reproducible offline. Files are
taken from ``sysconfig.get_paths()["stdlib"]`` (``site-packages`` excluded: that is installed software,
not the standard library), sorted by relative path, and split train/validation *by file* with a hash
of the relative path, so the split does not depend on which other files exist.

Usage::

    python -m train.bundled_model.build_corpus --out runs/bundled_corpus

writes ``train.txt``, ``valid.txt`` and ``manifest.json`` (Python version, file lists, sizes, sha256).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
from pathlib import Path

# Files are joined with this separator; the tokenizer learns it as one special token.
FILE_SEPARATOR = "<|endoftext|>"
VALID_PERCENT = 3


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Return the sorted ``.py`` files of the standard library (paths relative to ``root``)."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"No standard library directory at {root}; pass --stdlib PATH.")
    files = [p.relative_to(root) for p in root.rglob("*.py") if "site-packages" not in p.parts]
    return sorted(files, key=lambda p: p.as_posix())


def is_validation(rel_path: Path) -> bool:
    """Put a file in the validation split when a hash of its relative path says so (~3% of files)."""
    digest = hashlib.sha256(rel_path.as_posix().encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < VALID_PERCENT


def read_source(path: Path) -> str | None:
    """Read a file as UTF-8; return None for the few test files that are deliberately not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def build_corpus(out_dir: Path, root: Path | None = None) -> dict:
    """Write ``train.txt`` / ``valid.txt`` / ``manifest.json`` under ``out_dir`` and return the manifest."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    out_dir.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[str]] = {"train": [], "valid": []}
    texts: dict[str, list[str]] = {"train": [], "valid": []}
    skipped: list[str] = []
    for rel in stdlib_files(root):
        text = read_source(root / rel)
        if text is None or FILE_SEPARATOR in text:
            skipped.append(rel.as_posix())
            continue
        split = "valid" if is_validation(rel) else "train"
        splits[split].append(rel.as_posix())
        texts[split].append(text)
    manifest: dict = {"python": sys.version.split()[0], "stdlib": str(root), "skipped": skipped}
    for split in ("train", "valid"):
        body = FILE_SEPARATOR.join(texts[split])
        (out_dir / f"{split}.txt").write_text(body, encoding="utf-8")
        manifest[split] = {
            "files": len(splits[split]),
            "chars": len(body),
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
            "paths": splits[split],
        }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bundled_corpus"))
    parser.add_argument("--stdlib", type=Path, default=None, help="standard library root (default: sysconfig)")
    args = parser.parse_args(argv)
    m = build_corpus(args.out, args.stdlib)
    print(
        f"python {m['python']}: train {m['train']['files']} files {m['train']['chars']:,} chars, "
        f"valid {m['valid']['files']} files {m['valid']['chars']:,} chars, skipped {len(m['skipped'])}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
