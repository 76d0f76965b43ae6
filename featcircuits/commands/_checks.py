"""Checks the commands share: argparse number types that refuse nonsense, and task files against their model."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["positive_int", "non_negative_int", "positive_float", "fraction", "check_task_file",
           "check_prompt_fits"]


def _number(text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def check_task_file(path: str | Path) -> None:
    """Refuse a task file whose token ids or answers are booleans (JSON true reads as the token id 1)."""
    path = Path(path)
    if not path.is_file():
        return  # load_task names the missing file
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # load_task names the problem
    pairs = data.get("pairs") if isinstance(data, dict) else data
    if not isinstance(pairs, list):
        return
    for index, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise ValueError(f"task file {path} pair {index} is {type(pair).__name__}, not an object with clean, "
                             "corrupt, answer (and distractor).")
        for key in ("clean", "corrupt", "answer", "distractor"):
            value = pair.get(key)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(item, bool) for item in values):
                raise ValueError(f"task file {path} pair {index} {key} is {value!r}: a boolean, not text or a "
                                 "token id; give text or an integer token id.")


def check_prompt_fits(model: Any, prompt: str, what: str = "--prompt") -> None:
    """Refuse a prompt longer than the model's context (positions past it do not exist)."""
    if getattr(model, "tokenizer", None) is None:
        return
    n_tokens = int(model.to_tokens(prompt).shape[-1])
    if n_tokens > int(model.cfg.n_ctx):
        raise ValueError(f"{what} is {n_tokens} tokens but the model's context is {model.cfg.n_ctx}; "
                         "shorten the prompt.")
