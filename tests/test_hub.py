"""The Hugging Face round trip (#34): Hub ids downloaded through huggingface_hub when online (a local HTTP
server plays the Hub: the API routes `snapshot_download` calls and the file routes), read from the cache
offline with the exact `hf download` command when missing; the published model card and the
`upload_folder` call (everything up to it: no Hub is reachable here)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml

from tests.conftest import error_line
from vlm_merge.cli import main
from vlm_merge.errors import VlmMergeError
from vlm_merge.io import card as card_mod
from vlm_merge.io.checkpoint import resolve_model_dir
from vlm_merge.io.hub import download_command, fetch_model, parse_hub_ref, push_folder, with_revision

SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """The Hub's routes that `snapshot_download` uses, for one model repo held in memory: repo info
    (`/api/models/ORG/NAME/revision/REV`), its file tree (`/api/models/ORG/NAME/tree/SHA`) and each file
    (`HEAD` / `GET /ORG/NAME/resolve/SHA/FILE`). Every request path is recorded."""

    def __init__(self, repo_id: str, files: dict[str, bytes]) -> None:
        self.repo_id, self.files, self.requests = repo_id, files, []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        hub, path = self.server, unquote(urlparse(self.path).path)
        hub.requests.append(f"{self.command} {path}")
        api = f"/api/models/{hub.repo_id}/"
        if path.startswith(api + "revision/"):
            info = {"id": hub.repo_id, "sha": SHA, "siblings": [{"rfilename": f} for f in hub.files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head)
        if path.startswith(api + "tree/"):
            tree = [{"type": "file", "path": f, "size": len(b), "oid": hashlib.sha1(b).hexdigest()} for f, b in hub.files.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head)
        prefix = f"/{hub.repo_id}/resolve/{SHA}/"
        if path.startswith(prefix) and (name := path[len(prefix):]) in hub.files:
            body = hub.files[name]
            return self._send(200, body, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(body).hexdigest()}"'}, head)
        if path.startswith(api) or path.startswith(f"/{hub.repo_id}/"):
            return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"}, head)
        return self._send(404, b"{}", {"X-Error-Code": "RepoNotFound"}, head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub(zoo):
    """A fake Hub serving `tiny-org/tiny-llama`: a zoo LLM's files, a card with a licence, and files vlm-merge
    does not need (a .bin copy of the weights, an optimizer state, an image)."""
    src = zoo.llms["en-llama"]
    files = {p.name: p.read_bytes() for p in sorted(src.iterdir()) if p.is_file()}
    files |= {"README.md": b"---\nlicense: llama2\n---\n# tiny\n", "pytorch_model.bin": b"x" * 64,
              "optimizer.pt": b"y" * 64, "assets/diagram.png": b"z" * 16}
    server = FakeHub("tiny-org/tiny-llama", files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`vlm-merge ARGS` in a fresh interpreter: huggingface_hub reads HF_ENDPOINT / HF_HUB_OFFLINE at import."""
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")} | env
    script = Path(sys.executable).with_name("vlm-merge")
    return subprocess.run([str(script), *args], capture_output=True, text=True, env=full, timeout=300)


@pytest.mark.slow  # two CLI runs in fresh interpreters (huggingface_hub reads HF_ENDPOINT at import)
def test_an_uncached_id_downloads_what_is_needed_online_and_resolves_offline(hub, tmp_path):
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}
    done = _cli(["inspect", "tiny-org/tiny-llama", "--revision", "main", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["layout"]
    snap = tmp_path / "cache" / "models--tiny-org--tiny-llama" / "snapshots" / SHA
    needed = sorted(f for f in hub.files if f not in ("pytorch_model.bin", "optimizer.pt", "assets/diagram.png"))
    assert sorted(p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()) == needed
    assert any(r.startswith("GET /api/models/tiny-org/tiny-llama/revision/main") for r in hub.requests), hub.requests
    assert not any("optimizer.pt" in r or "pytorch_model.bin" in r for r in hub.requests)
    hub.requests.clear()
    done = _cli(["inspect", "tiny-org/tiny-llama", "--offline", "--json"], env)  # offline: the cache answers
    assert done.returncode == 0, done.stderr
    assert hub.requests == []


@pytest.mark.slow  # CLI runs in fresh interpreters
def test_offline_hint_is_the_hf_download_command_that_fetches_the_model(hub, tmp_path):
    """Offline and uncached: one line naming an `hf download` command; that command, run as printed (online),
    fetches what the offline command then reads from the cache."""
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_DISABLE_XET": "1"}
    done = _cli(["inspect", "tiny-org/tiny-llama@main", "--offline"], env)
    assert done.returncode == 2 and "Traceback" not in done.stderr and hub.requests == []
    command = done.stderr.split("download it with `", 1)[1].split("`", 1)[0]
    assert command == download_command(parse_hub_ref("tiny-org/tiny-llama@main"))
    argv = shlex.split(command)
    hf = subprocess.run([str(Path(sys.executable).with_name("hf")), *argv[1:]], capture_output=True, text=True,
                        env=os.environ | env | {"HF_HUB_OFFLINE": "0"}, timeout=120)
    assert hf.returncode == 0, hf.stderr
    assert not any("optimizer.pt" in r for r in hub.requests)
    hub.requests.clear()
    done = _cli(["inspect", "tiny-org/tiny-llama@main", "--offline", "--json"], env)
    assert done.returncode == 0, done.stderr
    assert hub.requests == []


def test_online_errors_are_one_line(hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with pytest.raises(VlmMergeError, match=r"^nobody/nothing: no such model on the Hub \(or it is private"):
        fetch_model("nobody/nothing", tmp_path / "cache")
    path = fetch_model("tiny-org/tiny-llama", tmp_path / "cache")  # in-process, same boundary
    assert (path / "README.md").is_file() and not (path / "optimizer.pt").exists()
    assert card_mod.source_license("tiny-org/tiny-llama", tmp_path / "cache") == "llama2"


def test_offline_message_names_the_hf_download_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(VlmMergeError) as e:
        fetch_model("org/model@refs/pr/1", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "huggingface-cli" not in msg
    assert msg.startswith("org/model@refs/pr/1: not a local directory and not in the Hugging Face cache")
    assert "`hf download org/model --revision refs/pr/1 --include '*.json'" in msg and f"--cache-dir {tmp_path}`" in msg
    assert "'*.safetensors'" in msg
    with pytest.raises(VlmMergeError, match="not a Hugging Face id of the form org/name"):
        fetch_model("a/b/c", tmp_path)
    with pytest.raises(VlmMergeError, match="names revision 'x' but --revision is 'y'"):
        parse_hub_ref("org/model@x", "y")
    assert with_revision("org/model", "v1.0") == "org/model@v1.0" and with_revision(str(tmp_path), None) == str(tmp_path)
    with pytest.raises(VlmMergeError, match="--revision v1: applies to Hugging Face ids only"):
        with_revision(str(tmp_path), "v1")
    with pytest.raises(VlmMergeError, match="a local directory; --revision v1 applies to Hugging Face ids only"):
        resolve_model_dir(tmp_path, revision="v1")


# ---------------------------------------------------------------- the model card


def _cached_card(cache: Path, repo_id: str, license: str) -> None:
    """A Hub id's README.md in a Hugging Face cache layout, as a download leaves it."""
    org, name = repo_id.split("/")
    root = cache / f"models--{org}--{name}"
    (root / "snapshots" / SHA).mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    (root / "snapshots" / SHA / "README.md").write_text(f"---\nlicense: {license}\n---\n")


def _output(tmp_path: Path, sources: dict, readme: str = "") -> Path:
    """A vlm-merge output directory as merge leaves it: merge_recipe.yaml, README.md, a config and weights."""
    out = tmp_path / "merged"
    out.mkdir()
    recipe = {"merge_method": "task_arithmetic", **{k: v for k, v in sources.items() if k != "models"},
              "models": [{"model": m, "parameters": {"weight": 0.7}} for m in sources.get("models", [])],
              "parameters": {}, "seed": 0}
    (out / "merge_recipe.yaml").write_text("# vlm-merge: resolved recipe\n" + yaml.safe_dump(recipe, sort_keys=False))
    (out / "README.md").write_text(readme)
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"\0" * 8)
    (out / ".vlm-merge-tmp").mkdir()
    (out / ".vlm-merge-tmp" / "debris").write_text("x")
    return out


def test_public_card_fields_licence_and_no_local_paths(tmp_path, monkeypatch, caplog):
    from huggingface_hub import ModelCard, constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for repo in ("llava-hf/llava-1.5-7b-hf", "meta-llama/Llama-2-7b-hf", "elyza/ELYZA-japanese-Llama-2-7b"):
        _cached_card(cache, repo, "llama2")
    local_ja = tmp_path / "private" / "my-ja-base"
    local_ja.mkdir(parents=True)
    (local_ja / "README.md").write_text("---\nlicense: llama2\n---\n")
    sources = {"vlm": "llava-hf/llava-1.5-7b-hf", "base_model": "meta-llama/Llama-2-7b-hf", "target": str(local_ja),
               "models": [str(cache / "models--elyza--ELYZA-japanese-Llama-2-7b" / "snapshots" / SHA)]}
    details = [f"vocabulary: from {local_ja}", "output layout: llava-hf; merged 10", f"written in {tmp_path}/x"]
    readme = card_mod.model_card("Japanese VLM by Chat Vector", "chat_vector", {}, {"vlm": "x"}, details)
    out = _output(tmp_path, sources, readme)
    evals = [card_mod.EvalRow("JA-VG-VQA-500", "rougeL", "this model", 41.5, 40.1, 42.9, 500)]
    text = card_mod.public_card(out, evals)

    card = ModelCard(text)  # parses and checks the front matter with huggingface_hub's ModelCardData
    data = card.data.to_dict()
    assert data["base_model"] == ["llava-hf/llava-1.5-7b-hf", "meta-llama/Llama-2-7b-hf", "elyza/ELYZA-japanese-Llama-2-7b"]
    assert data["base_model_relation"] == "merge" and data["license"] == "llama2"
    assert data["language"] == ["ja", "en"] and data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] == "transformers" and {"merge", "vlm-merge", "chat_vector"} <= set(data["tags"])
    for leak in (str(tmp_path), str(local_ja), str(cache), str(Path.home()), str(Path.cwd())):
        assert leak not in text, leak
    recipe = yaml.safe_load(text.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert recipe["target"] == "local:my-ja-base" and recipe["vlm"] == "llava-hf/llava-1.5-7b-hf"
    assert recipe["models"][0]["model"] == "elyza/ELYZA-japanese-Llama-2-7b"
    assert "| JA-VG-VQA-500 | rougeL | this model | 41.5000 | [40.1000, 42.9000] | 500 |" in text
    assert "output layout: llava-hf; merged 10" in text and "vocabulary: from local:my-ja-base" in text
    assert "written in" not in text  # a detail still showing a local path is left out
    with pytest.raises(VlmMergeError, match="the public card would show the local path '/srv/models/x'; not published"):
        card_mod.public_card(out, title="merged on /srv/models/x")
    assert card.content.count("# Japanese VLM by Chat Vector") == 1

    # sources under different licences: `other`, and a warning naming them
    (local_ja / "README.md").write_text("---\nlicense: apache-2.0\n---\n")
    with caplog.at_level(logging.WARNING, logger="vlm_merge.io.card"):
        text = card_mod.public_card(out)
    assert ModelCard(text).data.license == "other"
    assert any("target `apache-2.0`" in r.getMessage() and "vlm `llama2`" in r.getMessage() for r in caplog.records)


class RecordingApi:
    """huggingface_hub's HfApi at its boundary: records `create_repo` and what `upload_folder` would send."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        from huggingface_hub.utils import filter_repo_objects

        self.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
        for rel in filter_repo_objects(files, ignore_patterns=kwargs.get("ignore_patterns")):
            self.uploaded[rel] = (root / rel).read_bytes()


def test_push_folder_makes_one_upload_of_the_files_and_the_public_card(tmp_path):
    out = _output(tmp_path, {"vlm": "llava-hf/llava-1.5-7b-hf", "target": str(tmp_path / "ja")}, "# local card\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    api = RecordingApi()
    url = push_folder(out, "me/ja-vlm", "---\nlicense: llama2\n---\n# public\n", private=True, api=api)
    assert url == "https://huggingface.co/me/ja-vlm"
    assert [c for c, _ in api.calls] == ["create_repo", "upload_folder"]
    assert api.calls[0][1] == {"repo_id": "me/ja-vlm", "private": True, "exist_ok": True, "repo_type": "model"}
    up = api.calls[1][1]
    assert up["repo_id"] == "me/ja-vlm" and up["repo_type"] == "model" and up["commit_message"] == "vlm-merge: upload merged"
    assert sorted(api.uploaded) == ["README.md", "config.json", "merge_recipe.yaml", "model.safetensors"]
    assert api.uploaded["README.md"].startswith(b"---\nlicense: llama2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the output is unchanged


@pytest.mark.parametrize("repo_id", ["no-slash", "a/b/c", "org/bad name", "org/-x-", "org/" + "n" * 100])
def test_bad_repo_ids_are_one_line(repo_id):
    with pytest.raises(VlmMergeError, match=r"^--push-to-hub .*not a Hub repo id of the form ORG/NAME") as e:
        push_folder(".", repo_id, "", api=RecordingApi())
    assert "\n" not in str(e.value)


def test_chat_vector_push_to_hub_end_to_end(zoo, tmp_path, monkeypatch, capsys):
    """`vlm-merge chat-vector ... --push-to-hub` from local fixtures: checked before merging, then one upload
    whose card shows no local path."""
    import huggingface_hub

    from tests.conftest import family_of

    api = RecordingApi()
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: api)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    en, ja = family_of(zoo, "llava-hf-llama")
    argv = ["chat-vector", "--vlm", str(zoo.vlms["llava-hf-llama"]), "--en-base", str(en), "--ja-base", str(ja),
            "--out", str(tmp_path / "out"), "--quiet", "--push-to-hub", "me/ja-vlm"]
    monkeypatch.setenv("HF_TOKEN", "")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert main(argv) == 2
    assert "no Hugging Face token; log in with `hf auth login`" in error_line(capsys)
    assert not (tmp_path / "out").exists()  # refused before any merging
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    assert main([*argv[:-1], "bad/repo/id"]) == 2
    assert "not a Hub repo id of the form ORG/NAME" in error_line(capsys)
    assert main([*argv, "--private"]) == 0, capsys.readouterr().err
    assert "pushed" in capsys.readouterr().out
    assert api.calls[0][1]["private"] is True
    card = api.uploaded["README.md"].decode()
    assert str(tmp_path) not in card and str(zoo.root) not in card and "local:" in card
    assert set(api.uploaded) >= {"config.json", "merge_recipe.yaml", "README.md"}
    assert any(name.endswith(".safetensors") for name in api.uploaded)
    # `vlm-merge push` republishes the existing output with a scored card
    run = tmp_path / "eval-run"
    run.mkdir()
    (run / "scores.json").write_text(json.dumps({
        "scores": {"content_accuracy": {"mean": 0.8, "low": 0.7, "high": 0.9}},
        "benchmark": {"name": "world-ja-test", "questions_evaluated": 40}}))
    api.calls.clear()
    assert main(["push", str(tmp_path / "out"), "me/ja-vlm-2", "--eval-run", str(run)]) == 0, capsys.readouterr().err
    assert api.calls[0][1]["private"] is False and api.calls[1][1]["repo_id"] == "me/ja-vlm-2"
    assert "| world-ja-test | content_accuracy | this model | 0.8000 |" in api.uploaded["README.md"].decode()
