"""The OpenAI-compatible explainer client against a local server that speaks the protocol: explanations,
detection scoring, and every way the endpoint can fail (down, slow, garbage) leaving the offline labels."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from featcircuits.explain.explainer import ChatClient, ExplainerError, explain_features, llm_detection_score

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
            if "Which of these texts" in prompt:  # the scorer: every listed text containing " the"
                picked = [m.group(1) for m in re.finditer(r"^(\d+)\. (.*)$", prompt, re.M) if " the" in m.group(2)]
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
