"""Contrastive tasks, metrics and the Circuit type: behaviour against direct model runs and hand values."""

from __future__ import annotations

import json

import pytest
import torch

from featcircuits.circuits import Circuit, ContrastiveTask, load_task, roc_auc
from featcircuits.circuits.evaluation import area_under
from featcircuits.circuits.tasks import is_distance, kl_to_clean, l2_to_clean, logit_diff, prob_diff

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def test_metrics_match_direct_model_logits(stories_model):
    model = stories_model
    pairs = [{"clean": "Lily had a good friend. She loved her", "corrupt": "Lily had a good mom. She loved her",
              "answer": "friend", "distractor": "mom"}]
    task = ContrastiveTask.from_pairs(model, pairs)
    logits = model(task.clean_tokens).detach()
    last = task.last_logits(logits)
    friend, mom = model.to_single_token("friend"), model.to_single_token("mom")
    expected = logits[0, -1, friend] - logits[0, -1, mom]
    assert torch.allclose(logit_diff(task, last), expected.view(1))
    probs = logits[0, -1].softmax(-1)
    assert torch.allclose(prob_diff(task, last), (probs[friend] - probs[mom]).view(1))
    assert kl_to_clean(task, last, last[0]).abs().item() < 1e-6
    corrupt = task.last_logits(model(task.corrupt_tokens).detach())
    assert kl_to_clean(task, corrupt, last[0]).item() > 0


def test_l2_metric_sees_effects_that_cancel_in_the_mean_logit(stories_model):
    """Two pairs, one output moved up and the other down by the same amount: the mean answer logit (no
    distractor) does not move; the squared distance to the clean logits does, by the hand-computed amount."""
    pairs = [{"clean": "Lily had a ball", "corrupt": "Lily had a cat", "answer": 7},
             {"clean": "Tim had a dog", "corrupt": "Tim had a cat", "answer": 7}]
    task = ContrastiveTask.from_pairs(stories_model, pairs)
    clean = task.last_logits(stories_model(task.clean_tokens).detach())[0]  # [2, vocab]
    moved = clean.clone()
    moved[0, 7] += 0.5
    moved[1, 7] -= 0.5
    moved[1, 3] += 2.0
    assert logit_diff(task, moved[None]).item() == pytest.approx(logit_diff(task, clean[None]).item(), abs=1e-5)
    assert l2_to_clean(task, clean[None], clean).item() == 0.0
    assert l2_to_clean(task, moved[None], clean).item() == pytest.approx((0.25 + 0.25 + 4.0) / 2, rel=1e-5)
    assert is_distance("l2") and is_distance(kl_to_clean) and not is_distance("logit_diff")


def test_pairs_of_different_lengths_are_padded_and_read_at_their_own_last_token(stories_model):
    model = stories_model
    pairs = [{"clean": "Lily had a ball", "corrupt": "Lily had a cat", "answer": 1},
             {"clean": "Once upon a time there was a dog", "corrupt": "Once upon a time there was a cat", "answer": 1}]
    task = ContrastiveTask.from_pairs(model, pairs)
    assert task.clean_tokens.shape[0] == 2 and task.clean_last[0] < task.clean_last[1]
    batched = task.last_logits(model(task.clean_tokens).detach())[0, 0]
    alone = model(pairs[0]["clean"]).detach()[0, -1]
    assert torch.allclose(batched, alone, atol=1e-4)  # right padding never reaches earlier positions


def test_bad_tasks_raise_clear_errors(stories_model, tmp_path):
    model = stories_model
    with pytest.raises(ValueError, match="pair 0: clean prompt .* is 4 tokens but corrupt prompt"):
        ContrastiveTask.from_pairs(model, [{"clean": "Lily had a", "corrupt": "Lily had a big dog", "answer": "big"}])
    aligned = ContrastiveTask.from_pairs(model, [{"clean": "Lily had a", "corrupt": "Lily had a big dog",
                                                  "answer": "big"}], alignment="start")
    assert aligned.corrupt_last[0] > aligned.clean_last[0]
    with pytest.raises(ValueError, match=r"pair 1 answer 'Tom' is not a single token: it tokenises to 2"):
        ContrastiveTask.from_pairs(model, [{"clean": "a", "corrupt": "b", "answer": "big"},
                                           {"clean": "a", "corrupt": "b", "answer": "Tom"}])
    empty = tmp_path / "empty.json"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        load_task(empty, model)
    no_pairs = tmp_path / "none.json"
    no_pairs.write_text("[]")
    with pytest.raises(ValueError, match="has no pairs"):
        load_task(no_pairs, model)
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_task(broken, model)
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"pairs": [{"clean": "Lily had a", "corrupt": "Tim had a", "answer": "big",
                                           "distractor": "mom"}]}))
    assert len(load_task(good, model)) == 1


def test_roc_auc_and_areas_against_hand_computed_values():
    # positives {0.9, 0.4}, negatives {0.5, 0.1, 0.4}: pairs won 1+1+1 + 0+1+0.5 -> 4.5 / 6
    assert roc_auc([0.9, 0.5, 0.4, 0.1, 0.4], [True, False, True, False, False]) == pytest.approx(4.5 / 6)
    assert roc_auc([3, 2, 1], [True, True, False]) == 1.0
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        roc_auc([1, 2], [True, True])
    assert area_under([0, 0.5, 1], [0, 1, 1]) == pytest.approx(0.75)


def test_circuit_selection_and_json_roundtrip(tmp_path):
    circuit = Circuit("atp", "nodes", ["L0.H0", "L0.H1", "L0.MLP"], [0.1, -2.0, 0.5],
                      [("L0.H0", "L0.MLP"), ("L0.H1", "L0.MLP")], None)
    top = circuit.top_k(2)
    assert top.nodes == ["L0.H1", "L0.MLP"] and top.edges == [("L0.H1", "L0.MLP")]
    assert circuit.threshold(0.4).nodes == ["L0.H1", "L0.MLP"]
    top.save(tmp_path / "c.json")
    loaded = Circuit.load(tmp_path / "c.json")
    assert loaded.nodes == top.nodes and loaded.edges == top.edges and loaded.node_scores == top.node_scores
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="format_version"):
        Circuit.load(tmp_path / "bad.json")
