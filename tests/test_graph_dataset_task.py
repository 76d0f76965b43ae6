"""build_dataset_graph takes a ContrastiveTask: its clean prompts, answers and distractors, as the list form."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.circuits import ContrastiveTask
from featcircuits.graph import ReplacementModel, build_dataset_graph

pytestmark = pytest.mark.usefixtures("single_torch_thread")

PAIRS = [  # prompts of different lengths, so the task right-pads the shorter ones
    {"clean": "Once upon a time, there was a little girl named", "answer": " Lily", "distractor": " Tim",
     "corrupt": "Once upon a time, there was a little boy named"},
    {"clean": "One day, a boy named", "corrupt": "One day, a fox named", "answer": "Tim", "distractor": "Lily"},
    {"clean": "The cat saw a girl named", "corrupt": "The cat saw a bird named", "answer": " Lily", "distractor": " Tim"},
]


def transcoder(layer: int) -> Dictionary:
    cfg = DictionaryConfig(d_in=64, d_sae=48, kind="transcoder", hook_in=f"blocks.{layer}.ln2.hook_normalized",
                           hook_out=f"blocks.{layer}.hook_mlp_out")
    made = Dictionary.from_config(cfg)
    with torch.no_grad():
        made.b_enc.fill_(-0.9)
    return made


@pytest.fixture(scope="module")
def dictionaries():
    torch.manual_seed(4)
    return [transcoder(layer) for layer in (0, 2, 4)]


def assert_same_graph(actual, expected) -> None:
    for f in dataclasses.fields(expected):
        mine, theirs = getattr(actual, f.name), getattr(expected, f.name)
        if isinstance(theirs, torch.Tensor):
            assert mine.dtype == theirs.dtype and torch.equal(mine, theirs), f.name
        elif f.name == "targets":
            assert [(t.name, t.bias, t.pos) for t in mine] == [(t.name, t.bias, t.pos) for t in theirs]
            assert all(torch.equal(a.vector, b.vector) for a, b in zip(mine, theirs, strict=True))
        else:
            assert mine == theirs, f.name


def test_task_form_equals_list_form(stories_model, dictionaries):
    rm = ReplacementModel(stories_model, dictionaries)
    task = ContrastiveTask.from_pairs(stories_model, PAIRS)
    assert len(set(task.clean_last.tolist())) == 3  # padded
    kwargs = dict(max_feature_nodes=25, batch_size=16, progress=False)
    from_task = build_dataset_graph(rm, task, **kwargs)
    clean = [pair["clean"] for pair in PAIRS]
    listed = build_dataset_graph(rm, prompts=clean, answers=task.answers.tolist(),
                                 distractors=task.distractors.tolist(), **kwargs)
    assert_same_graph(from_task, listed)
    assert from_task.n_prompts == 3 and from_task.n_features > 0
    # text answers in the list form are tokenised after their prompt, as the task does
    as_text = build_dataset_graph(rm, prompts=clean, answers=[p["answer"] for p in PAIRS],
                                  distractors=[p["distractor"] for p in PAIRS], **kwargs)
    assert_same_graph(as_text, listed)
    # a HookedTransformer with its dictionaries, the task by keyword
    assert_same_graph(build_dataset_graph(stories_model, dictionaries, prompts=task, **kwargs), listed)


def test_task_form_bad_input(stories_model, dictionaries):
    rm = ReplacementModel(stories_model, dictionaries)
    no_distractor = ContrastiveTask.from_pairs(stories_model, [{k: v for k, v in PAIRS[1].items() if k != "distractor"}])
    with pytest.raises(ValueError, match="The task has no distractors"):
        build_dataset_graph(rm, no_distractor, progress=False)
    task = ContrastiveTask.from_pairs(stories_model, PAIRS[1:])
    with pytest.raises(ValueError, match="carries its own answers and distractors"):
        build_dataset_graph(rm, prompts=task, answers=[1, 2], progress=False)
    with pytest.raises(ValueError, match="prompt 0 answer 'Tom' is not a single token"):
        build_dataset_graph(rm, prompts=["One day, a boy named"], answers=["Tom"], distractors=[" Lily"],
                            progress=False)
