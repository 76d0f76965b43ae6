"""Held-out task prompts and accuracies for the bundled model: the docstring task and induction.

*Docstring task* (Heimersheim & Janiak 2023): a function signature lists arguments, its docstring
documents them in order with ``:param``, and the model must name the next undocumented argument::

    def port(self, load, size, files, last):
        \"\"\"oil column piece

        :param load: crime population
        :param size: unit dark
        :param

answer `` files``. Names are drawn at random from the argument names the corpus' own functions use
(single tokens after a space), so the names are familiar but the prompts occur nowhere in the corpus. The corrupt prompt renames every argument in the signature
(same token count), so the clean answer is no longer an argument; its distractor is the corrupt
prompt's own answer.

*Argument forwarding*: the same signature, and a body that passes the arguments on in order; the model
names the next one (``return self._g(load, size,`` -> `` files``); corrupted the same way.

*Induction*: ``BOS, s, s`` for a random token sequence ``s``; on the second copy the model can predict
every token after the first by copying.

Every function takes ``logits_fn(tokens [batch, pos]) -> logits [batch, pos, d_vocab]`` so it evaluates a
Hugging Face model and a TransformerLens model alike. Usage::

    python -m train.bundled_model.eval_tasks --model featcircuits/pretrained/bundled \\
        --write-task featcircuits/pretrained/bundled/docstring_task.json
"""

from __future__ import annotations

import argparse
import json
import keyword
import random
import re
from collections.abc import Callable
from pathlib import Path

import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
N_ARGS = 4  # signature arguments after self; the answer is the third, so one documented-after remains
N_DOCUMENTED = 2
NAMES_FILE = "docstring_names.json"
_EXCLUDED = set(keyword.kwlist) | {"self", "cls", "param", "type", "return", "returns"}


def collect_arg_names(train_file: Path, tokenizer, min_count: int = 5) -> list[str]:
    """Argument names of the corpus' own function definitions (parsed with ``ast``), kept when they are
    3-10 lower-case letters, one token after a space, and used at least ``min_count`` times; sorted."""
    import ast
    from collections import Counter

    from train.bundled_model.build_corpus import FILE_SEPARATOR

    counts: Counter[str] = Counter()
    for source in train_file.read_text(encoding="utf-8").split(FILE_SEPARATOR):
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue  # a few test files are deliberately invalid Python
        for node in ast.walk(tree):
            if isinstance(node, ast.arguments):
                counts.update(a.arg for a in node.posonlyargs + node.args + node.kwonlyargs)
    return sorted(
        name for name, c in counts.items()
        if c >= min_count and re.fullmatch(r"[a-z]{3,10}", name) and name not in _EXCLUDED
        and len(tokenizer(" " + name, add_special_tokens=False)["input_ids"]) == 1
    )


def name_pool(tokenizer, names_file: Path | None = None) -> list[str]:
    """The argument names prompts draw from: ``names_file`` (a JSON list, as written by
    :func:`collect_arg_names`) or, by default, ``docstring_names.json`` beside the tokenizer."""
    path = names_file or Path(tokenizer.name_or_path) / NAMES_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"No argument-name list at {path}; write it with `python -m train.bundled_model.eval_tasks "
            "--write-names --corpus CORPUS_DIR --model MODEL_DIR`."
        )
    return json.loads(path.read_text())


def docstring_prompt(func: str, args: list[str], documented: list[str], words: list[str]) -> str:
    """The docstring-task prompt: signature with ``args``, docstring documenting ``documented``."""
    lines = [f"def {func}(self, {', '.join(args)}):", f'    """{words[0]} {words[1]} {words[2]}', ""]
    for i, name in enumerate(documented):
        lines.append(f"    :param {name}: {words[3 + 2 * i]} {words[4 + 2 * i]}")
    return "\n".join(lines) + "\n    :param"


def forwarding_prompt(func: str, args: list[str], passed: list[str], callee: str) -> str:
    """The argument-forwarding prompt: a method passes ``passed`` on, and the model names the next
    argument: ``def f(self, a, b, c, d):\n    return self._g(a, b,`` -> `` c``."""
    return f"def {func}(self, {', '.join(args)}):\n    return self._{callee}({', '.join(passed)},"


TASKS = ("docstring", "forwarding")


def task_pairs(task: str, tokenizer, n: int, seed: int, names_file: Path | None = None) -> list[dict]:
    """``n`` clean/corrupt pairs ``{"clean", "corrupt", "answer", "distractor", "args"}`` of ``task``
    (``docstring`` or ``forwarding``); answers lead with a space. Names come from :func:`name_pool`,
    random combinations that the corpus does not hold. The corrupt prompt renames every argument in the
    signature (same token count), so the clean answer is no longer an argument; its distractor is the
    corrupt prompt's own answer."""
    if task not in TASKS:
        raise ValueError(f"Unknown task {task!r}; choose one of {TASKS}.")
    pool = name_pool(tokenizer, names_file)
    rng = random.Random(seed)
    pairs = []
    while len(pairs) < n:
        names = rng.sample(pool, 2 * N_ARGS + 1 + 3 + 2 * N_DOCUMENTED)
        args, fresh, func = names[:N_ARGS], names[N_ARGS:2 * N_ARGS], names[2 * N_ARGS]
        words = names[2 * N_ARGS + 1:]
        if task == "docstring":
            documented = args[:N_DOCUMENTED]
            clean = docstring_prompt(func, args, documented, words)
            corrupt = docstring_prompt(func, fresh, documented, words)
        else:
            clean = forwarding_prompt(func, args, args[:N_DOCUMENTED], words[0])
            corrupt = forwarding_prompt(func, fresh, args[:N_DOCUMENTED], words[0])
        if len(tokenizer(clean)["input_ids"]) != len(tokenizer(corrupt)["input_ids"]):
            continue  # cannot happen with single-token names, but the task format requires equal lengths
        pairs.append({"clean": clean, "corrupt": corrupt, "answer": " " + args[N_DOCUMENTED],
                      "distractor": " " + fresh[N_DOCUMENTED], "args": [" " + a for a in args]})
    return pairs


def docstring_pairs(tokenizer, n: int, seed: int, names_file: Path | None = None) -> list[dict]:
    """``n`` pairs of the docstring task (see :func:`task_pairs`)."""
    return task_pairs("docstring", tokenizer, n, seed, names_file)


def _first_token(tokenizer, text: str) -> int:
    return tokenizer(text, add_special_tokens=False)["input_ids"][0]


@torch.no_grad()
def last_logits(logits_fn: LogitsFn, tokenizer, prompts: list[str]) -> torch.Tensor:
    """Logits at each prompt's last position, ``[n_prompts, d_vocab]`` (prompts batched by length)."""
    encoded = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    out: list[torch.Tensor | None] = [None] * len(prompts)
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    for idx in by_length.values():
        logits = logits_fn(torch.stack([encoded[i] for i in idx]))[:, -1]
        for row, i in enumerate(idx):
            out[i] = logits[row]
    return torch.stack(out)


@torch.no_grad()
def docstring_scores(logits_fn: LogitsFn, tokenizer, pairs: list[dict]) -> dict:
    """Per-pair results and summary accuracies of the docstring task.

    ``top1``: the answer is the argmax over the whole vocabulary; ``vs_args``: it beats the other
    signature arguments; ``logit_diff``: answer minus distractor on the clean and the corrupt prompt.
    """
    clean = last_logits(logits_fn, tokenizer, [p["clean"] for p in pairs])
    corrupt = last_logits(logits_fn, tokenizer, [p["corrupt"] for p in pairs])
    answer = torch.tensor([_first_token(tokenizer, p["answer"]) for p in pairs])
    distractor = torch.tensor([_first_token(tokenizer, p["distractor"]) for p in pairs])
    args = torch.tensor([[_first_token(tokenizer, a) for a in p["args"]] for p in pairs])
    rows = torch.arange(len(pairs))
    top1 = clean.argmax(-1) == answer
    vs_args = clean.gather(1, args).argmax(-1) == N_DOCUMENTED
    ld_clean = clean[rows, answer] - clean[rows, distractor]
    ld_corrupt = corrupt[rows, answer] - corrupt[rows, distractor]
    return {
        "top1": top1, "vs_args": vs_args, "logit_diff_clean": ld_clean, "logit_diff_corrupt": ld_corrupt,
        "top1_acc": top1.float().mean().item(), "vs_args_acc": vs_args.float().mean().item(),
        "mean_logit_diff_clean": ld_clean.mean().item(), "mean_logit_diff_corrupt": ld_corrupt.mean().item(),
    }


def induction_tokens(n: int, length: int, seed: int, bos: int, vocab_size: int, low: int = 257) -> torch.Tensor:
    """``[n, 1 + 2 * length]``: BOS then a random sequence of ids in ``[low, vocab_size)`` twice (no repeats
    inside one copy, so the only way to predict the second copy is to copy from the first)."""
    gen = torch.Generator().manual_seed(seed)
    seqs = torch.stack([torch.randperm(vocab_size - low, generator=gen)[:length] + low for _ in range(n)])
    return torch.cat([torch.full((n, 1), bos), seqs, seqs], dim=1)


@torch.no_grad()
def induction_accuracy(logits_fn: LogitsFn, tokens: torch.Tensor) -> dict:
    """Top-1 accuracy on the repeated half (predicting copy tokens 2..L) and on the first half as control."""
    length = (tokens.shape[1] - 1) // 2
    preds = logits_fn(tokens).argmax(-1)  # [n, 1 + 2L]
    # position p predicts token p + 1; second copy tokens 2..L sit at 2 + length .. 2 * length
    second = preds[:, length + 1:2 * length] == tokens[:, length + 2:]
    first = preds[:, 1:length] == tokens[:, 2:length + 1]
    return {"repeat_acc": second.float().mean().item(), "first_half_acc": first.float().mean().item()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("featcircuits/pretrained/bundled"))
    parser.add_argument("--n", type=int, default=300, help="prompts to score per task")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--write-task", type=Path, default=None,
                        help="write up to --task-size pairs of --task the model gets right (top-1) on clean")
    parser.add_argument("--task", choices=TASKS, default="docstring", help="the task --write-task writes")
    parser.add_argument("--task-size", type=int, default=50)
    parser.add_argument("--write-names", action="store_true", help=f"write MODEL/{NAMES_FILE} from --corpus")
    parser.add_argument("--corpus", type=Path, default=Path("runs/bundled_corpus"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.write_names:
        from transformers import AutoTokenizer

        names = collect_arg_names(args.corpus / "train.txt", AutoTokenizer.from_pretrained(str(args.model)))
        (args.model / NAMES_FILE).write_text(json.dumps(names) + "\n")
        print(f"wrote {len(names)} names to {args.model / NAMES_FILE}")
        return 0
    from featcircuits import load_model

    model = load_model(args.model)
    tok = model.tokenizer
    summary: dict = {}
    scores_of = {}
    for task in TASKS:
        pairs = task_pairs(task, tok, args.n, args.seed)
        scores_of[task] = (pairs, docstring_scores(model, tok, pairs))
        summary.update({f"{task}_{k}": round(v, 4) for k, v in scores_of[task][1].items()
                        if not isinstance(v, torch.Tensor)})
    ind = induction_accuracy(model, induction_tokens(64, 20, args.seed, tok.bos_token_id, len(tok)))
    print(json.dumps({"n_prompts": args.n, **summary, **{k: round(v, 4) for k, v in ind.items()}}))
    if args.write_task:
        pairs, scores = scores_of[args.task]
        keep = scores["top1"] & (scores["logit_diff_clean"] > 0) & (scores["logit_diff_corrupt"] < 0)
        task = [{k: p[k] for k in ("clean", "corrupt", "answer", "distractor")}
                for p, ok in zip(pairs, keep.tolist(), strict=True) if ok][:args.task_size]
        args.write_task.write_text(json.dumps(task, indent=1) + "\n")
        print(f"wrote {len(task)} pairs to {args.write_task}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
