"""Offline feature labels and their detection and fuzzing scores: synthetic features with a known trigger, a
fuzzing example worked by hand, then a stories260k transcoder feature built to fire on one token."""

from __future__ import annotations

import math

import pytest
import torch

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.explain import detection_score, fuzzing_score, label_dashboards, label_entry, score_labels
from featcircuits.explain.fuzzing import batched_scores, fuzzing_examples
from featcircuits.viz.dashboards import compute_dashboards


def _entry(tokens: torch.Tensor, acts: torch.Tensor, names: list[str], k: int = 8, promoted=None) -> dict:
    """A dashboard entry built by hand: the top-k activations with the token at each (focus 0)."""
    top = acts.topk(k)
    contexts = [{"act": float(a), "focus": 0, "tokens": [names[int(tokens[i])]], "acts": [float(a)]}
                for a, i in zip(top.values, top.indices, strict=True) if a > 0]
    return {"top_contexts": contexts, "top_logits": promoted or []}


def test_a_feature_with_a_known_trigger_gets_its_label_and_a_perfect_score():
    generator = torch.Generator().manual_seed(0)
    names = [f"t{i}" for i in range(50)]
    tokens = torch.randint(0, 50, (4000,), generator=generator)
    trigger = (tokens == 7).float() * (1 + torch.rand(4000, generator=generator))
    both = ((tokens == 3) | (tokens == 11)).float() * torch.rand(4000, generator=generator)
    noise = (torch.rand(4000, generator=generator) < 0.1).float()
    assert label_entry(_entry(tokens, trigger, names, promoted=[["color", 2.0], ["names", 1.5]])) == \
        'on "t7" -> "color"/"names"'
    assert set(label_entry(_entry(tokens, both, names, k=40)).split(" ", 1)[1].split("/")) == {'"t3"', '"t11"'}
    assert detection_score([7], tokens, trigger) == 1.0
    assert detection_score([3, 11], tokens, both) > 0.99
    assert abs(detection_score([7], tokens, noise) - 0.5) < 0.05  # a label that says nothing
    assert label_entry({"top_contexts": []}) == "(inactive)"
    assert math.isnan(detection_score([7], tokens, torch.zeros(4000)))  # nothing to tell apart
    with pytest.raises(ValueError, match="must have one shape"):
        detection_score([7], tokens, trigger[:10])
    rows = tokens.view(80, 50)  # fuzzing: contexts of 50 tokens
    assert fuzzing_score([7], rows, trigger.view(80, 50)) == 1.0
    assert fuzzing_score([3, 11], rows, both.view(80, 50)) > 0.99
    assert fuzzing_score([3], rows, both.view(80, 50)) < 0.9  # names half the tokens: about half the rows match
    assert abs(fuzzing_score([7], rows, noise.view(80, 50)) - 0.5) < 0.05
    assert fuzzing_score([], rows, trigger.view(80, 50)) == 0.5  # a label naming no token says nothing
    assert math.isnan(fuzzing_score([7], rows, torch.zeros(80, 50)))
    with pytest.raises(ValueError, match="must both be"):
        fuzzing_score([7], tokens, trigger)


def test_fuzzing_worked_by_hand():
    """Row 0 fires on its two 7s, row 1 on a 3; the label names 7. Right highlights: row 0 matches (told right),
    row 1 does not (told wrong). Wrong highlights: row 0's two other tokens (1, 2: told right); row 1's one token
    drawn from (7, 3, 3): told wrong only when it is the 7. BOS (0) is never highlighted."""
    tokens = torch.tensor([[0, 1, 7, 2, 7], [0, 7, 3, 3, 3]])
    acts = torch.tensor([[5.0, 0, 1, 0, 1], [5.0, 0, 0, 1, 0]])
    for seed in range(6):
        examples = fuzzing_examples(tokens, acts, special=[0], seed=seed)
        assert examples.rows.tolist() == [0, 1]
        assert examples.correct.tolist() == [[False, False, True, False, True], [False, False, False, True, False]]
        assert examples.wrong[0].tolist() == [False, True, False, True, False]
        assert int(examples.wrong[1].sum()) == 1 and not examples.wrong[1, 0] and not examples.wrong[1, 3]
        row1_told_right = 0.0 if examples.wrong[1, 1] else 1.0
        assert fuzzing_score([7], tokens, acts, special=[0], seed=seed) == 0.5 * (0.5 + (1 + row1_told_right) / 2)


def test_the_batched_scorer_gives_the_one_feature_scores():
    """score_labels scores a layer's features at once; the one-feature functions are the definition."""
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 30, (40, 24), generator=generator)
    tokens[:, 0] = 0  # BOS
    kinds = [(tokens == 5).float(), ((tokens == 3) | (tokens == 9)).float() * 2,
             (torch.rand(40, 24, generator=generator) < 0.2).float(), torch.zeros(40, 24), torch.ones(40, 24),
             (tokens == 7).float() * (torch.rand(40, 24, generator=generator) < 0.5)]
    triggers = [[5], [3], [5, 6], [1], [2], [7, 8]]
    acts = torch.stack(kinds)
    detection, fuzzing = batched_scores(triggers, tokens, acts, vocab_size=30, special=[0], seed=3)
    for f, (named, feature_acts) in enumerate(zip(triggers, kinds, strict=True)):
        one = [detection_score(named, tokens, feature_acts, [0]), fuzzing_score(named, tokens, feature_acts, [0], 3)]
        both = [float(detection[f]), float(fuzzing[f])]
        assert [math.isnan(v) for v in one] == [math.isnan(v) for v in both]
        assert [v for v in one if not math.isnan(v)] == pytest.approx([v for v in both if not math.isnan(v)], abs=1e-12)


def _token_rows(model, path, n_rows: int, length: int = 48) -> torch.Tensor:
    ids = torch.tensor(model.tokenizer(path.read_text()[:40000], add_special_tokens=False)["input_ids"])
    rows = ids[: n_rows * (length - 1)].view(n_rows, length - 1)
    return torch.cat([torch.full((n_rows, 1), model.tokenizer.bos_token_id), rows], dim=1)


@torch.no_grad()
def test_a_stories_feature_built_to_fire_on_one_token_is_labelled_and_detected(stories_model, tmp_path):
    from conftest import TINYSTORIES

    train, held_out = (_token_rows(stories_model, TINYSTORIES / name, 24) for name in ("train_head.txt", "valid_head.txt"))
    word = stories_model.tokenizer.convert_tokens_to_ids("▁the")
    hook = "blocks.0.ln2.hook_normalized"
    _, cache = stories_model.run_with_cache(train, names_filter=[hook])
    x = cache[hook].reshape(-1, 64)
    on_word = (train.reshape(-1) == word)
    direction = x[on_word].mean(0) - x[~on_word].mean(0)
    projection = x @ direction
    # just below most of the word's projections, above almost every other token's
    cut = max(float(projection[on_word].quantile(0.05)), float(projection[~on_word].quantile(0.99)))
    transcoder = Dictionary.from_config(DictionaryConfig(d_in=64, d_sae=4, kind="transcoder", activation="relu",
                                                         hook_in=hook, hook_out="blocks.0.hook_mlp_out"))
    transcoder.W_enc.zero_()
    transcoder.b_enc.fill_(-1.0)
    transcoder.W_enc[:, 0] = direction
    transcoder.b_enc[0] = -float(cut)
    dashboards = compute_dashboards(stories_model, transcoder, train, features=[0], k=10)
    labels = label_dashboards(dashboards)
    assert labels["0_0"].startswith('on " the"')
    assert dashboards.features["0_0"]["label"] == labels["0_0"]
    scores = score_labels(stories_model, transcoder, held_out, dashboards)
    assert scores["0_0"]["detection"] > 0.8 and dashboards.features["0_0"]["detection"] == scores["0_0"]["detection"]
    assert scores["0_0"]["fuzzing"] > 0.8 and dashboards.features["0_0"]["fuzzing"] == scores["0_0"]["fuzzing"]
    dashboards.save(tmp_path / "dashboards.json")  # strict JSON, labels and scores included
    assert type(dashboards).load(tmp_path / "dashboards.json").features["0_0"]["label"] == labels["0_0"]


def test_labels_become_clerp_and_viewer_labels(stories_model, tmp_path):
    from conftest import relu_transcoders

    from featcircuits.graph import build_graph, write_circuit_tracer_json
    from featcircuits.patching.replacement import ReplacementModel
    from featcircuits.viz.viewer import viewer_payload

    rm = ReplacementModel(stories_model, relu_transcoders(stories_model, d_sae=64, bias=-0.3)[:1])
    graph = build_graph(rm, prompt="Once upon a time there was a", progress=False)
    feature_ids = [node for node in graph.node_ids if node.startswith("mlp0:")]
    layer_feature = {f"0_{node.split(':')[1].split('@')[0]}" for node in feature_ids}
    labels = {key: f"label of {key}" for key in layer_feature}
    data = write_circuit_tracer_json(graph, tmp_path / "g.json", labels=labels, node_threshold=1.0, edge_threshold=1.0)
    clerps = {node["clerp"] for node in data["nodes"] if node["feature_type"] == "cross layer transcoder"}
    assert clerps and clerps <= set(labels.values())
    key = next(k for k in sorted(layer_feature) if k.split("_")[1].isdigit())  # a feature's key, not an error's
    payload = viewer_payload(tmp_path / "g.json", {"features": {key: {"label": "on \"x\"", "top_contexts": []}}})
    assert any(n["label"] == f"label of {key}" for n in payload["nodes"])  # clerp first


def test_label_command_labels_scores_and_survives_a_down_explainer(stories_model, stories_path, tmp_path, capsys):
    import socket

    from conftest import TINYSTORIES, relu_transcoders

    from featcircuits.cli import main
    from featcircuits.viz.dashboards import FeatureDashboards

    transcoders = relu_transcoders(stories_model, d_sae=32, bias=-0.3)[:2]
    for dictionary in transcoders:
        dictionary.save(str(tmp_path / "tc" / dictionary.cfg.hook_in))
    rows = _token_rows(stories_model, TINYSTORIES / "train_head.txt", 16)
    compute_dashboards(stories_model, transcoders, rows, k=5).save(tmp_path / "d.json")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    code = main(["label", str(tmp_path / "d.json"), "--model", str(stories_path), "--dictionaries", str(tmp_path / "tc"),
                 "--held-out", str(TINYSTORIES / "valid_head.txt"), "--held-out-tokens", "4000",
                 "--explainer-url", down])
    out = capsys.readouterr().out
    assert code == 0 and "labelled 64 features" in out and "explainer: offline label (explainer failed:" in out
    assert "fuzzing score: mean" in out and "explainer scoring" not in out  # nothing left to score by a dead endpoint
    saved = FeatureDashboards.load(tmp_path / "d.json").features
    assert all(entry["label"] and entry["explanation"] == entry["label"] for entry in saved.values())
    assert any(isinstance(entry["detection"], float) for entry in saved.values())
    assert any(isinstance(entry["fuzzing"], float) for entry in saved.values())
    assert not any("llm_fuzzing" in entry for entry in saved.values())
