"""featcircuits demo / run_demo on stories260k.

The bundled model and its dictionaries may not exist yet, so these tests run the pipeline on
stories260k with transcoders *constructed* here (not trained): random ReLU encoder directions with
thresholds set so each feature fires on ~4% of tokens, and decoders fitted by least squares to the
real MLP outputs. They are real transcoders in the library's format (the graph's error terms carry
what they miss), built in a second instead of a training run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import TINYSTORIES

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.cli import main
from featcircuits.models import mlp_in, mlp_out


@torch.no_grad()
def construct_transcoders(model, d_sae: int = 128, fire: float = 0.04, seed: int = 0) -> list[Dictionary]:
    ids = model.to_tokens((TINYSTORIES / "valid_head.txt").read_text()[:30000], truncate=False)[0]
    tokens = ids[: 24 * 64].reshape(24, 64)
    hooks = {h for layer in range(model.cfg.n_layers) for h in (mlp_in(layer), mlp_out(layer))}
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in hooks)
    generator = torch.Generator().manual_seed(seed)
    d = model.cfg.d_model
    dictionaries = []
    for layer in range(model.cfg.n_layers):
        x, y = cache[mlp_in(layer)].reshape(-1, d), cache[mlp_out(layer)].reshape(-1, d)
        w_enc = torch.randn(d, d_sae, generator=generator) / d**0.5
        b_enc = -(x @ w_enc).quantile(1 - fire, dim=0)
        design = torch.cat([torch.relu(x @ w_enc + b_enc), torch.ones(len(x), 1)], dim=1)
        solution = torch.linalg.lstsq(design, y, driver="gelsd").solution
        cfg = DictionaryConfig(d_in=d, d_sae=d_sae, d_out=d, kind="transcoder", hook_in=mlp_in(layer),
                               hook_out=mlp_out(layer), layer=layer, model_name=model.cfg.model_name)
        dictionary = Dictionary.from_config(cfg)
        for name, value in (("W_enc", w_enc), ("b_enc", b_enc), ("W_dec", solution[:-1]), ("b_dec", solution[-1])):
            getattr(dictionary, name).copy_(value)
        dictionaries.append(dictionary)
    return dictionaries


@pytest.fixture(scope="module")
def transcoders(stories_model):
    return construct_transcoders(stories_model)


@pytest.fixture(scope="module")
def transcoder_dir(transcoders, tmp_path_factory):
    root = tmp_path_factory.mktemp("transcoders")
    for dictionary in transcoders:
        dictionary.save(str(root / f"layer{dictionary.cfg.layer}"))
    return root


@pytest.fixture(scope="module")
def demo(stories_model, transcoders, tmp_path_factory):
    from featcircuits.pipeline.demo import run_demo

    out = tmp_path_factory.mktemp("demo") / "report"
    return run_demo(stories_model, transcoders, out=out, max_pairs=2, max_feature_nodes=48, n_sizes=4,
                    progress=False)


@torch.no_grad()
def _last_logits(model, prompts: list[str], fwd_hooks=()) -> torch.Tensor:
    """``[n, d_vocab]`` plain-model logits at the last token (the prompts have one length: one batch)."""
    return model.run_with_hooks(model.to_tokens(prompts), fwd_hooks=list(fwd_hooks))[:, -1]


def _logit_diffs(model, pairs, which: str, fwd_hooks=()) -> torch.Tensor:
    logits = _last_logits(model, [pair[which] for pair in pairs], fwd_hooks)
    rows = torch.arange(len(pairs))
    answers, distractors = (torch.tensor([p[k] for p in pairs]) for k in ("answer", "distractor"))
    return logits[rows, answers] - logits[rows, distractors]


def test_names_task_is_within_stories260k_competence(stories_model):
    """The built-in task: stories260k repeats the dog's name it saw earlier, and a swapped name flips it."""
    from featcircuits.pipeline.demo import builtin_task_pairs

    pairs = builtin_task_pairs("names", stories_model)
    assert len(pairs) >= 2
    clean = _logit_diffs(stories_model, pairs, "clean")
    corrupt = _logit_diffs(stories_model, pairs, "corrupt")
    assert (clean > 1.0).all(), clean  # the name seen earlier beats the other name
    assert (corrupt < -1.0).all(), corrupt  # ... and with the other name in the story, the other way round
    top3 = _last_logits(stories_model, [pair["clean"] for pair in pairs]).topk(3).indices
    assert all(pair["answer"] in top3[i].tolist() for i, pair in enumerate(pairs))  # among the 3 likeliest


def test_circuit_metric_ends_match_plain_model_interventions(demo, stories_model):
    """Nothing ablated is the model on the clean prompts. Everything ablated (every feature and error term
    patched from the corrupt run) is the clean prompts with every MLP output replaced by the corrupt
    run's, done here with plain TransformerLens hooks."""
    pairs = demo.circuit.graph.task.pairs
    assert len(pairs) == 2 and demo.task_name == "names"
    evaluation = demo.evaluation
    assert evaluation["m_full"] == pytest.approx(float(_logit_diffs(stories_model, pairs, "clean").mean()), abs=1e-3)
    names = [mlp_out(layer) for layer in range(stories_model.cfg.n_layers)]
    _, corrupt_cache = stories_model.run_with_cache(stories_model.to_tokens([p["corrupt"] for p in pairs]),
                                                    names_filter=lambda name: name in names)
    hooks = [(name, lambda value, hook: corrupt_cache[hook.name]) for name in names]
    m_empty = float(_logit_diffs(stories_model, pairs, "clean", hooks).mean())
    gap = evaluation["m_full"] - evaluation["m_empty"]
    assert abs(gap) > 1.0
    # Not exact: a feature that is zero in both the clean and the corrupt run is no unit, so the ablated
    # run recomputes it from its (changed) input, where it may fire a little.
    assert evaluation["m_empty"] == pytest.approx(m_empty, abs=0.02 * abs(gap))
    curve = evaluation["curve"]
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-5)  # empty circuit
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)  # every node
    assert 0 < len(demo.circuit.nodes) < len(demo.circuit.node_ids)
    assert demo.faithfulness == evaluation["faithfulness"] and demo.completeness == evaluation["completeness"]


def test_graph_explains_the_model_top_predictions(demo, stories_model):
    tokens = stories_model.to_tokens(demo.prompt)
    probs = stories_model(tokens)[0, -1].softmax(-1)
    targets = [t.token for t in demo.graph.targets]
    assert targets == probs.topk(len(targets)).indices.tolist()
    assert [p for _, p in demo.top_predictions] == pytest.approx(probs.topk(5).values.tolist(), abs=1e-4)
    assert 0 <= demo.replacement_score <= 1 and 0 <= demo.graph_completeness <= 1


def test_top_features_tokens_match_brute_force(demo, stories_model, transcoders):
    """Promoted tokens: decoder row through the final RMSNorm gain and W_U; firing tokens: the argmax of
    the feature over the demo text (the prompt and the task's prompts), found by encoding every token."""
    assert demo.top_features
    scores = [abs(f.score) for f in demo.top_features]
    assert scores == sorted(scores, reverse=True)
    tokenizer = stories_model.tokenizer  # readable tokens: a word-start piece keeps its space
    vocab = [(" " if tokenizer.convert_ids_to_tokens(i).startswith("\u2581") else "") + tokenizer.decode([i]).lstrip(" ")
             for i in range(stories_model.cfg.d_vocab)]
    texts = [demo.prompt] + [p[k] for k in ("clean", "corrupt") for p in demo.circuit.graph.task.pairs]
    runs = []
    with torch.no_grad():
        for text in texts:
            tokens = stories_model.to_tokens(text)
            runs.append((tokens[0], stories_model.run_with_cache(tokens, names_filter=lambda n: "ln2" in n)[1]))
        for feature in demo.top_features:
            dictionary = transcoders[int(feature.site.removeprefix("mlp"))]
            effects = (dictionary.W_dec[feature.feature] * stories_model.ln_final.w) @ stories_model.W_U
            expected = [vocab[i] for i in effects.topk(len(feature.promoted_tokens)).indices.tolist()]
            assert feature.promoted_tokens == expected
            best, best_token = 0.0, None
            for tokens, cache in runs:
                acts = dictionary.encode(cache[dictionary.cfg.hook_in][0])[1:, feature.feature]  # BOS skipped
                if float(acts.max()) > best:
                    best, best_token = float(acts.max()), vocab[int(tokens[1 + int(acts.argmax())])]
            assert feature.activating_tokens[0] == best_token


def test_report_files(demo):
    report = demo.report.read_text()
    for feature in demo.top_features:
        assert feature.node_id in report
    assert "Faithfulness" in report and 'href="graph.html"' in report and 'href="circuit.html"' in report
    circuit_page = demo.files["circuit"].read_text()
    assert demo.top_features[0].node_id in circuit_page  # the viewer embeds the circuit's node ids
    graph_json = json.loads(demo.files["graph_json"].read_text())
    assert graph_json["nodes"] and graph_json["links"]
    dashboards = json.loads(demo.files["dashboards"].read_text())["features"]
    top = demo.top_features[0]
    assert f"{top.site.removeprefix('mlp')}_{top.feature}" in dashboards  # the feature's card
    # the graph again, laid out for circuit-tracer's frontend, with its features' dashboard files
    ct = demo.files["circuit_tracer"]
    assert [g["slug"] for g in json.loads((ct / "graph-metadata.json").read_text())["graphs"]] == ["featcircuits-demo"]
    ct_nodes = json.loads((ct / "featcircuits-demo.json").read_text())["nodes"]
    featured = {n["feature"] for n in ct_nodes if n["feature_type"] == "cross layer transcoder"}
    assert {int(path.stem) for path in (ct / "features").rglob("*.json")} == featured
    assert str(ct) in demo.report.read_text()


def test_cli_with_model_dictionaries_prompt_and_task_file(stories_path, transcoder_dir, tmp_path, capsys):
    from featcircuits.models import load_model
    from featcircuits.pipeline.demo import builtin_task_pairs

    pairs = builtin_task_pairs("names", load_model(stories_path))[-1:]
    task = tmp_path / "task.json"
    task.write_text(json.dumps(pairs))
    prompt = "Lily and Tim went to the park. Tim saw a big"
    out = tmp_path / "report"
    code = main(["demo", "--model", str(stories_path), "--dictionaries", str(transcoder_dir), "--prompt", prompt,
                 "--task", str(task), "--out", str(out), "--max-feature-nodes", "32", "--top", "3", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"prompt: {prompt!r}" in printed and "task 'task', 1 pair," in printed
    assert "faithfulness " in printed and "completeness " in printed and "promotes" in printed
    report = Path(printed.split("report: ")[1].split()[0])
    assert report == (out / "report.html").resolve() and report.is_file()
    saved = json.loads((out / "circuit.json").read_text())
    assert saved["evaluation"]["faithfulness"] == pytest.approx(
        float(printed.split("faithfulness ")[1].split()[0]), abs=1e-3)


def test_no_arguments_without_the_bundled_model_is_a_clear_error(monkeypatch, tmp_path, capsys):
    import featcircuits.pipeline.demo as demo_module

    monkeypatch.setattr(demo_module, "BUNDLED_DIR", tmp_path / "bundled")
    out = tmp_path / "report"
    assert main(["demo", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "config.json" in error and "transcoders" in error and "forwarding_task.json" in error
    assert "python -m train.bundled_model.train_model" in error and "featcircuits train" in error
    assert "--out featcircuits/pretrained/bundled " in error  # the recipes write the package data
    assert not out.exists()  # nothing pretended


def test_no_arguments_runs_on_the_bundled_model_and_its_transcoders(tmp_path, capsys):
    """The README's main command: offline, the bundled model, its shipped transcoders and its docstring
    task. The full-model end of the metric is the bundled model's own logit difference on those pairs."""
    from featcircuits import load_model
    from featcircuits.pipeline.demo import BUNDLED_DIR

    out = tmp_path / "report"
    assert main(["demo", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "with 4 dictionaries (transcoder, d_sae 1024)" in printed and "task 'docstring'" in printed
    assert (out / "report.html").is_file()
    saved = json.loads((out / "circuit.json").read_text())
    model = load_model(BUNDLED_DIR)
    first_token = lambda text: model.tokenizer(text, add_special_tokens=False)["input_ids"][0]  # noqa: E731
    pairs = [{**p, "answer": first_token(p["answer"]), "distractor": first_token(p["distractor"])}
             for p in json.loads((BUNDLED_DIR / "docstring_task.json").read_text())[:4]]
    expected = float(torch.cat([_logit_diffs(model, [pair], "clean") for pair in pairs]).mean())  # lengths differ
    assert saved["evaluation"]["m_full"] == pytest.approx(expected, abs=1e-3)
    assert expected > 2.0  # the model is right on these pairs, by a margin
    # the report leads with the explanation, whose steering figures an independent intervention reproduces
    page = (out / "report.html").read_text()
    assert page.index("<h2>Explanation</h2>") < page.index("<h2>Attribution graph</h2>")
    assert "explanation (pruned graph" in printed and "steering:" in printed
    from featcircuits.explain import intervene
    from featcircuits.hub.loading import load_dictionaries
    from featcircuits.patching.replacement import ReplacementModel

    graph_json = json.loads((out / "graph.json").read_text())
    prompt = graph_json["metadata"]["prompt"]
    line = next(row for row in printed.splitlines() if row.startswith("steering:"))
    before, after = (float(x) for x in re.search(r"\) (\d\.\d+) -> (\d\.\d+);", line).groups())
    units = re.findall(r"^  ([+-]\d\.\d+)  (mlp\d+:\d+@\d+)", printed, re.M)
    effects = [abs(float(effect)) for effect, _ in units]
    assert effects == sorted(effects, reverse=True) and units
    rm = ReplacementModel(model, load_dictionaries(BUNDLED_DIR / "transcoders"))
    check = intervene(rm, prompt, {units[0][1]: "ablate"})
    target = int(next(n for n in graph_json["nodes"] if n.get("is_target_logit"))["feature"])
    assert float(check.logits_before.softmax(-1)[target]) == pytest.approx(before, abs=0.006)
    assert float(check.logits_after.softmax(-1)[target]) == pytest.approx(after, abs=0.006)


def test_dictionaries_for_another_model(stories_path, tmp_path, capsys):
    cfg = DictionaryConfig(d_in=32, d_sae=16, d_out=32, kind="transcoder", hook_in=mlp_in(0), hook_out=mlp_out(0),
                           layer=0, model_name="tiny-llama")
    Dictionary.from_config(cfg).save(str(tmp_path / "dicts" / "layer0"))
    code = main(["demo", "--model", str(stories_path), "--dictionaries", str(tmp_path / "dicts"),
                 "--out", str(tmp_path / "report"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2 and "different model" in error and "tiny-llama" in error
    assert not (tmp_path / "report").exists()


def test_empty_prompt_and_half_given_inputs(stories_model, transcoders, tmp_path, capsys):
    from featcircuits.pipeline.demo import run_demo

    with pytest.raises(ValueError, match="prompt is empty"):
        run_demo(stories_model, transcoders, prompt="  \n", out=tmp_path / "a")
    with pytest.raises(ValueError, match="both model and dictionaries"):
        run_demo(stories_model, None, out=tmp_path / "b")
    assert main(["demo", "--model", "x", "--dictionaries", "y", "--prompt", ""]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_report_tokens_keep_their_spaces_on_a_sentencepiece_tokenizer(stories_model):
    from featcircuits.pipeline.report import token_strings

    text = "Once upon a time there was a dog"
    ids = stories_model.to_tokens(text)[0].tolist()
    assert "".join(token_strings(stories_model, ids[1:])).strip() == text  # after BOS
