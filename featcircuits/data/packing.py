"""Documents -> packed token rows ``[n, context_size]``, each BOS + ``context_size - 1`` tokens, streamed.

``TokenRows`` tokenizes documents as rows are asked for, so a run reads only the rows it uses. Its
``state_dict`` (epoch, documents consumed, the tokens carried into the next row, rows emitted) is
plain ints and one tensor, so a resumed run continues with the very next row without re-tokenizing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import torch

__all__ = ["TokenRows", "DocumentSource", "special_token_ids", "bos_token_id"]

_TOKENIZE_CHARS = 1 << 18  # text per tokenizer call: fast tokenizers batch well, memory stays small


class DocumentSource(Protocol):
    name: str

    def documents(self, skip: int = 0) -> Iterator[str | list[int]]: ...


def special_token_ids(tokenizer: Any) -> list[int]:
    """Ids whose positions no dictionary should see: BOS, EOS, pad, unk and any other special token."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            ids.add(int(value))
    return sorted(ids)


def bos_token_id(tokenizer: Any) -> int:
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if bos is None:
        raise ValueError("The tokenizer has neither a BOS nor an EOS token to start each packed row with.")
    return int(bos)


class TokenRows:
    """Rows ``[n, context_size]`` int64 from ``source``: documents concatenated, cut into BOS + body rows.

    Args:
        repeat: re-open the source when it ends (epochs); otherwise ``next_rows`` returns fewer rows at the end.
        skip_rows: rows at the start of every epoch that are not returned (held out for evaluation).
        vocab_size: pre-tokenized ids must lie below it.
    The trailing partial row of an epoch is dropped, as is a pre-tokenized document's own leading BOS (each
    row gets one), so a pre-tokenized dataset already packed as BOS + ``context_size - 1`` ids is kept as is.
    """

    def __init__(self, source: DocumentSource, tokenizer: Any, context_size: int, repeat: bool = True,
                 skip_rows: int = 0, vocab_size: int | None = None) -> None:
        if context_size < 2:
            raise ValueError(f"context_size={context_size}: a row needs BOS and at least one token.")
        self.source, self.tokenizer, self.context_size = source, tokenizer, context_size
        self.repeat, self.skip_rows, self.vocab_size = repeat, skip_rows, vocab_size
        self.bos = bos_token_id(tokenizer)
        self.epoch = self.documents_done = self.epoch_rows = self.rows_done = 0
        self.ended = False
        self.first_epoch_rows: int | None = None  # rows (beyond the held-out ones) one epoch holds, once known
        self._carry: list[int] = []
        self._documents: Iterator[str | list[int]] | None = None
        self._warned_short = False

    # -- reading ------------------------------------------------------------------------------

    def _tokens(self, batch: list[str | list[int]]) -> list[list[int]]:
        texts = [doc for doc in batch if isinstance(doc, str)]
        encoded = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        out = []
        for index, doc in enumerate(batch, start=self.documents_done):
            if isinstance(doc, str):
                out.append(list(next(encoded)))
            else:
                out.append(self._check_ids(doc, index))
        return out

    def _check_ids(self, ids: list[int], index: int) -> list[int]:
        if ids and self.vocab_size is not None and (max(ids) >= self.vocab_size or min(ids) < 0):
            bad = max(ids) if max(ids) >= self.vocab_size else min(ids)
            raise ValueError(
                f"Dataset {self.source.name}: pre-tokenized document {index} holds token id {bad}, outside "
                f"the model's vocabulary of {self.vocab_size}: it was tokenized for another model; re-tokenize the "
                "text with this model's tokenizer (or train on the text column)."
            )
        if len(ids) < self.context_size and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"Dataset {self.source.name}: pre-tokenized rows of {len(ids)} ids are shorter than context_size="
                f"{self.context_size}; they are packed together (a row spans several of them). Pass a context_size of "
                f"at most {len(ids)} to keep them apart.", stacklevel=3,
            )
        return ids[1:] if ids and ids[0] == self.bos else ids

    def _pull(self) -> bool:
        """Tokenize the next documents into the carry; False when the source has ended."""
        if self._documents is None:
            self._documents = self.source.documents(skip=self.documents_done)
        batch: list[str | list[int]] = []
        size = 0
        for doc in self._documents:
            batch.append(doc)
            size += len(doc)
            if size >= _TOKENIZE_CHARS:
                break
        if not batch:
            return False
        for ids in self._tokens(batch):
            self._carry.extend(ids)
        self.documents_done += len(batch)
        return True

    def _end_epoch(self) -> bool:
        """Start the next epoch; False (and ``ended``) when not repeating."""
        if self.epoch_rows <= self.skip_rows:
            if self.epoch_rows == 0 and not self._carry:
                raise ValueError(f"Dataset {self.source.name} is empty: it holds no text or tokens.")
            raise ValueError(
                f"Dataset {self.source.name} gives {len(self._carry)} tokens, fewer than one sequence of context_size="
                f"{self.context_size}{f' beyond the {self.skip_rows} held-out rows' if self.skip_rows else ''}; "
                "use more data or a smaller context_size."
            )
        if self.epoch == 0:
            self.first_epoch_rows = self.epoch_rows - self.skip_rows
        close = getattr(self._documents, "close", None)
        if close is not None:
            close()
        if not self.repeat:
            self.ended = True
            return False
        self.epoch, self.documents_done, self.epoch_rows = self.epoch + 1, 0, 0
        self._carry, self._documents = [], None
        return True

    def next_rows(self, n_rows: int) -> torch.Tensor:
        """Up to ``n_rows`` rows ``[k, context_size]``; fewer (possibly none) only once a non-repeating stream ended."""
        body = self.context_size - 1
        rows: list[list[int]] = []
        start = 0
        while len(rows) < n_rows and not self.ended:
            if len(self._carry) - start < body:
                self._carry = self._carry[start:]
                start = 0
                if not self._pull() and not self._end_epoch():
                    break
                continue
            row = self._carry[start : start + body]
            start += body
            if self.epoch_rows >= self.skip_rows:
                rows.append(row)
                self.rows_done += 1
            self.epoch_rows += 1
        self._carry = self._carry[start:]
        if not rows:
            return torch.empty(0, self.context_size, dtype=torch.long)
        tokens = torch.tensor(rows, dtype=torch.long)
        return torch.cat([torch.full((len(rows), 1), self.bos, dtype=torch.long), tokens], dim=1)

    # -- resume -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "documents_done": self.documents_done, "epoch_rows": self.epoch_rows,
                "rows_done": self.rows_done, "ended": self.ended, "first_epoch_rows": self.first_epoch_rows,
                "carry": torch.tensor(self._carry, dtype=torch.long)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.documents_done = int(state["epoch"]), int(state["documents_done"])
        self.epoch_rows, self.rows_done = int(state["epoch_rows"]), int(state["rows_done"])
        self.ended = bool(state["ended"])
        first = state.get("first_epoch_rows")
        self.first_epoch_rows = None if first is None else int(first)
        self._carry = [int(t) for t in state["carry"].tolist()]
        self._documents = None  # re-opened past the documents already consumed
