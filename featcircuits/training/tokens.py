"""Text file -> packed token sequences ``[n_seq, context_size]``, each starting with BOS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

__all__ = ["tokenize_text_file", "special_token_ids"]


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose positions no dictionary should see: BOS, EOS, pad, unk and any other special token."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def tokenize_text_file(path: str | Path, tokenizer: Any, context_size: int) -> torch.Tensor:
    """Tokenize a text file into ``[n_seq, context_size]`` int64 sequences.

    Documents (blank-line separated paragraphs are kept together; the file is read in ~64 kB pieces
    cut at blank lines) are concatenated and packed; every sequence starts with BOS so that the model
    sees the context it was trained with. The trailing partial sequence is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Dataset {path} does not exist; give a text file or an activation cache dir.")
    text = path.read_text(errors="replace")
    if not text.strip():
        raise ValueError(f"Dataset {path} is empty: it holds no text to tokenize.")
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    pieces, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph)
        if size > 65536:
            pieces.append("\n\n".join(current))
            current, size = [], 0
    if current:
        pieces.append("\n\n".join(current))
    stream: list[int] = []
    for piece in pieces:
        stream.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    body = context_size - 1
    n_seq = len(stream) // body
    if n_seq == 0:
        raise ValueError(
            f"Dataset {path} gives {len(stream)} tokens, fewer than one sequence of context_size={context_size}; "
            "use more text or a smaller context_size."
        )
    tokens = torch.tensor(stream[: n_seq * body], dtype=torch.long).reshape(n_seq, body)
    return torch.cat([torch.full((n_seq, 1), int(bos), dtype=torch.long), tokens], dim=1)
