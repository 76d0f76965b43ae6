"""Contrastive tasks and the metrics circuits are judged by.

A task is a list of pairs ``{"clean", "corrupt", "answer", "distractor"}``: text (tokenised with the
model's tokenizer, BOS prepended) or token ids. ``answer`` and ``distractor`` must each be one token: text
answers are tokenised in the context of the clean prompt (:func:`continuation_token`), so ``" Lily"`` gives
the token the model predicts after the prompt on every tokenizer family.
Pairs are right-padded to one length so they batch; the model is causal, so padding after a prompt
changes nothing before it, and every metric reads each prompt at its own last token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["ContrastiveTask", "continuation_token", "load_task", "METRICS", "logit_diff", "prob_diff", "kl_to_clean",
           "l2_to_clean", "is_distance"]

ALIGNMENTS = (None, "start")


def _tokenize(model: Any, value: str | Sequence[int], what: str, prepend_bos: bool) -> list[int]:
    if isinstance(value, str):
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"{what} is text but the model has no tokenizer; give token ids (a list of ints).")
        return [int(t) for t in model.to_tokens(value, prepend_bos=prepend_bos)[0].tolist()]
    # (a bool is an int to Python, but true/false in a task file is a mistake, not a token id)
    if not isinstance(value, Sequence) or not value or not all(isinstance(t, int) and not isinstance(t, bool)
                                                               for t in value):
        raise ValueError(f"{what} must be text or a non-empty list of token ids, got {value!r}.")
    return [int(t) for t in value]


_WORD_START_MARKERS = ("\u2581", "\u0120")  # SentencePiece's "▁", byte-level BPE's "Ġ"


def _pieces(model: Any, ids: Sequence[int]) -> list[str]:
    return [str(piece) for piece in model.tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _joined(model: Any, context: str, answer: str) -> str:
    """``context + answer`` as the tokenizer reads a bare answer.

    Tokenizers that mark a bare word as a word start (SentencePiece with a dummy prefix, as Llama's;
    byte-level BPE with ``add_prefix_space``) read ``"Lily"`` as the word " Lily": there an answer that
    begins with a letter or digit follows the prompt after a space, so ``"Lily"`` and ``" Lily"`` are one
    answer. Elsewhere (GPT-2, Gemma) the answer is appended as written: ``"Lily"`` continues the last word.
    """
    if not context or context[-1].isspace() or not answer or not answer[0].isalnum():
        return context + answer
    alone = model.to_tokens(answer, prepend_bos=False)[0].tolist()
    marked = bool(alone) and _pieces(model, alone[:1])[0].startswith(_WORD_START_MARKERS)
    return context + " " + answer if marked else context + answer


def _prompt_text(model: Any, prompt: str | Sequence[int], what: str, prepend_bos: bool) -> tuple[str, bool]:
    """The prompt as text, and the ``prepend_bos`` that tokenises it back to the task's tokens."""
    if isinstance(prompt, str):
        return prompt, prepend_bos
    ids = [int(t) for t in prompt]
    bos = bool(ids) and ids[0] == getattr(model.tokenizer, "bos_token_id", None)
    text = model.tokenizer.decode(ids[1:] if bos else ids)
    if model.to_tokens(text, prepend_bos=bos)[0].tolist() != ids:
        raise ValueError(
            f"{what} is text but its prompt is token ids that do not decode to text tokenising back to the same "
            "ids, so the answer cannot be tokenised in context; give the answer as a token id, or the prompt as text."
        )
    return text, bos


def _check_fits(source: str, cfg: Any, prompts: list[list[int]], tokens: list[int]) -> None:
    """Every prompt within the model's context and every token id inside its vocabulary."""
    longest = max(map(len, prompts))
    if longest > cfg.n_ctx:
        raise ValueError(f"{source}: a prompt is {longest} tokens but the model's context is {cfg.n_ctx}; shorten it.")
    bad = sorted({t for row in prompts for t in row if not 0 <= t < cfg.d_vocab}
                 | {t for t in tokens if not 0 <= t < cfg.d_vocab})
    if bad:
        raise ValueError(f"{source}: token id(s) {bad[:5]} are outside the model's vocabulary [0, {cfg.d_vocab}).")


def continuation_token(model: Any, prompt: str | Sequence[int], answer: str | int | Sequence[int],
                       what: str = "answer", prepend_bos: bool = True) -> int:
    """The one token ``answer`` adds after ``prompt``: the token the model predicts next.

    Text answers are tokenised in context: ``prompt`` and ``prompt + answer`` (see :func:`_joined` for
    bare words) are both tokenised and the answer's token is the first past their common prefix, so
    ``" Lily"`` is ``▁Lily`` on a SentencePiece tokenizer (alone it would tokenise to a stray ``▁`` first)
    and ``ĠLily`` on GPT-2's. Raises ``ValueError`` naming the answer and its tokens when it adds no token,
    several tokens, or merges with the end of the prompt. Token ids (an int or a one-id list) pass through.
    """
    if isinstance(answer, bool):
        raise ValueError(f"{what} is {answer!r}: give the answer as text or a token id, not true/false.")
    if isinstance(answer, int):
        return answer
    if isinstance(answer, Sequence) and not isinstance(answer, str):
        if len(answer) != 1:
            raise ValueError(f"{what} {answer!r} is {len(answer)} tokens; it must be a single token id.")
        return int(answer[0])
    if getattr(model, "tokenizer", None) is None:
        raise ValueError(f"{what} is text but the model has no tokenizer; give a token id.")
    context, bos = _prompt_text(model, prompt, what, prepend_bos)
    before = model.to_tokens(context, prepend_bos=bos)[0].tolist() if context or bos else []
    full = _joined(model, context, answer)
    after = model.to_tokens(full, prepend_bos=bos)[0].tolist() if full or bos else []
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    added = after[common:]
    if common < len(before):
        raise ValueError(
            f"{what} {answer!r} merges with the end of its prompt {context[-30:]!r}: the prompt ends in tokens "
            f"{_pieces(model, before[common:])} but {full[-40:]!r} tokenises to {_pieces(model, added)} there, so "
            "no token of the answer follows the prompt's tokens. End the prompt at a token boundary (move a "
            "trailing space into the answer), or give the answer's token id."
        )
    if not added:
        raise ValueError(
            f"{what} {answer!r} adds no token after its prompt {context[-30:]!r} (the tokenizer drops it); "
            "give a non-empty answer that is one token, or its token id."
        )
    if len(added) != 1:
        raise ValueError(
            f"{what} {answer!r} is not a single token: it tokenises to {len(added)} tokens {_pieces(model, added)} "
            f"after its prompt {context[-30:]!r}. Choose a word that is one token of this tokenizer there, or give "
            "its token id."
        )
    return int(added[0])


@dataclass
class ContrastiveTask:
    """A batch of clean/corrupt prompt pairs with an answer and a distractor token each.

    Attributes (``n`` pairs, ``pos`` the longest prompt):
        clean_tokens, corrupt_tokens: ``[n, pos]`` right-padded token ids.
        clean_last, corrupt_last: ``[n]`` index of each prompt's last real token.
        answers, distractors: ``[n]`` token ids (``distractors`` is ``None`` when no pair has one).
    """

    clean_tokens: torch.Tensor
    corrupt_tokens: torch.Tensor
    clean_last: torch.Tensor
    corrupt_last: torch.Tensor
    answers: torch.Tensor
    distractors: torch.Tensor | None
    pairs: list[dict[str, Any]]

    @classmethod
    def from_pairs(
        cls,
        model: Any,
        pairs: Sequence[dict[str, Any]],
        alignment: str | None = None,
        prepend_bos: bool = True,
        pad_token: int = 0,
        source: str = "task",
    ) -> ContrastiveTask:
        """Tokenise ``pairs``; with ``alignment=None`` clean and corrupt prompts must match in length.

        ``alignment="start"`` accepts unequal lengths: prompts are aligned at their first token and
        patching maps position ``p`` of the corrupt run onto position ``p`` of the clean run.
        """
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment={alignment!r}; choose one of {ALIGNMENTS}.")
        if not pairs:
            raise ValueError(f"{source} has no pairs; a task needs at least one clean/corrupt pair.")
        clean, corrupt, answers, distractors = [], [], [], []
        for index, pair in enumerate(pairs):
            where = f"{source} pair {index}"
            missing = [key for key in ("clean", "corrupt", "answer") if key not in pair]
            if missing:
                raise ValueError(f"{where} lacks {missing}; each pair needs clean, corrupt, answer (and distractor).")
            clean_ids = _tokenize(model, pair["clean"], f"{where} clean", prepend_bos)
            corrupt_ids = _tokenize(model, pair["corrupt"], f"{where} corrupt", prepend_bos)
            if len(clean_ids) != len(corrupt_ids) and alignment is None:
                raise ValueError(
                    f"{where}: clean prompt {pair['clean']!r} is {len(clean_ids)} tokens but corrupt prompt "
                    f"{pair['corrupt']!r} is {len(corrupt_ids)}; position-wise patching needs equal lengths. "
                    "Reword one of them, or pass alignment='start' to align the prompts at their first token."
                )
            clean.append(clean_ids)
            corrupt.append(corrupt_ids)
            # answers are read at the clean prompt's last token: tokenised in its context
            answers.append(continuation_token(model, pair["clean"], pair["answer"], f"{where} answer", prepend_bos))
            if pair.get("distractor") is not None:
                distractors.append(continuation_token(model, pair["clean"], pair["distractor"], f"{where} distractor",
                                                      prepend_bos))
        if distractors and len(distractors) != len(pairs):
            raise ValueError(f"{source}: either every pair has a distractor or none does.")
        cfg = getattr(model, "cfg", None)
        if cfg is not None:
            _check_fits(source, cfg, clean + corrupt, answers + distractors)
        width = max(max(map(len, clean)), max(map(len, corrupt)))
        lengths = {len(row) for row in clean + corrupt}
        if len(lengths) > 1 and getattr(getattr(model, "cfg", None), "attention_dir", "causal") != "causal":
            raise ValueError(
                f"{source}: prompts have lengths {sorted(lengths)} but the model's attention is bidirectional, "
                "so padding would change every position. Give prompts of one length."
            )

        def pad(rows: list[list[int]]) -> torch.Tensor:
            return torch.tensor([row + [pad_token] * (width - len(row)) for row in rows], dtype=torch.long)

        device = getattr(getattr(model, "cfg", None), "device", None) or "cpu"
        return cls(
            clean_tokens=pad(clean).to(device),
            corrupt_tokens=pad(corrupt).to(device),
            clean_last=torch.tensor([len(r) - 1 for r in clean], device=device),
            corrupt_last=torch.tensor([len(r) - 1 for r in corrupt], device=device),
            answers=torch.tensor(answers, device=device),
            distractors=torch.tensor(distractors, device=device) if distractors else None,
            pairs=[dict(p) for p in pairs],
        )

    def __len__(self) -> int:
        return self.clean_tokens.shape[0]

    def last_logits(self, logits: torch.Tensor, corrupt: bool = False, offset: int = 0) -> torch.Tensor:
        """``[copies * n, pos, ...] -> [copies, n, ...]`` at each prompt's last token (logits, or any per-token vector).

        The batch may hold several copies of the task (one per ablation pattern), copy-major. ``offset``: the
        batch holds positions from ``offset`` on (a forward after cached positions).
        """
        n = len(self)
        copies = logits.shape[0] // n
        last = (self.corrupt_last if corrupt else self.clean_last).repeat(copies) - offset
        rows = torch.arange(logits.shape[0], device=logits.device)
        return logits[rows, last].reshape(copies, n, -1)


# ---- metrics: (task, last_logits [copies, n, vocab], clean_last [n, vocab] | None) -> [copies] ----


def _gather(last: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return last.gather(-1, ids.view(1, -1, 1).expand(last.shape[0], -1, 1))[..., 0]


def logit_diff(task: ContrastiveTask, last: torch.Tensor, clean_last: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of answer logit minus distractor logit (just the answer logit without distractors)."""
    value = _gather(last, task.answers)
    if task.distractors is not None:
        value = value - _gather(last, task.distractors)
    return value.mean(-1)


def prob_diff(task: ContrastiveTask, last: torch.Tensor, clean_last: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of p(answer) - p(distractor) at the last token."""
    probs = last.softmax(-1)
    value = _gather(probs, task.answers)
    if task.distractors is not None:
        value = value - _gather(probs, task.distractors)
    return value.mean(-1)


def kl_to_clean(task: ContrastiveTask, last: torch.Tensor, clean_last: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of KL(clean model || this run) at the last token (0 for the full model)."""
    if clean_last is None:
        raise ValueError("The KL metric needs the clean model's logits.")
    log_q = last.log_softmax(-1)
    log_p = clean_last.log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)


def l2_to_clean(task: ContrastiveTask, last: torch.Tensor, clean_last: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over pairs of the squared distance between this run's last-token logits and the clean model's
    (0 for the full model). For outputs with no answer/distractor contrast, such as a numerical output:
    an ablation that raises the output on one pair and lowers it on another moves this metric, where the
    mean of the answer logit (``logit_diff`` without distractors) would see the two cancel."""
    if clean_last is None:
        raise ValueError("The L2 metric needs the clean model's logits.")
    return (last - clean_last).pow(2).sum(-1).mean(-1)


Metric = Callable[[ContrastiveTask, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "prob_diff": prob_diff, "kl": kl_to_clean, "l2": l2_to_clean}
# Distances from the clean model: 0 at the full model and at their minimum there, so their gradient at the
# clean run is zero and attribution patching (a first-order estimate taken there) scores every unit 0.
_DISTANCES = (kl_to_clean, l2_to_clean)


def is_distance(metric: str | Metric) -> bool:
    """Whether ``metric`` is one of the library's distances from the clean model (``kl``, ``l2``): see
    ``_DISTANCES``. A function of your own (or a wrapped one) is not recognised: attribution patching
    under a distance of your own scores every unit 0."""
    return get_metric(metric) in _DISTANCES


def get_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric not in METRICS:
        raise ValueError(f"Unknown metric {metric!r}; choose one of {sorted(METRICS)} or pass a function.")
    return METRICS[metric]


def load_task(path: str | Path, model: Any, alignment: str | None = None) -> ContrastiveTask:
    """Read a task JSON file: a list of pairs, or ``{"pairs": [...], "alignment": ...}``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No task file at {path}; write a JSON list of clean/corrupt/answer pairs.")
    text = path.read_text().strip()
    if not text:
        raise ValueError(f"Task file {path} is empty; write a JSON list of clean/corrupt/answer pairs.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"Task file {path} is not valid JSON: {err}.") from err
    if isinstance(data, dict):
        alignment = data.get("alignment", alignment)
        data = data.get("pairs")
    if not isinstance(data, list):
        raise ValueError(f"Task file {path} must hold a list of pairs (or an object with a 'pairs' list).")
    return ContrastiveTask.from_pairs(model, data, alignment=alignment, source=f"task file {path}")
