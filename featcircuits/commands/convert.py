"""featcircuits convert SRC DST --to FORMAT"""

from __future__ import annotations

import argparse

HELP = "Convert dictionaries between formats (native, saelens, circuit-tracer; sparsify read-only)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="directory in any supported format (detected)")
    parser.add_argument("dst", help="output directory")
    parser.add_argument("--to", required=True, help="target format: native, saelens or circuit-tracer")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._paths import output_dir
    from ..dictionaries.io import FORMATS, detect_format, load_dictionaries, save_dictionary
    from ..dictionaries.io.common import atomic_directory

    target = args.to.replace("-", "_")
    if target not in FORMATS or not hasattr(FORMATS[target], "save"):
        raise ValueError(f"--to {args.to!r} is not a writable format; choose one of {sorted(FORMATS)}.")
    src = Path(args.src)
    dst = output_dir(args.dst, "convert DST", create=False)  # before loading: a file in the way fails now
    if dst.resolve() == src.resolve():
        raise ValueError(f"convert: DST {dst} is SRC; write the converted dictionaries to a new directory.")
    try:
        source_format = detect_format(src)
    except ValueError:
        source_format = "directory of dictionaries"
    dictionaries = load_dictionaries(src)
    if target == "circuit_tracer" or len(dictionaries) == 1:
        save_dictionary(dictionaries if len(dictionaries) > 1 else dictionaries[0], dst, format=target)
    else:
        names: list[str] = []
        for index, dictionary in enumerate(dictionaries):
            name = (dictionary.cfg.hook_in or f"dictionary_{index}").replace("/", "_")
            names.append(f"{name}_{index}" if name in names else name)  # e.g. an SAE and a transcoder on one hook
        # The whole set goes into a fresh directory that replaces dst at once: a convert killed half-way
        # leaves dst as it was (and a .tmp-* sibling the loaders name), never three of five dictionaries.
        with atomic_directory(dst, owned=lambda entry: entry in names) as tmp:
            for name, dictionary in zip(names, dictionaries, strict=True):
                save_dictionary(dictionary, tmp / name, format=target)
    print(f"converted {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} "
          f"from {source_format} to {target}: {dst}")
    return 0
