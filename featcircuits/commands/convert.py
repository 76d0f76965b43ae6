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

    from ..dictionaries.io import FORMATS, detect_format, load_dictionaries, save_dictionary

    target = args.to.replace("-", "_")
    if target not in FORMATS or not hasattr(FORMATS[target], "save"):
        raise ValueError(f"--to {args.to!r} is not a writable format; choose one of {sorted(FORMATS)}.")
    src = Path(args.src)
    try:
        source_format = detect_format(src)
    except ValueError:
        source_format = "directory of dictionaries"
    dictionaries = load_dictionaries(src)
    dst = Path(args.dst)
    if target == "circuit_tracer" or len(dictionaries) == 1:
        save_dictionary(dictionaries if len(dictionaries) > 1 else dictionaries[0], dst, format=target)
    else:
        used: set[str] = set()
        for index, dictionary in enumerate(dictionaries):
            name = (dictionary.cfg.hook_in or f"dictionary_{index}").replace("/", "_")
            if name in used:  # e.g. an SAE and a transcoder reading the same hook
                name = f"{name}_{index}"
            used.add(name)
            save_dictionary(dictionary, dst / name, format=target)
    print(f"converted {len(dictionaries)} dictionar{'y' if len(dictionaries) == 1 else 'ies'} "
          f"from {source_format} to {target}: {dst}")
    return 0
