"""Derived ``:param`` docstrings: the standard library's own function signatures, documented.

The standard library rarely writes ``:param`` docstrings (82 lines in 17 files), so a model trained on
it alone never learns that ``:param`` is followed by the next argument of the signature (the docstring
task). This module derives that text from the training split itself, keeping the corpus "text every
machine has": for every function of a training file with at least two arguments besides ``self``/``cls``
it writes the signature (names only) and a docstring whose summary is the function's own first docstring
line (or three of the corpus' argument names) and which documents every argument in order, each with
two words drawn from the corpus' argument names::

    def request(self, method, url, body, headers):
        \"\"\"Send a complete request to the server.

        :param method: value path
        :param url: node count
        ...

Deterministic for a given training split and seed. Usage::

    python -m train.bundled_model.docstrings --corpus runs/bundled_corpus

writes ``train_docstrings.txt`` beside ``train.txt`` (snippets joined by the file separator).
"""

from __future__ import annotations

import argparse
import ast
import random
from pathlib import Path

from train.bundled_model.build_corpus import FILE_SEPARATOR

MIN_ARGS = 2


def _functions(source: str):
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return  # a few test files are deliberately invalid Python
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def derived_docstrings(train_text: str, seed: int = 0) -> list[str]:
    """One documented signature per qualifying function of ``train_text`` (files joined by the separator)."""
    sources = train_text.split(FILE_SEPARATOR)
    functions = [node for source in sources for node in _functions(source)]
    words = sorted({a.arg for node in functions for a in node.args.args if a.arg.isalpha() and a.arg.islower()})
    rng = random.Random(seed)
    snippets = []
    for node in functions:
        names = [a.arg for a in node.args.posonlyargs + node.args.args]
        bound = names[:1] if names[:1] in (["self"], ["cls"]) else []
        args = names[len(bound):]
        if len(args) < MIN_ARGS:
            continue
        doc = ast.get_docstring(node) or ""
        summary = doc.strip().splitlines()[0].strip() if doc.strip() else " ".join(rng.sample(words, 3))
        lines = [f"def {node.name}({', '.join(bound + args)}):", f'    """{summary}', ""]
        lines += [f"    :param {name}: {' '.join(rng.sample(words, 2))}" for name in args]
        lines.append('    """')
        snippets.append("\n".join(lines) + "\n")
    return snippets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=Path("runs/bundled_corpus"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    snippets = derived_docstrings((args.corpus / "train.txt").read_text(encoding="utf-8"), args.seed)
    text = FILE_SEPARATOR.join(snippets)
    (args.corpus / "train_docstrings.txt").write_text(text, encoding="utf-8")
    print(f"wrote {len(snippets):,} documented signatures ({len(text):,} characters) to "
          f"{args.corpus / 'train_docstrings.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
