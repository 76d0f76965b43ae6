"""The bundled model (featcircuits/pretrained/bundled, package data): loads through featcircuits, matches
transformers, has learned its corpus (held-out standard-library files), and its task skills on held-out
prompts from train/bundled_model/eval_tasks.py.

The shipped model (4000 steps, 16.4M tokens; its last 1000 steps mix in derived ``:param`` docstrings
and synthetic repeated sequences, train/README.md) does the docstring task (top-1 0.66 on this file's
prompts, logit difference +9.7 clean and -7.6 with the signature renamed), argument forwarding (top-1 0.92)
and plain induction (random-token top-1 1.00 on the second copy against 0.00 on the first).
"""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from featcircuits._resources import pretrained_path
from train.bundled_model import eval_tasks
from train.bundled_model.build_corpus import is_validation, stdlib_files

BUNDLED = pretrained_path("bundled")  # where the library finds it
TEST_SEED = 2  # docstring_task.json was drawn with seed 1; these prompts are different ones


@pytest.fixture(scope="module")
def bundled():
    from featcircuits import load_model

    if not (BUNDLED / "model.safetensors").exists():
        pytest.fail(f"The bundled model is missing at {BUNDLED}; see train/README.md to rebuild it.")
    return load_model(BUNDLED)


@pytest.fixture(scope="module")
def hf_bundled():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(BUNDLED)).eval()


def test_logits_match_transformers(bundled, hf_bundled):
    prompts = [
        "import os\n\ndef read(path, mode='r'):\n    with open(path, mode) as f:\n        return f.read()\n",
        eval_tasks.docstring_pairs(bundled.tokenizer, 1, TEST_SEED)[0]["clean"],
    ]
    for prompt in prompts:
        tokens = bundled.to_tokens(prompt)
        with torch.no_grad():
            ours = bundled(tokens)
            theirs = hf_bundled(tokens).logits
        assert ours.shape == theirs.shape == (1, tokens.shape[1], bundled.cfg.d_vocab)
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_tokenizer_prepends_bos_and_round_trips(bundled):
    tok = bundled.tokenizer
    text = 'def f(self, key, value):\n    """Set key."""\n\tself[key] = value  # é ✓\n'
    tokens = bundled.to_tokens(text)[0]
    assert tokens[0].item() == tok.bos_token_id == 0
    assert (tokens == tok.bos_token_id).sum().item() == 1
    assert bundled.to_string(tokens[1:]) == text
    # the prompts' argument names are single tokens after a space, so an answer is one prediction
    for name in eval_tasks.name_pool(tok)[:50]:
        assert len(tok(" " + name, add_special_tokens=False)["input_ids"]) == 1


def test_learned_the_corpus_on_held_out_files(bundled):
    """Next-token loss on validation-split standard-library files (never trained on) is far below the
    uniform model's log(vocab) (8.32 nats; a random initialisation scores that too) and near the value
    measured after training (3.17 nats, top-1 0.42; the 900-step model scored 3.80 and 0.32)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    ids: list[int] = []
    for rel in (p for p in stdlib_files(root) if is_validation(p)):
        ids += bundled.tokenizer((root / rel).read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        if len(ids) >= 4 * 255:
            break
    body = torch.tensor(ids[: 4 * 255]).view(4, 255)
    tokens = torch.cat([torch.full((4, 1), bundled.tokenizer.bos_token_id), body], dim=1)
    with torch.no_grad():
        logits = bundled(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()
    top1 = (logits[:, :-1].argmax(-1) == tokens[:, 1:]).float().mean().item()
    assert loss < 0.55 * math.log(bundled.cfg.d_vocab), loss
    assert loss < 3.4 and top1 > 0.38, (loss, top1)


def test_argument_forwarding_uses_the_signature(bundled):
    """Measured on these 50 prompts: top-1 0.92, beats the other arguments 0.96 (chance 0.25), logit
    difference answer - distractor +7.7 clean and -2.8 once the signature's arguments are renamed."""
    pairs = eval_tasks.task_pairs("forwarding", bundled.tokenizer, 50, TEST_SEED)
    scores = eval_tasks.docstring_scores(bundled, bundled.tokenizer, pairs)
    assert scores["top1_acc"] >= 0.7, scores["top1_acc"]
    assert scores["vs_args_acc"] >= 0.8, scores["vs_args_acc"]
    assert scores["mean_logit_diff_clean"] > 4.0 and scores["mean_logit_diff_corrupt"] < -1.5, scores


def test_docstring_task_competence(bundled):
    """Measured on these 50 prompts: top-1 0.66, beats the other arguments 0.66 (chance 0.25), logit
    difference +9.7 clean and -7.6 corrupt."""
    pairs = eval_tasks.docstring_pairs(bundled.tokenizer, 50, TEST_SEED)
    scores = eval_tasks.docstring_scores(bundled, bundled.tokenizer, pairs)
    assert scores["top1_acc"] >= 0.45, scores["top1_acc"]
    assert scores["vs_args_acc"] >= 0.5, scores["vs_args_acc"]
    # renaming the signature's arguments moves the prediction to the corrupt prompt's own answer
    assert scores["mean_logit_diff_clean"] > 1.0 > -1.0 > scores["mean_logit_diff_corrupt"]


def test_induction_competence(bundled):
    """A random 20-token sequence repeated: its second copy is predicted (measured 1.00 on these 32
    sequences) and its first never is (0.00), so the model copies from context."""
    tok = bundled.tokenizer
    tokens = eval_tasks.induction_tokens(32, 20, TEST_SEED, tok.bos_token_id, len(tok))
    acc = eval_tasks.induction_accuracy(bundled, tokens)
    assert acc["repeat_acc"] >= 0.8, acc
    assert acc["first_half_acc"] < 0.1, acc  # control: unpredictable without a copy to read


@pytest.mark.parametrize("name", ["docstring", "forwarding"])
def test_task_files_are_right_on_clean(bundled, name):
    """featcircuits/pretrained/bundled/{docstring,forwarding}_task.json (the demo's tasks) hold only pairs
    the model gets right."""
    path = BUNDLED / f"{name}_task.json"
    task = json.loads(path.read_text())
    assert len(task) >= 40
    assert all(set(pair) == {"clean", "corrupt", "answer", "distractor"} for pair in task)
    tok = bundled.tokenizer
    for pair in task:
        assert bundled.to_tokens(pair["clean"]).shape == bundled.to_tokens(pair["corrupt"]).shape
    clean = eval_tasks.last_logits(bundled, tok, [p["clean"] for p in task])
    corrupt = eval_tasks.last_logits(bundled, tok, [p["corrupt"] for p in task])
    answer = torch.tensor([tok(p["answer"], add_special_tokens=False)["input_ids"][0] for p in task])
    distractor = torch.tensor([tok(p["distractor"], add_special_tokens=False)["input_ids"][0] for p in task])
    rows = torch.arange(len(task))
    assert torch.equal(clean.argmax(-1), answer)
    assert (clean[rows, answer] > clean[rows, distractor]).all()
    assert (corrupt[rows, answer] < corrupt[rows, distractor]).all()


def test_derived_docstrings_document_every_argument_in_order():
    from train.bundled_model.build_corpus import FILE_SEPARATOR
    from train.bundled_model.docstrings import derived_docstrings

    source = (
        "class C:\n"
        "    def send(self, method, url, body=None):\n"
        '        """Send a request.\n\n        More text."""\n'
        "    def one(self, only):\n        pass\n"
        "def free(alpha, beta):\n    return alpha\n"
    )
    snippets = derived_docstrings(source + FILE_SEPARATOR + "def broken(:\n", seed=0)
    assert len(snippets) == 2  # `one` has a single argument besides self; the invalid file is skipped
    by_name = {snippet.split("(")[0][4:]: snippet for snippet in snippets}
    lines = by_name["send"].splitlines()
    assert lines[:3] == ["def send(self, method, url, body):", '    """Send a request.', ""]
    assert [line.split(":")[1].split()[-1] for line in lines[3:6]] == ["method", "url", "body"]
    assert all(len(line.split(": ", 1)[1].split()) == 2 for line in lines[3:6]) and lines[6] == '    """'
    assert by_name["free"].startswith("def free(alpha, beta):\n")
    assert derived_docstrings(source, seed=0) == derived_docstrings(source, seed=0)  # deterministic


def test_training_batches_mix_docstrings_and_repeats_from_their_steps():
    """The decay-phase mix: before ``docstrings_from`` / ``induction_from`` every window is plain corpus; from
    then on the batch holds the configured numbers of docstring windows and of synthetic repeats, each a
    random sequence of allowed length repeated to fill the window, with BOS only in front."""
    from train.bundled_model.train_model import TrainConfig, training_batch

    bos, vocab = 0, 4096
    cfg = TrainConfig(seq_len=64, batch_size=16, docstrings_from=10, induction_from=20,
                      induction_min_len=5, induction_max_len=12)
    plain = torch.arange(1000, 3000)  # distinguishable from the docstring ids below
    docs = torch.arange(3000, 4000)
    gen = torch.Generator().manual_seed(0)

    def rows_from(batch, lo, hi):
        body = batch[:, 1:]
        return ((body >= lo) & (body < hi)).all(1)

    early = training_batch(plain, docs, bos, cfg, gen, 9, vocab)
    assert early.shape == (16, 64) and rows_from(early, 1000, 3000).all()
    middle = training_batch(plain, docs, bos, cfg, gen, 10, vocab)
    assert rows_from(middle, 3000, 4000).sum() == 4 and rows_from(middle, 1000, 3000).sum() == 12
    late = training_batch(plain, docs, bos, cfg, gen, 20, vocab)
    assert (late[:, 0] == bos).all() and rows_from(late, 3000, 4000).sum() == 4
    repeats = late[~(rows_from(late, 1000, 3000) | rows_from(late, 3000, 4000))]
    assert len(repeats) == 2
    for row in repeats[:, 1:]:
        assert (row != bos).all()
        periods = [n for n in range(5, 13) if torch.equal(row[n:], row[:-n])]
        assert periods and len(set(row[:periods[0]].tolist())) > 1, row
