"""ShuffledRows: a seeded permutation of the streamed rows, bounded in memory, independent of how rows are asked
for, and exactly resumable (buffer and stream position); with a read limit it reads only the rows it serves."""

from __future__ import annotations

import pytest
import torch
from conftest import STORIES260K, TINYSTORIES

from featcircuits.data import ShuffledRows, TokenRows, open_documents
from featcircuits.data.shuffle import BLOCK_ROWS

CONTEXT = 32


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(STORIES260K))


def _stream(tokenizer, repeat=False) -> TokenRows:
    return TokenRows(open_documents(TINYSTORIES / "valid_head.txt"), tokenizer, CONTEXT, repeat=repeat, skip_rows=2)


def _drain(rows, sizes) -> torch.Tensor:
    parts, index = [], 0
    while not rows.ended:
        part = rows.next_rows(sizes[index % len(sizes)])
        index += 1
        if len(part):
            parts.append(part)
    return torch.cat(parts)


def _sorted(rows: torch.Tensor) -> list[tuple[int, ...]]:
    return sorted(map(tuple, rows.tolist()))


def test_shuffled_rows_are_a_seeded_permutation_of_the_stream(tokenizer):
    reference = _drain(_stream(tokenizer), [4096])
    assert len(reference) > 300
    shuffled = ShuffledRows(_stream(tokenizer), buffer_rows=100, seed=3)
    held = []
    parts = []
    while not shuffled.ended:
        parts.append(shuffled.next_rows(7))
        held.append(shuffled.held_rows)
    out = torch.cat(parts)
    assert _sorted(out) == _sorted(reference)  # every row exactly once
    assert max(held) <= 100 + BLOCK_ROWS  # bounded memory: the buffer and at most one block drawn from it
    same_order = (out == reference).all(1).float().mean().item()
    assert same_order < 0.05  # shuffled, not streamed in order
    # Call sizes do not change the order; the seed does.
    assert torch.equal(_drain(ShuffledRows(_stream(tokenizer), 100, seed=3), [1, 64, 13, 200]), out)
    assert not torch.equal(_drain(ShuffledRows(_stream(tokenizer), 100, seed=4), [7]), out)
    # A bounded buffer mixes locally: a row is never served before the buffer had read it.
    positions = {row: i for i, row in enumerate(map(tuple, reference.tolist()))}
    served_at = torch.tensor([positions[row] for row in map(tuple, out.tolist())])
    assert (served_at <= torch.arange(len(out)) + 100 + BLOCK_ROWS).all()


def test_a_buffer_larger_than_the_read_limit_shuffles_exactly_the_rows_read(tokenizer):
    reference = _drain(_stream(tokenizer), [4096])
    shuffled = ShuffledRows(_stream(tokenizer), buffer_rows=10_000, seed=0, read_limit=150)
    first = shuffled.next_rows(150)
    assert shuffled.rows_read == 150 and shuffled.held_rows == 0
    assert _sorted(first) == _sorted(reference[:150])
    more = shuffled.next_rows(20)  # asked beyond the limit (e.g. calibration batches): it reads on
    assert len(more) == 20 and set(map(tuple, more.tolist())) <= set(map(tuple, reference[150:].tolist()))


@pytest.mark.parametrize("served_before", [0, 37, 300, 900])
def test_resume_restores_buffer_and_stream_position(tokenizer, tmp_path, served_before):
    # A repeating stream: 900 rows cross the epoch boundary (about 470 rows per epoch).
    run = ShuffledRows(_stream(tokenizer, repeat=True), buffer_rows=128, seed=1, read_limit=1200)
    run.next_rows(served_before)
    torch.save(run.state_dict(), tmp_path / "state.pt")
    expected = torch.cat([run.next_rows(50) for _ in range(8)])
    resumed = ShuffledRows(_stream(tokenizer, repeat=True), buffer_rows=128, seed=1, read_limit=1200)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert torch.equal(torch.cat([resumed.next_rows(50) for _ in range(8)]), expected)
    assert resumed.rows_done == served_before + 400


def test_bad_buffer_size_is_refused(tokenizer):
    with pytest.raises(ValueError, match="buffer_rows=0"):
        ShuffledRows(_stream(tokenizer), buffer_rows=0)
