"""The OpenAI-compatible explainer client against a local server that speaks the protocol: explanations,
detection and fuzzing scoring, and every way the endpoint can fail (down, slow, garbage) leaving the offline
labels and scores."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from featcircuits.explain.explainer import (
    ChatClient,
    ExplainerError,
    explain_features,
    held_out_texts,
    llm_detection_score,
    llm_fuzzing_score,
    llm_score_features,
)

ENTRY = {"top_contexts": [{"act": 2.0, "focus": 1, "tokens": ["▁and", "▁the", "▁dog"]},
                          {"act": 1.5, "focus": 0, "tokens": ["▁the", "▁cat"]}],
         "top_logits": [["▁dog", 1.2]]}


class Dashboards:  # the one attribute explain_features reads of FeatureDashboards
    def __init__(self):
        self.features = {"0_5": json.loads(json.dumps(ENTRY)), "0_6": json.loads(json.dumps(ENTRY))}


class _Handler(BaseHTTPRequestHandler):
    mode = "good"
    seen: list[dict] = []

    def log_message(self, *args):  # keep the test output quiet
        pass

    def do_POST(self):  # noqa: N802 (the http.server API)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        prompt = body["messages"][-1]["content"]
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "garbage":
            payload = b"<html>not json</html>"
        else:
            listed = list(re.finditer(r"^(\d+)\. (.*)$", prompt, re.M))
            if "marked <<like this>>. In which texts" in prompt:  # fuzzing: every text whose marks are all " the"
                picked = [m.group(1) for m in listed if set(re.findall(r"<<(.*?)>>", m.group(2))) == {" the"}]
                content = "I cannot tell" if self.mode == "score-garbage" else ", ".join(picked) or "none"
            elif "Which of these texts" in prompt:  # detection: every listed text containing " the"
                picked = [m.group(1) for m in listed if " the" in m.group(2)]
                content = ", ".join(picked) or "none"
            else:
                content = "!!!" if self.mode == "empty-words" else 'the word "the"'
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture()
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    _Handler.seen.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    _Handler.mode = "good"


def test_explanations_and_detection_through_the_protocol(server, monkeypatch):
    monkeypatch.setenv("FC_TEST_KEY", "sk-local")
    client = ChatClient(server, "local-model", api_key_env="FC_TEST_KEY", timeout=5)
    dashboards = Dashboards()
    explanations = explain_features(dashboards, client)
    assert explanations == {"0_5": 'the word "the"', "0_6": 'the word "the"'}
    entry = dashboards.features["0_5"]
    assert entry["explanation_source"] == f"local-model at {server}" and entry["label"].startswith('on " the"')
    request = _Handler.seen[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-local"
    assert request["body"]["model"] == "local-model" and "<< the>>" in request["body"]["messages"][-1]["content"]
    score = llm_detection_score(client, "the word the", active=["and the dog", "saw the cat"],
                                inactive=["a big dog", "it ran away", "one day"])
    assert score == 1.0


@pytest.mark.parametrize("mode", ["garbage", "slow", "empty-words", "down"])
def test_a_failing_endpoint_leaves_the_offline_labels(server, mode):
    if mode == "down":
        with socket.socket() as sock:  # a port nobody listens on
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    else:
        _Handler.mode, url = mode, server
    dashboards = Dashboards()
    explanations = explain_features(dashboards, ChatClient(url, "m", timeout=0.5))
    entry = dashboards.features["0_5"]
    assert explanations["0_5"] == entry["label"] == 'on " the" -> " dog"'
    assert entry["explanation_source"].startswith("offline label (explainer failed:")
    assert len(_Handler.seen) <= 1  # a failed endpoint is not asked again for the next feature
    if mode != "empty-words":  # the client itself names the failure
        with pytest.raises(ExplainerError, match="could not be reached|not JSON"):
            ChatClient(url, "m", timeout=0.5).complete("hello")


def test_fuzzing_through_the_protocol(server):
    client = ChatClient(server, "local-model", timeout=5)
    correct = ["and<< the>> dog", "saw<< the>> cat and<< the>> dog"]
    wrong = ["and the<< dog>>", "<<saw>> the cat"]
    assert llm_fuzzing_score(client, "the word the", correct, wrong) == 1.0
    assert llm_fuzzing_score(client, "the word the", wrong, correct) == 0.0  # told apart, the other way round
    prompt = _Handler.seen[-1]["body"]["messages"][-1]["content"]
    assert "described as: the word the" in prompt and "<< the>>" in prompt
    with pytest.raises(ValueError, match="Fuzzing needs"):
        llm_fuzzing_score(client, "x", correct, [])


PIECES = ["<s>", "▁and", "▁the", "▁dog", "▁cat", "▁ran"]


def _feature_on_the(seed: int = 0):
    """Held-out rows of random words and a feature firing exactly on "▁the" (id 2)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, len(PIECES), (12, 8), generator=generator)
    tokens[:, 0] = 0  # BOS
    tokens[:6, 3] = 2  # half the rows surely hold "the"
    tokens[6:][tokens[6:] == 2] = 3  # the other half never do
    return tokens, (tokens == 2).float() * 1.5


def test_held_out_texts_and_llm_scores_of_a_feature_with_a_known_trigger(server):
    tokens, acts = _feature_on_the()
    texts = held_out_texts(tokens, acts, PIECES, special=[0], n=4)
    assert len(texts["active"]) == len(texts["inactive"]) == len(texts["correct"]) == len(texts["wrong"]) == 4
    assert all(" the" in t for t in texts["active"]) and not any(" the" in t for t in texts["inactive"])
    assert all(set(re.findall(r"<<(.*?)>>", t)) == {" the"} for t in texts["correct"])
    assert all(" the" not in re.findall(r"<<(.*?)>>", t) and "<<" in t for t in texts["wrong"])
    assert not any("<<<s>>>" in t for t in texts["correct"] + texts["wrong"])  # BOS is never highlighted
    client = ChatClient(server, "local-model", timeout=5)
    dashboards = Dashboards()
    explain_features(dashboards, client)
    scores, failure = llm_score_features(dashboards, client, {"0_5": texts})
    assert failure is None and scores == {"0_5": {"llm_detection": 1.0, "llm_fuzzing": 1.0}}
    assert dashboards.features["0_5"]["llm_fuzzing"] == 1.0
    assert dashboards.features["0_5"]["llm_scorer"] == f"local-model at {server}"


@pytest.mark.parametrize("mode", ["score-garbage", "down"])
def test_a_scorer_that_fails_stops_scoring_and_keeps_the_offline_scores(server, mode):
    tokens, acts = _feature_on_the()
    texts = held_out_texts(tokens, acts, PIECES, special=[0], n=3)
    client = ChatClient(server, "m", timeout=2)
    dashboards = Dashboards()
    explain_features(dashboards, client)  # explained while the endpoint was up
    for entry in dashboards.features.values():
        entry["fuzzing"] = 0.9  # an offline score, which must stand
    if mode == "down":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            client = ChatClient(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", "m", timeout=0.5)
    else:
        _Handler.mode = mode
    seen = len(_Handler.seen)
    scores, failure = llm_score_features(dashboards, client, {"0_5": texts, "0_6": texts})
    assert scores == {} and failure and ("lists no context numbers" in failure or "could not be reached" in failure)
    assert all(entry["fuzzing"] == 0.9 and "llm_fuzzing" not in entry for entry in dashboards.features.values())
    assert len(_Handler.seen) - seen <= 2  # stopped at the first feature
