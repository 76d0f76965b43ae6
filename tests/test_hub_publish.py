"""Publishing through the real huggingface_hub client, against a local HTTP server that speaks just enough
of the Hub API (whoami, repo create, branch, preupload, LFS batch + PUT, ndjson commit) and records it."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml

import featcircuits as fc
from featcircuits.cli import main as cli_main
from featcircuits.dictionaries.io import FORMATS
from featcircuits.hub.publish import HubAuthError, build_upload_folder, push_to_hub

TOKEN = "hf_test_token_0123456789"


class FakeHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str]] = []
        self.lfs_blobs: dict[str, bytes] = {}
        self.commits: list[dict] = []  # {"revision", "header", "files": {path: bytes}, "modes": {path: mode}}
        self.created: list[dict] = []
        self.branches: list[str] = []
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}  # repo -> revision -> files, after commits

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _reply(self, status: int, payload: dict | None = None) -> None:
        data = json.dumps(payload or {}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def _resolve(self, send_body: bool) -> None:
        """``/{org}/{name}/resolve/{revision}/{path}`` as hf_hub_download reads it, with the Hub's error codes."""
        org, name, _, revision, file = self.path.split("?")[0].lstrip("/").split("/", 4)
        repo = self.server.repos.get(f"{org}/{name}")
        error = ("RepoNotFound" if repo is None else "RevisionNotFound" if revision not in repo
                 else "EntryNotFound" if file not in repo[revision] else None)
        if error:
            self.send_response(404)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = repo[revision][file]
        self.send_response(200)
        self.send_header("X-Repo-Commit", hashlib.sha1(f"{org}/{name}@{revision}".encode()).hexdigest())
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if send_body:
            self.wfile.write(data)

    def do_HEAD(self) -> None:
        self.server.requests.append(("HEAD", self.path))
        self._resolve(send_body=False)

    def do_GET(self) -> None:
        self.server.requests.append(("GET", self.path))
        if "/resolve/" in self.path:
            return self._resolve(send_body=True)
        if self.path.startswith("/api/whoami-v2"):
            if not self._authorized():
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return self._reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        self._reply(404, {"error": f"not implemented: GET {self.path}"})

    def do_PUT(self) -> None:
        self.server.requests.append(("PUT", self.path))
        body = self._body()
        oid = self.path.rsplit("/", 1)[-1]
        if hashlib.sha256(body).hexdigest() != oid:
            return self._reply(400, {"error": "sha256 mismatch"})
        self.server.lfs_blobs[oid] = body
        self._reply(200)

    def do_POST(self) -> None:
        self.server.requests.append(("POST", self.path))
        body = self._body()
        path = self.path.split("?")[0]
        if not self._authorized():
            return self._reply(401, {"error": "Invalid credentials"})
        if path == "/api/repos/create":
            payload = json.loads(body)
            self.server.created.append(payload)
            # Like the Hub: a new repo has a main branch holding .gitattributes.
            repo = f"{payload['organization']}/{payload['name']}"
            self.server.repos.setdefault(repo, {"main": {".gitattributes": b"*.safetensors filter=lfs\n"}})
            return self._reply(200, {"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"})
        if path == "/api/validate-yaml":
            return self._reply(200, {"errors": [], "warnings": []})
        if "/branch/" in path:
            branch = path.rsplit("/", 1)[-1]
            self.server.branches.append(branch)
            repo = path.split("/api/models/")[1].split("/branch/")[0]
            revisions = self.server.repos.setdefault(repo, {"main": {}})
            revisions.setdefault(branch, dict(revisions["main"]))
            return self._reply(200)
        if "/preupload/" in path:
            files = json.loads(body)["files"]
            modes = [{"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                      "shouldIgnore": False} for f in files]
            return self._reply(200, {"files": modes})
        if path.endswith(".git/info/lfs/objects/batch"):
            objects = json.loads(body)["objects"]
            return self._reply(200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{self.server.url}/lfs-upload/{o['oid']}"}}} for o in objects]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            commit = {"revision": path.rsplit("/", 1)[-1], "header": lines[0]["value"], "files": {}, "modes": {}}
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    commit["files"][value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "lfsFile":
                    blob = self.server.lfs_blobs.get(value["oid"])
                    if blob is None or len(blob) != value["size"]:
                        return self._reply(422, {"error": f"LFS object for {value['path']} was never uploaded"})
                    commit["files"][value["path"]] = blob
                commit["modes"][value["path"]] = line["key"]
            self.server.commits.append(commit)
            repo = path.split("/api/models/")[1].split("/commit/")[0]
            self.server.repos.setdefault(repo, {}).setdefault(commit["revision"], {}).update(commit["files"])
            return self._reply(200, {"commitUrl": f"{self.server.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40})
        self._reply(404, {"error": f"not implemented: POST {path}"})


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    from huggingface_hub import constants

    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # this Hub is on 127.0.0.1
    # hf_xet would route LFS files through a Xet storage server; the plain LFS protocol is what we serve.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(constants, "ENDPOINT", server.url)  # read at import by huggingface_hub
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved token from the machine
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf_home" / "stored_tokens"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def trained_folder(tmp_path: Path, with_metrics: bool = True) -> tuple[Path, list[fc.Dictionary]]:
    """A folder as `featcircuits train --out` leaves it: one native sub-directory per dictionary + metrics.json."""
    out = tmp_path / "run"
    dictionaries = []
    for layer in (0, 1):
        activation = ("relu", None) if layer == 0 else ("topk", 4)  # sae-lens has no TopK transcoder
        cfg = fc.DictionaryConfig(d_in=8, d_sae=32, kind="transcoder", activation=activation[0], k=activation[1],
                                  layer=layer,
                                  hook_in=f"blocks.{layer}.ln2.hook_normalized", hook_out=f"blocks.{layer}.hook_mlp_out",
                                  model_name="tiny/llama", model_revision="abc123", dataset="tinystories",
                                  training_tokens=50_000)
        dictionary = fc.Dictionary.from_config(cfg)
        with torch.no_grad():
            dictionary.b_enc.normal_()
        dictionary.save(str(out / cfg.hook_in))
        dictionaries.append(dictionary)
    if with_metrics:
        per = {"blocks.0.ln2.hook_normalized": {"l0": 3.5, "fvu": 0.125, "dead_fraction": 0.0625,
                                                "ce_loss_recovered": 0.875}}  # layer 1 left unmeasured
        (out / "metrics.json").write_text(json.dumps({"l0": 3.5, "tokens_per_second": 1000.0, "dictionaries": per}))
    return out, dictionaries


def test_push_uploads_native_saelens_and_card_in_one_commit(fake_hub, tmp_path):
    run_dir, dictionaries = trained_folder(tmp_path)
    dry = build_upload_folder(run_dir, tmp_path / "dry", "tester/tiny-transcoders")
    url = push_to_hub(run_dir, "tester/tiny-transcoders", revision="v1", private=True, token=TOKEN,
                      endpoint=fake_hub.url)
    assert url.startswith(fake_hub.url) and "/commit/" in url
    assert fake_hub.created == [{"name": "tiny-transcoders", "organization": "tester", "visibility": "private"}]
    assert fake_hub.branches == ["v1"]
    (commit,) = fake_hub.commits
    assert commit["revision"] == "v1"
    # Exactly the dry-run folder arrived, byte for byte; weights through LFS, the rest inline (base64).
    expected = {p.relative_to(dry).as_posix(): p.read_bytes() for p in dry.rglob("*") if p.is_file()}
    assert set(commit["files"]) == set(expected)
    for name, data in expected.items():
        assert commit["files"][name] == data, name
    assert {mode for name, mode in commit["modes"].items() if name.endswith(".safetensors")} == {"lfsFile"}
    assert commit["modes"]["README.md"] == "file"
    # The uploaded native files read back as the same dictionaries.
    received = tmp_path / "received"
    for name, data in commit["files"].items():
        (received / name).parent.mkdir(parents=True, exist_ok=True)
        (received / name).write_bytes(data)
    reloaded = fc.load_dictionaries(received / "native")
    x = torch.randn(4, 8)
    for got, original in zip(reloaded, dictionaries, strict=True):
        torch.testing.assert_close(got(x).reconstruction, original(x).reconstruction)
    assert FORMATS["saelens"].detect(received / "saelens" / "blocks.0.ln2.hook_normalized")
    assert not (received / "saelens" / "blocks.1.ln2.hook_normalized").exists()


def test_model_card_front_matter_and_metric_tables(tmp_path):
    run_dir, _ = trained_folder(tmp_path)
    card = (build_upload_folder(run_dir, tmp_path / "dry", "tester/tiny-transcoders") / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "featcircuits" and front["base_model"] == "tiny/llama"
    assert {"transcoder", "saelens", "featcircuits"} <= set(front["tags"])
    layer0 = card.split("### blocks.0.ln2.hook_normalized")[1].split("###")[0]
    layer1 = card.split("### blocks.1.ln2.hook_normalized")[1]
    for row in ("| L0 (mean active features per token) | 3.5 |", "| FVU (fraction of variance unexplained) | 0.125 |",
                "| CE loss recovered | 0.875 |", "| Dead fraction | 0.0625 |", "| Training tokens | 50,000 |",
                "| Hook out | `blocks.0.hook_mlp_out` |", "| Model revision | abc123 |", "| Dataset | tinystories |",
                f"| featcircuits version | {fc.__version__} |"):
        assert row in layer0, row
    assert "| FVU (fraction of variance unexplained) | not measured |" in layer1
    assert "| CE loss recovered | not measured |" in layer1
    assert "`saelens/blocks.0.ln2.hook_normalized/` (SAELens)" in layer0
    assert "| SAELens | not available: sae-lens has no transcoder with topk activation |" in layer1


def test_saelens_layout_loads_in_saelens(tmp_path):
    from sae_lens import SAE

    run_dir, dictionaries = trained_folder(tmp_path, with_metrics=False)
    folder = build_upload_folder(run_dir, tmp_path / "dry", "tester/tiny-transcoders")
    assert "not measured" in (folder / "README.md").read_text()
    sae = SAE.load_from_disk(str(folder / "saelens" / "blocks.0.ln2.hook_normalized"))
    x = torch.randn(4, 8)
    torch.testing.assert_close(sae(x), dictionaries[0](x).reconstruction, rtol=1e-5, atol=1e-5)


def test_push_without_token_uploads_nothing(fake_hub, tmp_path):
    run_dir, _ = trained_folder(tmp_path)
    with pytest.raises(HubAuthError, match="No Hugging Face token.*hf auth login.*huggingface-cli login.*HF_TOKEN"):
        push_to_hub(run_dir, "tester/tiny-transcoders", endpoint=fake_hub.url)
    with pytest.raises(HubAuthError, match="rejected the token"):
        push_to_hub(run_dir, "tester/tiny-transcoders", token="hf_wrong", endpoint=fake_hub.url)
    # Only reads reached the server (the token check; huggingface_hub may also GET its own client metadata).
    assert {method for method, _ in fake_hub.requests} == {"GET"}, fake_hub.requests
    assert ("GET", "/api/whoami-v2") in fake_hub.requests
    assert not fake_hub.created and not fake_hub.commits and not fake_hub.lfs_blobs


def test_push_command_dry_run_and_upload(fake_hub, tmp_path, capsys):
    run_dir, _ = trained_folder(tmp_path)
    assert cli_main(["push", str(run_dir), "tester/cli-repo", "--dry-run", str(tmp_path / "dry")]) == 0
    printed = capsys.readouterr().out
    assert "native/blocks.0.ln2.hook_normalized/dictionary.safetensors" in printed and "README.md" in printed
    assert not fake_hub.requests  # a dry run talks to nobody
    assert cli_main(["push", str(run_dir), "tester/cli-repo"]) == 2  # no token
    assert "hf auth login" in capsys.readouterr().err
    assert cli_main(["push", str(run_dir), "tester/cli-repo", "--token", TOKEN]) == 0
    assert "pushed to tester/cli-repo" in capsys.readouterr().out
    assert set(fake_hub.commits[0]["files"]) == {p.relative_to(tmp_path / "dry").as_posix()
                                                 for p in (tmp_path / "dry").rglob("*") if p.is_file()}


def test_push_in_offline_mode_is_refused_before_anything(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    run_dir, _ = trained_folder(tmp_path)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE=1 is set"):
        push_to_hub(run_dir, "tester/tiny-transcoders", token=TOKEN)
    # A dry run needs neither network nor token, and writes what the command's --dry-run writes.
    folder = Path(push_to_hub(run_dir, "tester/tiny-transcoders", dry_run=tmp_path / "dry-api"))
    assert cli_main(["push", str(run_dir), "tester/tiny-transcoders", "--dry-run", str(tmp_path / "dry-cli")]) == 0
    listing = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    cli_dir = tmp_path / "dry-cli"
    assert listing == {p.relative_to(cli_dir).as_posix(): p.read_bytes() for p in cli_dir.rglob("*") if p.is_file()}
    assert "native/blocks.0.ln2.hook_normalized/dictionary.safetensors" in listing


def test_pushed_repo_loads_back_through_hf_hub_download(fake_hub, tmp_path, monkeypatch):
    """Push, then resolve the repo online (not from a hand-laid cache) through a registry entry; the Hub's
    own error codes for a missing repo, revision or file become featcircuits' messages."""
    from huggingface_hub import constants

    from featcircuits.hub.loading import HubFileError, from_pretrained

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    run_dir, dictionaries = trained_folder(tmp_path)
    push_to_hub(run_dir, "tester/tiny-transcoders", revision="v1", token=TOKEN)
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump({"releases": {
        "tiny-published": {"repo_id": "tester/tiny-transcoders", "model": "tiny/llama", "format": "native",
                           "kind": "transcoder", "revision": "v1", "layers": [0, 1],
                           "path_template": "native/blocks.{layer}.ln2.hook_normalized",
                           "hooks": {"in": "blocks.{layer}.ln2.hook_normalized", "out": "blocks.{layer}.hook_mlp_out"}},
        "gone": {"repo_id": "tester/never-pushed", "model": "tiny/llama", "format": "native", "layers": [0],
                 "path_template": "native/x"}}}))
    x = torch.randn(3, 8)
    loaded = from_pretrained("tiny-published", "layer_1", registry=registry)
    torch.testing.assert_close(loaded(x).reconstruction, dictionaries[1](x).reconstruction)
    assert any(method == "HEAD" and "/resolve/v1/native/blocks.1" in path for method, path in fake_hub.requests)
    with pytest.raises(HubFileError, match="Revision 'v7' does not exist in Hub repo 'tester/tiny-transcoders'"):
        from_pretrained("tiny-published", "layer_0", revision="v7", registry=registry)
    with pytest.raises(HubFileError, match="has no file 'native/blocks.0.ln2.hook_normalized/cfg.json'"):
        from_pretrained("tiny-published", "layer_0", revision="main", registry=registry)  # pushed to v1 only
    with pytest.raises(HubFileError, match="'tester/never-pushed' does not exist or is private"):
        from_pretrained("gone", "layer_0", registry=registry)
