"""Feature dashboards against brute force: every activation of a small dataset kept and sorted by hand,
and logit effects against an intervention on the final residual stream."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import TINYSTORIES

from featcircuits import Dictionary, DictionaryConfig
from featcircuits.viz.browser import HeadlessChromium, find_chromium
from featcircuits.viz.dashboards import FeatureDashboards, compute_dashboards
from featcircuits.viz.viewer import load_dashboards, write_viewer

N_SEQ, SEQ_LEN = 6, 24


@pytest.fixture(scope="module")
def story_tokens(stories_model):
    text = (TINYSTORIES / "valid_head.txt").read_text()[:4000]
    ids = stories_model.to_tokens(text, prepend_bos=False)[0][: N_SEQ * (SEQ_LEN - 1)].view(N_SEQ, SEQ_LEN - 1)
    bos = torch.full((N_SEQ, 1), stories_model.tokenizer.bos_token_id)
    return torch.cat([bos, ids], dim=1)


def _dictionaries(d_model):
    torch.manual_seed(0)
    sae = Dictionary.from_config(DictionaryConfig(d_in=d_model, d_sae=40, hook_in="blocks.1.hook_resid_mid"))
    transcoder = Dictionary.from_config(DictionaryConfig(
        d_in=d_model, d_sae=24, d_out=d_model, kind="transcoder", hook_in="blocks.2.ln2.hook_normalized",
        hook_out="blocks.2.hook_mlp_out", layer=2))
    with torch.no_grad():  # a spread of firing rates, and feature 5 of the SAE that never fires
        sae.b_enc.copy_(torch.linspace(-1.0, 0.2, 40))
        sae.b_enc[5] = -1e4
    return sae, transcoder


@pytest.fixture(scope="module")
def dashboards(stories_model, story_tokens):
    sae, transcoder = _dictionaries(stories_model.cfg.d_model)
    result = compute_dashboards(stories_model, [sae, transcoder], story_tokens, k=4, window=(5, 2), batch_size=4)
    return result, sae, transcoder


def _reference_acts(model, dictionary, tokens):
    """Every activation, from an unshortened forward: ``[n_seq, seq_len, d_sae]``, BOS positions zeroed."""
    _, cache = model.run_with_cache(tokens)
    acts = dictionary.encode(cache[dictionary.cfg.hook_in]).detach()
    return acts * (tokens != model.tokenizer.bos_token_id).unsqueeze(-1)


def test_top_contexts_density_and_histogram_match_brute_force(stories_model, story_tokens, dashboards):
    result, sae, transcoder = dashboards
    vocabulary = stories_model.tokenizer.convert_ids_to_tokens(list(range(stories_model.cfg.d_vocab)))
    assert result.n_tokens == N_SEQ * (SEQ_LEN - 1)
    edges = np.array(result.histogram_edges)
    for layer, dictionary in (("1", sae), ("2", transcoder)):
        acts = _reference_acts(stories_model, dictionary, story_tokens)
        flat = acts.reshape(-1, dictionary.cfg.d_sae)
        for feature in range(dictionary.cfg.d_sae):
            entry = result.features[f"{layer}_{feature}"]
            column = flat[:, feature]
            fired = column[column > 0]
            assert entry["n_fired"] == len(fired)
            assert entry["density"] == pytest.approx(len(fired) / result.n_tokens)
            expected_top = column.sort(descending=True).values[: min(4, len(fired))]
            assert [context["act"] for context in entry["top_contexts"]] == pytest.approx(expected_top.tolist(), rel=1e-5)
            clipped = np.clip(np.log10(fired.double().numpy()), edges[0], edges[-1] - 1e-9)
            assert entry["histogram"] == np.histogram(clipped, bins=edges)[0].tolist()
            if entry["top_contexts"]:  # the best context is the argmax's window, tokens and activations alike
                seq, pos = divmod(int(column.argmax()), SEQ_LEN)
                start, stop = max(pos - 5, 0), min(pos + 3, SEQ_LEN)
                context = entry["top_contexts"][0]
                assert context["tokens"] == [vocabulary[t] for t in story_tokens[seq, start:stop].tolist()]
                assert context["acts"] == pytest.approx(acts[seq, start:stop, feature].tolist(), abs=1e-4)
                assert context["focus"] == pos - start
    assert result.features["1_5"]["n_fired"] == 0  # the feature that never fires


def test_batch_size_does_not_change_the_result(stories_model, story_tokens, dashboards):
    result, sae, transcoder = dashboards
    one_by_one = compute_dashboards(stories_model, {"1": sae, "2": transcoder}, list(story_tokens), k=4,
                                    window=(5, 2), batch_size=1)
    for key, entry in result.features.items():
        other = one_by_one.features[key]
        assert other["n_fired"] == entry["n_fired"] and other["histogram"] == entry["histogram"]
        assert [c["act"] for c in other["top_contexts"]] == pytest.approx([c["act"] for c in entry["top_contexts"]])


@pytest.mark.parametrize("model_fixture", ["stories_model", "tiny_gpt2"])
def test_logit_effects_match_an_intervention_on_the_final_residual(model_fixture, request):
    """Adding eps * W_dec[f] to a residual orthogonal to it moves the logits by eps / scale * effect."""
    model = request.getfixturevalue(model_fixture)
    d_model = model.cfg.d_model
    torch.manual_seed(1)
    transcoder = Dictionary.from_config(DictionaryConfig(
        d_in=d_model, d_sae=8, d_out=d_model, kind="transcoder", hook_in="blocks.0.ln2.hook_normalized",
        hook_out="blocks.0.hook_mlp_out", layer=0))
    tokens = torch.randint(3, model.cfg.d_vocab, (2, 8))
    result = compute_dashboards(model, transcoder, tokens, k=2, n_logits=5, skip_bos=False)
    layer_norm = model.cfg.normalization_type == "LN"
    final_norm, unembed = copy.deepcopy(model.ln_final).double(), copy.deepcopy(model.unembed).double()
    for feature in range(8):
        direction = transcoder.W_dec[feature].detach().double()
        residual = torch.randn(d_model, dtype=torch.float64)
        if layer_norm:  # LayerNorm centres: work with centred vectors so the scale stays put
            direction, residual = direction - direction.mean(), residual - residual.mean()
        residual -= (residual @ direction) / (direction @ direction) * direction
        scale = (residual.pow(2).mean() + model.cfg.eps).sqrt()
        eps = 1e-3

        def logits(x):  # in float64: a float32 difference over eps = 1e-3 is only good to about 1e-3
            return unembed(final_norm(x.view(1, 1, -1))).view(-1)

        change = (logits(residual + eps * direction) - logits(residual)) * scale / eps
        entry = result.features[f"0_{feature}"]
        top, bottom = change.topk(5), change.topk(5, largest=False)
        vocabulary = [str(i) for i in range(model.cfg.d_vocab)] if model.tokenizer is None else \
            model.tokenizer.convert_ids_to_tokens(list(range(model.cfg.d_vocab)))
        assert [pair[1] for pair in entry["top_logits"]] == pytest.approx(top.values.tolist(), rel=2e-3, abs=2e-3)
        assert [pair[1] for pair in entry["bottom_logits"]] == pytest.approx(bottom.values.tolist(), rel=2e-3, abs=2e-3)
        assert entry["top_logits"][0][0] == vocabulary[int(top.indices[0])]


def test_bad_requests_are_refused(stories_model, story_tokens):
    sae, transcoder = _dictionaries(stories_model.cfg.d_model)
    with pytest.raises(ValueError, match="out of range"):
        compute_dashboards(stories_model, sae, story_tokens, features=[3, 40])
    with pytest.raises(ValueError, match="no dictionary"):
        compute_dashboards(stories_model, {"1": sae}, story_tokens, features={"1": [0], "7": [1]})
    with pytest.raises(ValueError, match="several dictionaries"):
        compute_dashboards(stories_model, [sae, transcoder], story_tokens, features=[0])
    with pytest.raises(ValueError, match="empty"):
        compute_dashboards(stories_model, sae, story_tokens[:, :1])  # only BOS tokens
    with pytest.raises(ValueError, match=r"\[n_sequences, seq_len\]"):
        compute_dashboards(stories_model, sae, story_tokens[0])
    with pytest.raises(ValueError, match="Two dictionaries share layer"):
        compute_dashboards(stories_model, [sae, sae], story_tokens)


def test_save_load_and_viewer_input_validation(tmp_path, dashboards):
    result = dashboards[0]
    path = result.save(tmp_path / "dash.json")
    again = FeatureDashboards.load(path)
    assert again.features == json.loads(json.dumps(result.features)) and again.n_tokens == result.n_tokens
    assert load_dashboards(path)["features"].keys() == result.features.keys()
    (tmp_path / "other.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="'features' mapping"):
        load_dashboards(tmp_path / "other.json")
    with pytest.raises(ValueError, match="not a featcircuits dashboard"):
        FeatureDashboards.load(tmp_path / "other.json")


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")
def test_dashboard_page_and_viewer_cards_in_the_browser(tmp_path, dashboards):
    result, sae, _ = dashboards
    chosen = FeatureDashboards(features={key: result.features[key] for key in ("1_5", "1_30", "2_3")},
                               n_tokens=result.n_tokens, histogram_edges=result.histogram_edges)
    page = chosen.write_html(tmp_path / "features.html")
    graph = {"metadata": {"prompt_tokens": ["<s>", "\u2581Once", "\u2581upon"]},
             "nodes": [{"node_id": "E_1_0", "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "feature": 0},
                       {"node_id": "1_30_1", "layer": "1", "ctx_idx": 1, "feature_type": "sae", "feature": 30,
                        "activation": 0.5},
                       {"node_id": "1_5_2", "layer": "1", "ctx_idx": 2, "feature_type": "sae", "feature": 5}],
             "links": [{"source": "E_1_0", "target": "1_30_1", "weight": 0.7},
                       {"source": "1_30_1", "target": "1_5_2", "weight": -0.2}]}
    viewer = write_viewer(graph, tmp_path / "graph.html", dashboards=result.save(tmp_path / "dash.json"))
    with HeadlessChromium(width=1200, height=800) as browser:
        browser.open(page)
        assert browser.evaluate("document.querySelectorAll('.fc-feature-card').length") == 3
        dead = browser.evaluate("document.querySelector('[data-key=\"1_5\"] .fc-dead').textContent")
        assert dead == f"Never fired on the {result.n_tokens} tokens scanned."
        assert browser.evaluate("document.querySelectorAll('[data-key=\"1_30\"] .fc-context').length") == \
            len(result.features["1_30"]["top_contexts"])
        browser.screenshot(tmp_path / "features.png")

        browser.open(viewer)
        browser.click('.fc-node[data-node-id="1_30_1"]')
        entry = result.features["1_30"]
        shown = browser.evaluate("[document.querySelectorAll('#fc-card .fc-context').length,"
                                 " [...document.querySelectorAll('#fc-card .fc-promotes .fc-tok')].map(e => e.textContent)]")
        assert shown[0] == len(entry["top_contexts"]) > 0
        assert shown[1] == [token.replace("\u2581", "\u2423") for token, _ in entry["top_logits"]]
        browser.click('.fc-node[data-node-id="1_5_2"]')
        assert browser.evaluate("document.querySelector('#fc-card .fc-dead') !== null")
        assert browser.errors == [] and browser.dialogs == []


def test_dictionary_off_the_residual_width_gets_a_note_not_logits(stories_model, story_tokens):
    sae = Dictionary.from_config(DictionaryConfig(d_in=stories_model.cfg.d_mlp, d_sae=8, hook_in="blocks.0.mlp.hook_post"))
    entry = compute_dashboards(stories_model, sae, story_tokens[:2], k=2).features["0_0"]
    assert "top_logits" not in entry and "residual stream" in entry["logit_note"]


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium on PATH (apt-get install chromium; .ci/run does)")
def test_large_feature_sets_render_a_page_at_a_time(tmp_path, dashboards):
    result = dashboards[0]
    many = dict(list(result.features.items())[:25])
    page = FeatureDashboards(features=many, n_tokens=result.n_tokens).write_html(tmp_path / "many.html", page_size=10)
    with HeadlessChromium(width=1000, height=700) as browser:
        browser.open(page)
        count = "document.querySelectorAll('.fc-feature-card').length"
        assert browser.evaluate(count) == 10
        assert browser.evaluate("document.getElementById('fc-more').textContent") == "Show 10 more of 15"
        browser.click("#fc-more")
        browser.click("#fc-more")
        assert browser.evaluate(count) == 25
        assert browser.evaluate("document.getElementById('fc-more').style.display") == "none"
        assert browser.errors == []
