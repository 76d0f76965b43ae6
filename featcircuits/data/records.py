"""Record datasets -> documents: local .jsonl / .parquet / .arrow files and Hugging Face datasets.

Each record gives one document from one column: text (a string, tokenized later) or token ids (a list
of ints, e.g. SAELens's pre-tokenized ``input_ids`` / ``tokens`` datasets). Files are read a batch of
records at a time; Hugging Face datasets through ``datasets.load_dataset(..., streaming=True)``, which
reads the local cache alone when ``HF_DATASETS_OFFLINE=1``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["RecordFile", "HubDataset", "RECORD_SUFFIXES", "TOKEN_COLUMNS", "pick_column"]

RECORD_SUFFIXES = (".jsonl", ".parquet", ".arrow")
TOKEN_COLUMNS = ("input_ids", "tokens")  # pre-tokenized columns used when the text column is absent
Document = str | list[int]


def pick_column(columns: list[str], text_column: str, where: str) -> str:
    """The column to read: ``text_column`` when present, else a pre-tokenized one; else an error listing them."""
    if text_column in columns:
        return text_column
    for name in TOKEN_COLUMNS:
        if name in columns:
            return name
    raise ValueError(
        f"Dataset {where} has no column {text_column!r} (nor a pre-tokenized {' / '.join(TOKEN_COLUMNS)} column); "
        f"its columns are {columns}. Pass --text-column NAME (TrainConfig.text_column) naming the text column."
    )


def _as_document(value: Any, column: str, where: str) -> Document:
    if isinstance(value, str):
        return value
    if hasattr(value, "tolist"):  # numpy arrays from arrow
        value = value.tolist()
    if isinstance(value, list) and all(isinstance(item, int) for item in value):
        return value
    raise ValueError(
        f"Dataset {where}: column {column!r} holds {type(value).__name__} values; it must hold text (strings) or "
        "token ids (lists of ints)."
    )


class RecordFile:
    """Documents from one local ``.jsonl``, ``.parquet`` or ``.arrow`` (IPC file or stream) file."""

    def __init__(self, path: Path, text_column: str = "text") -> None:
        self.path, self.name = path, str(path)
        self.column = pick_column(self._columns(), text_column, str(path))

    def _columns(self) -> list[str]:
        if self.path.suffix == ".jsonl":
            with open(self.path, encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        return list(self._json(line, 1))
            raise ValueError(f"Dataset {self.path} is empty: it holds no records.")
        return list(self._schema().names)

    def _json(self, line: str, number: int) -> dict[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"Dataset {self.path} line {number} is not JSON ({err}); each line must be one object.") from None
        if not isinstance(record, dict):
            raise ValueError(f"Dataset {self.path} line {number} is a {type(record).__name__}, not a JSON object.")
        return record

    def _schema(self) -> Any:
        import pyarrow.parquet as pq

        if self.path.suffix == ".parquet":
            return pq.read_schema(self.path)
        return self._arrow_reader().schema

    def _arrow_reader(self) -> Any:
        import pyarrow as pa

        try:
            return pa.ipc.open_file(self.path)
        except pa.ArrowInvalid:
            try:
                return pa.ipc.open_stream(self.path)  # datasets' save_to_disk writes the stream format
            except pa.ArrowInvalid as err:
                raise ValueError(f"Dataset {self.path} is not an Arrow IPC file or stream ({err}).") from None

    def _batches(self) -> Iterator[list[Any]]:
        if self.path.suffix == ".jsonl":
            with open(self.path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, 1):
                    if line.strip():
                        record = self._json(line, number)
                        if self.column not in record:
                            raise ValueError(f"Dataset {self.path} line {number} has no {self.column!r} field; "
                                             f"it has {sorted(record)}.")
                        yield [record[self.column]]
        elif self.path.suffix == ".parquet":
            import pyarrow.parquet as pq

            for batch in pq.ParquetFile(self.path).iter_batches(batch_size=256, columns=[self.column]):
                yield batch.column(0).to_pylist()
        else:
            reader = self._arrow_reader()
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if hasattr(
                reader, "num_record_batches") else reader
            for batch in batches:
                yield batch.column(batch.schema.get_field_index(self.column)).to_pylist()

    def documents(self, skip: int = 0) -> Iterator[Document]:
        index = 0
        for values in self._batches():
            if index + len(values) <= skip:
                index += len(values)  # skipped without decoding into documents
                continue
            for value in values:
                if index >= skip:
                    yield _as_document(value, self.column, self.name)
                index += 1


class HubDataset:
    """Documents from ``datasets.load_dataset(name, config, split=split, streaming=True)``.

    ``name`` is a Hub id (read from the local cache when offline) or a local dataset repository directory
    (``data/train-00000-of-00001.parquet`` and so on), which ``load_dataset`` reads the same way.
    """

    def __init__(self, name: str, split: str = "train", config: str = "", text_column: str = "text") -> None:
        self.name, self.split, self.config = name, split, config or None
        self.label = f"{name!r} (split {split!r}{f', config {config!r}' if config else ''})"
        first = next(iter(self._open()), None)
        if first is None:
            raise ValueError(f"Dataset {self.label} is empty: it holds no records.")
        self.column = pick_column(list(first), text_column, self.label)

    def _open(self) -> Any:
        import datasets

        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, streaming=True)
        except Exception as err:  # datasets raises many types (offline, not found, bad split, bad config)
            raise ValueError(self._explain(err)) from None

    def _explain(self, err: Exception) -> str:
        text = f"{type(err).__name__}: {err}".strip()
        if "split" in text.lower() and ("unknown split" in text.lower() or "bad split" in text.lower()):
            return f"Dataset {self.label}: {text}. Pass --dataset-split naming one of its splits."
        if "config" in text.lower() and "missing" in text.lower():
            return f"Dataset {self.label}: {text}. Pass --dataset-config naming one of its configurations."
        return (
            f"Dataset {self.label} could not be opened ({text[:400]}). If it is a Hugging Face Hub id it is not "
            "in the local cache and the Hub cannot be reached (HF_DATASETS_OFFLINE / HF_HUB_OFFLINE, or no "
            f"network): download it once with network access, e.g. `huggingface-cli download --repo-type dataset "
            f"{self.name}` or a run without the offline variables; or give a local text/jsonl/parquet/arrow file."
        )

    def documents(self, skip: int = 0) -> Iterator[Document]:
        dataset = self._open()
        if skip:
            dataset = dataset.skip(skip)
        for record in dataset:
            if self.column not in record:
                raise ValueError(f"Dataset {self.label}: a record has no {self.column!r} column; it has {sorted(record)}.")
            yield _as_document(record[self.column], self.column, self.label)
