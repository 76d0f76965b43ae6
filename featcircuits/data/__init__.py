"""Datasets -> streamed, resumable token rows: text files and directories, jsonl/parquet/arrow, HF datasets.

``open_documents(dataset, ...)`` picks the reader from what ``dataset`` names; ``TokenRows`` packs its
documents into ``[n, context_size]`` rows on demand (see ``packing``); ``ShuffledRows`` shuffles them through a
bounded, resumable buffer (see ``shuffle``).
"""

from __future__ import annotations

from pathlib import Path

from .packing import DocumentSource, TokenRows, bos_token_id, special_token_ids
from .records import RECORD_SUFFIXES, HubDataset, RecordFile
from .shuffle import ShuffledRows
from .text import TEXT_SUFFIXES, TextFiles

__all__ = ["open_documents", "TokenRows", "ShuffledRows", "DocumentSource", "special_token_ids", "bos_token_id", "describe_dataset"]

_DATASET_REPO_SUFFIXES = (*RECORD_SUFFIXES, ".json", ".csv")


def open_documents(dataset: str | Path, split: str = "train", config: str = "",
                   text_column: str = "text") -> DocumentSource:
    """The documents of ``dataset``:

    - a ``.jsonl`` / ``.parquet`` / ``.arrow`` file: one document per record from ``text_column`` (or a
      pre-tokenized ``input_ids`` / ``tokens`` column);
    - any other file: UTF-8 text, read in pieces;
    - a directory holding text files (``*.txt``, ``*.text``, ``*.md``, recursively, in name order): their text;
    - a directory holding data files but no text (a local dataset repository) or a name that is no local path:
      a Hugging Face dataset, streamed with ``split`` / ``config``.
    """
    path = Path(dataset)
    if path.is_file():
        if path.suffix in RECORD_SUFFIXES:
            return RecordFile(path, text_column)
        return TextFiles([path], str(path))
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.parts))
        texts = [p for p in files if p.suffix in TEXT_SUFFIXES and p.name != "README.md"]
        if texts:
            return TextFiles(texts, str(path))
        if any(p.suffix in _DATASET_REPO_SUFFIXES for p in files):
            return HubDataset(str(path), split, config, text_column)
        found = sorted({p.suffix or p.name for p in files})[:10]
        raise ValueError(
            f"Dataset directory {path} holds no text files ({', '.join(TEXT_SUFFIXES)}) and no data files "
            f"({', '.join(_DATASET_REPO_SUFFIXES)}); it holds {found or 'nothing'}. Point --dataset at a text file, "
            "a directory of text files, or a dataset repository."
        )
    if str(dataset).startswith((".", "/", "~")) or path.suffix in (*TEXT_SUFFIXES, *RECORD_SUFFIXES):
        raise FileNotFoundError(f"Dataset {dataset} does not exist; give a text/jsonl/parquet/arrow file, a directory, "
                                "a Hugging Face dataset id, or an activation cache directory.")
    return HubDataset(str(dataset), split, config, text_column)


def describe_dataset(dataset: str | Path) -> str:
    """How a dataset is recorded in manifests: a resolved path for local data, the id for Hub datasets."""
    path = Path(dataset)
    return str(path.resolve()) if path.exists() else str(dataset)
