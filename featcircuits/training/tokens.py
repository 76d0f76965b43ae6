"""Token rows for training: a whole (small) dataset as one tensor, for tests, evaluation and tools.

Training itself streams (``featcircuits.data.TokenRows`` through ``sources.StreamSource``); this reads
every row, so use it only where the whole dataset fits in memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..data import TokenRows, open_documents, special_token_ids

__all__ = ["tokenize_text_file", "tokenize_dataset", "held_out_rows", "special_token_ids"]


def tokenize_dataset(dataset: str | Path, tokenizer: Any, context_size: int, max_rows: int | None = None,
                     **options: Any) -> torch.Tensor:
    """``[n_seq, context_size]`` int64 rows of ``dataset`` (any form ``open_documents`` takes), each BOS + body.

    ``options``: ``split``, ``config``, ``text_column`` for record datasets. The trailing partial row is dropped.
    """
    rows = TokenRows(open_documents(dataset, **options), tokenizer, context_size, repeat=False)
    parts = []
    while not rows.ended and (max_rows is None or rows.rows_done < max_rows):
        want = 4096 if max_rows is None else min(4096, max_rows - rows.rows_done)
        part = rows.next_rows(want)
        if len(part):
            parts.append(part)
    return torch.cat(parts) if parts else torch.empty(0, context_size, dtype=torch.long)


def tokenize_text_file(path: str | Path, tokenizer: Any, context_size: int) -> torch.Tensor:
    """Tokenize a text file into ``[n_seq, context_size]`` int64 sequences (documents packed, BOS first)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset {path} does not exist; give a text file or an activation cache dir.")
    if path.stat().st_size < 1 << 20 and not path.read_bytes().strip():
        raise ValueError(f"Dataset {path} is empty: it holds no text to tokenize.")
    return tokenize_dataset(path, tokenizer, context_size)


def held_out_rows(documents: Any, tokenizer: Any, context_size: int, eval_sequences: int,
                  vocab_size: int | None = None) -> torch.Tensor:
    """``[n_eval, context_size]``: the first rows of ``documents``, held out of training for evaluation.

    At most ``eval_sequences`` and at most a quarter of a small dataset (read up to ``4 * eval_sequences``
    rows to know), so a small dataset keeps most of its rows for training.
    """
    if eval_sequences <= 0:
        return torch.empty(0, context_size, dtype=torch.long)
    rows = TokenRows(documents, tokenizer, context_size, repeat=False, vocab_size=vocab_size)
    try:
        first = rows.next_rows(4 * eval_sequences)
    except ValueError:  # too small even for one row: training reports it with the run's numbers
        return torch.empty(0, context_size, dtype=torch.long)
    return first[: min(eval_sequences, len(first) // 4)]
