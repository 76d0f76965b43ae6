"""Induction in more detail than ``eval_tasks``: sequence lengths, frequent tokens, and repeated real code.

    python -m train.bundled_model.eval_induction --model featcircuits/pretrained/bundled --corpus runs/bundled_corpus

Prints one JSON line of second-copy / first-copy top-1 accuracies (``BOS, s, s``; see
``eval_tasks.induction_accuracy``) for: random token sequences of several lengths; 20-token sequences
drawn from the most frequent tokens of the validation split (strong bigram statistics compete with the
copy there); and 60-token windows of the validation split itself (real code, partly predictable on its
first copy already).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from train.bundled_model.eval_tasks import induction_accuracy, induction_tokens


def frequent_token_repeats(counts: torch.Tensor, top: int, n: int, length: int, seed: int, bos: int) -> torch.Tensor:
    """``[n, 1 + 2 * length]``: BOS and a sequence of distinct ids among the ``top`` most frequent, twice."""
    frequent = counts.argsort(descending=True)[:top]
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.stack([frequent[torch.randperm(top, generator=gen)[:length]] for _ in range(n)])
    return torch.cat([torch.full((n, 1), bos), seqs, seqs], dim=1)


def text_repeats(tokens: torch.Tensor, n: int, length: int, seed: int, bos: int) -> torch.Tensor:
    """``[n, 1 + 2 * length]``: BOS and a window of ``tokens`` at a random offset, twice."""
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - length, (n,), generator=gen)
    seqs = tokens[starts[:, None] + torch.arange(length)]
    return torch.cat([torch.full((n, 1), bos), seqs, seqs], dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("featcircuits/pretrained/bundled"))
    parser.add_argument("--corpus", type=Path, default=Path("runs/bundled_corpus"))
    parser.add_argument("--n", type=int, default=64, help="sequences per measurement")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    valid_file = args.corpus / "valid.txt"
    if not valid_file.exists():
        parser.error(f"{valid_file} is missing; write it with `python -m train.bundled_model.build_corpus`.")
    torch.set_num_threads(1)
    from featcircuits import load_model

    model = load_model(args.model)
    tok = model.tokenizer
    bos = tok.bos_token_id
    valid = torch.tensor(tok(valid_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    counts = torch.bincount(valid, minlength=len(tok))
    measured = {f"random_{length}": induction_tokens(args.n, length, args.seed, bos, len(tok))
                for length in (10, 20, 50, 100)}
    measured.update({f"frequent_{top}": frequent_token_repeats(counts, top, args.n, 20, args.seed, bos)
                     for top in (200, 1000)})
    measured["validation_code_60"] = text_repeats(valid, args.n, 60, args.seed, bos)
    results = {}
    for name, tokens in measured.items():
        acc = induction_accuracy(model, tokens)
        results[name] = [round(acc["repeat_acc"], 3), round(acc["first_half_acc"], 3)]
    print(json.dumps({"second_copy_first_copy_top1": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
