"""Hub references checked before anything starts, against a local HTTP server that answers as the hub's
API does (`GET /api/models/ID[/revision/REV]`, `GET /api/models/ID/auth-check`, the tree listing and
`/ID/resolve/SHA/FILE` that downloads read, errors named in `X-Error-Code`), reached through
huggingface_hub's own client at HF_ENDPOINT: no mock of the client."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from synthalign_ray.cli import app
from synthalign_ray.hub import check_hub_models
from tests.conftest import REPO
from tests.ray_head import free_port

PUBLIC, GATED, MISSING = "org/public-model", "org/gated-model", "org/no-such-model"
GRANTED_TOKEN = "hf_granted"
# Each model's revisions (branches, tags, a pull request's ref) -> (commit sha, files at that commit).
MAIN_SHA, V1_SHA, PR_SHA = "0" * 40, "1a" * 20, "2b" * 20
REVISIONS = {
    PUBLIC: {
        "main": (MAIN_SHA, {"config.json": b'{"made_at": "main"}'}),
        "v1": (V1_SHA, {"config.json": b'{"made_at": "v1"}', "model.safetensors": b"weights of v1"}),
        "refs/pr/1": (PR_SHA, {"config.json": b'{"made_at": "refs/pr/1"}'}),
    },
    GATED: {"main": ("1" * 40, {"config.json": b"{}"})},
}
GATED_FLAGS = {PUBLIC: False, GATED: "manual"}


def _commit(repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
    """(sha, files) of a branch, tag or commit sha of `repo`, as the hub resolves one; None if it has none."""
    for sha, files in REVISIONS[repo].values():
        if revision == sha:
            return sha, files
    return REVISIONS[repo].get(revision)


class FakeHub(BaseHTTPRequestHandler):
    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        path = self.path.split("?")[0]
        repo = next((r for r in REVISIONS if path.startswith((f"/api/models/{r}", f"/{r}/"))), None)
        api = f"/api/models/{repo}"
        if repo is None:
            self._answer(404, {"error": "Repository not found"}, "RepoNotFound")
        elif path == f"{api}/auth-check":
            if not GATED_FLAGS[repo] or self.headers.get("authorization") == f"Bearer {GRANTED_TOKEN}":
                self._answer(200, {})
            else:
                self._answer(403, {"error": f"Access to model {repo} is restricted."}, "GatedRepo")
        elif path == api or path.startswith(f"{api}/revision/"):
            # model_info: the default branch, or `revision/REV` (huggingface_hub quotes REV whole: refs%2Fpr%2F1)
            revision = unquote(path[len(f"{api}/revision/") :]) if path != api else "main"
            commit = _commit(repo, revision)
            if commit is None:
                self._answer(404, {"error": f"Invalid rev id: {revision}"}, "RevisionNotFound")
                return
            sha, files = commit
            siblings = [{"rfilename": name} for name in files]
            self._answer(200, {"id": repo, "sha": sha, "private": False, "gated": GATED_FLAGS[repo], "siblings": siblings})
        elif path.startswith(f"{api}/tree/"):  # a folder's listing (tree/REV[/FOLDER]; REV is quoted whole)
            revision, _, folder = path[len(f"{api}/tree/") :].partition("/")
            commit = _commit(repo, unquote(revision))
            if commit is None:
                self._answer(404, {"error": "Invalid rev id"}, "RevisionNotFound")
                return
            prefix = f"{unquote(folder)}/" if folder else ""
            listing = [
                {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                for name, data in commit[1].items()
                if name.startswith(prefix)
            ]
            if folder and not listing:
                self._answer(404, {"error": f"{unquote(folder)} does not exist"}, "EntryNotFound")
                return
            self._answer(200, listing)
        elif path.startswith(f"/{repo}/resolve/"):  # a file at a revision: hf_hub_download's HEAD, then GET
            revision, _, filename = path[len(f"/{repo}/resolve/") :].partition("/")
            commit = _commit(repo, unquote(revision))
            if commit is None or filename not in commit[1]:
                self._answer(404, {"error": "Entry not found"}, "EntryNotFound")
                return
            data = commit[1][filename]
            self._send(200, data, "application/octet-stream", {"X-Repo-Commit": commit[0], "ETag": f'"{commit[0][:8]}-{filename}"'})
        else:
            self._answer(404, {"error": "Repository not found"}, "RepoNotFound")

    def _answer(self, status: int, body, error_code: str | None = None):
        self._send(status, json.dumps(body).encode(), "application/json", {"X-Error-Code": error_code} if error_code else {})

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str]):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def checks(endpoint: str, token: str | None = None, **refs: str) -> dict[str, tuple[str | None, bool]]:
    environ = {"HF_ENDPOINT": endpoint, **({"HF_TOKEN": token} if token else {})}
    return {c.field: (c.problem, c.reached) for c in check_hub_models(refs, environ=environ)}


def test_a_public_model_passes_and_a_missing_one_is_named(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)  # no token saved on this machine counts
    found = checks(hub, images=PUBLIC, judge=MISSING, local="zoo:diffusion")
    assert set(found) == {"images", "judge"}  # zoo models and folders are not the hub's
    assert found["images"] == (None, True)
    assert found["judge"][1] and found["judge"][0].startswith(f"does not exist on {hub}")


def test_a_gated_model_needs_a_token_with_access(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    problem, reached = checks(hub, images=GATED)["images"]
    assert reached and problem.startswith(f"is gated: accept its conditions at {hub}/{GATED}, then set HF_TOKEN")
    problem, reached = checks(hub, "hf_no_access", images=GATED)["images"]
    assert reached and problem.startswith("is gated and HF_TOKEN's account has no access")
    assert checks(hub, GRANTED_TOKEN, images=GATED)["images"] == (None, True)


def test_an_unreachable_hub_checks_nothing_and_says_so_for_each_field():
    closed = f"http://127.0.0.1:{free_port()}"
    found = checks(closed, images=PUBLIC, response_scores=MISSING)
    assert {field: reached for field, (_, reached) in found.items()} == {"images": False, "response_scores": False}
    assert all(problem.startswith(f"not checked: {closed} could not be reached") for problem, _ in found.values())


def test_offline_mode_asks_nothing():
    assert check_hub_models({"images": PUBLIC}, environ={"HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}) == []


def test_config_validate_refuses_a_missing_hub_model_and_never_says_ok_unchecked(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    validate = ["config", "validate", "configs/tiny.yaml", "--set", f"response_scores.model={MISSING}"]

    monkeypatch.setenv("HF_ENDPOINT", hub)
    result = CliRunner().invoke(app, validate)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"error: response_scores.model: hub model '{MISSING}' does not exist on {hub}" in result.output

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    result = CliRunner().invoke(app, validate)
    assert result.exit_code == 0, result.output
    assert "warning: response_scores.model: hub model" in result.output
    assert "ok" not in result.output.splitlines()[-1].split()
    assert "the hub could not be reached to check response_scores.model" in result.output.splitlines()[-1]


@pytest.mark.parametrize(
    "command, field",
    [
        (["generate", "-c", "configs/tiny.yaml", "--set", f"images.model={MISSING}", "-o", "{tmp}/run"], "images.model"),
        (["train", "-c", "configs/train_tiny.yaml", "--set", f"model={MISSING}", "-d", "{tmp}", "-o", "{tmp}/train"], "model"),
        (["evaluate", "-c", "configs/eval_tiny.yaml", "-m", MISSING, "-o", "{tmp}/eval"], "--model"),
    ],
)
def test_commands_that_load_models_refuse_a_missing_hub_model_before_starting(hub, monkeypatch, tmp_path, command, field):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub)
    result = CliRunner().invoke(app, [arg.format(tmp=tmp_path) for arg in command])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert f"error: {field}: hub model '{MISSING}' does not exist on {hub}" in result.output
    assert not (tmp_path / "run").exists()  # generate wrote nothing: not even the run folder


def test_a_pinned_revision_passes_and_a_missing_one_is_named(hub, monkeypatch):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    found = checks(
        hub, tag=f"{PUBLIC}@v1", sha=f"{PUBLIC}@{V1_SHA}", pr=f"{PUBLIC}@refs/pr/1", branch=f"{PUBLIC}@main", missing=f"{PUBLIC}@v9"
    )
    assert {field: found[field] for field in ("tag", "sha", "pr", "branch")} == {f: (None, True) for f in ("tag", "sha", "pr", "branch")}
    assert found["missing"] == (f"has no revision 'v9' on {hub} (branches, tags and commit shas are accepted)", True)
    # A missing repository is named as one, whatever revision it is pinned at.
    assert checks(hub, judge=f"{MISSING}@v1")["judge"][0].startswith(f"does not exist on {hub}")


def test_config_validate_refuses_a_missing_revision_one_line_per_field(hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    monkeypatch.setenv("HF_ENDPOINT", hub)
    validate = ["config", "validate", "configs/tiny.yaml", "--set", f"response_scores.model={PUBLIC}@v9", "--set", f"image_scores.clip={PUBLIC}@v8"]
    result = CliRunner().invoke(app, validate)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    lines = result.output.splitlines()
    assert f"error: image_scores.clip: hub model '{PUBLIC}@v8' has no revision 'v8' on {hub} (branches, tags and commit shas are accepted)" in lines
    assert f"response_scores.model: hub model '{PUBLIC}@v9' has no revision 'v9' on {hub} (branches, tags and commit shas are accepted)" in lines

    result = CliRunner().invoke(app, ["config", "validate", "configs/tiny.yaml", "--set", f"response_scores.model={PUBLIC}@v1"])
    assert result.exit_code == 0 and result.output.splitlines()[-1].startswith("configs/tiny.yaml: ok"), result.output


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter with `env` over this one's: huggingface_hub reads HF_ENDPOINT, the
    cache folders and HF_HUB_OFFLINE when it is imported, as it does in a run's processes."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True, timeout=120)


def test_a_pinned_reference_loads_that_revision_and_offline_needs_it_cached(hub, tmp_path):
    """resolve_model_path downloads the pinned revision's files (not the default branch's) through
    huggingface_hub's snapshot_download from the hub at HF_ENDPOINT, all but the weights with
    weights=False (what the pinned chat-template UDF reads); offline, a config may then name that
    revision (by tag or sha) but not one the cache lacks."""
    cache = {"HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub")}
    loaded = _python(
        "import json; from pathlib import Path; from synthalign_ray.base import resolve_model_path\n"
        f"for ref, weights in [('{PUBLIC}@v1', False), ('{PUBLIC}@v1', True), ('{PUBLIC}', True)]:\n"
        "    folder = Path(resolve_model_path(ref, weights=weights))\n"
        "    print(json.dumps([str(folder), sorted(p.name for p in folder.iterdir()), json.loads((folder / 'config.json').read_text())]))",
        HF_ENDPOINT=hub, **cache,
    )
    assert loaded.returncode == 0, loaded.stderr
    no_weights, v1, main = (json.loads(line) for line in loaded.stdout.splitlines())
    assert no_weights == [v1[0], ["config.json"], {"made_at": "v1"}]
    assert v1[1:] == [["config.json", "model.safetensors"], {"made_at": "v1"}] and Path(v1[0]).name == V1_SHA
    assert main[1:] == [["config.json"], {"made_at": "main"}] and Path(main[0]).name == MAIN_SHA
    assert v1[0].startswith(cache["HF_HUB_CACHE"])

    offline = _python(
        "from synthalign_ray.base import check_model_ref\n"
        f"for ref in ['{PUBLIC}@v1', '{PUBLIC}@{V1_SHA}', '{PUBLIC}', '{PUBLIC}@refs/pr/1', '{PUBLIC}@{PR_SHA}']:\n"
        "    try:\n"
        "        print(check_model_ref(ref), 'ok')\n"
        "    except ValueError as error:\n"
        "        print(error)\n"
        "from synthalign_ray.stages.response_scores import _local_config_json\n"  # the remote-code check reads it
        f"print([_local_config_json(ref) for ref in ['{PUBLIC}@v1', '{PUBLIC}', '{PUBLIC}@refs/pr/1']])",
        HF_HUB_OFFLINE="1", HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", **cache,
    )
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout.splitlines() == [
        f"{PUBLIC}@v1 ok",
        f"{PUBLIC}@{V1_SHA} ok",
        f"{PUBLIC} ok",
        f"hub model '{PUBLIC}' at revision 'refs/pr/1' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
        f"hub model '{PUBLIC}' at revision '{PR_SHA}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
        "[{'made_at': 'v1'}, {'made_at': 'main'}, None]",
    ]


LVLM = "org/lvlm"


def test_training_and_merging_load_a_pinned_base_at_its_revision(hub, tmp_path, monkeypatch):
    """A tiny LVLM served at `v1` while its default branch holds a config no LVLM loader accepts: the
    train driver's LoRA check (config only), the worker's model load, and `synthalign merge` of an
    adapter made on it all load v1. The adapter records the revision (adapter_config.json `revision`),
    so merge finds the pinned base by itself."""
    from synthalign_ray import zoo

    folder = zoo.build("lvlm-llava")
    files = {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}
    monkeypatch.setitem(REVISIONS, LVLM, {"main": ("3" * 40, {"config.json": b'{"model_type": "bert"}'}), "v1": ("4c" * 20, files)})
    monkeypatch.setitem(GATED_FLAGS, LVLM, False)
    script = f"""
import json, sys
from synthalign_ray.train.config import load_train_config
from synthalign_ray.train.dpo import load_model, lora_config
from synthalign_ray.train.trainer import check_lora_on_meta

cfg = load_train_config({str(REPO / "configs" / "train_tiny.yaml")!r}, ["model={LVLM}@v1"])
print("=", len(check_lora_on_meta(cfg.model, cfg)))  # the driver: v1's config.json only
model = load_model(cfg.model, cfg)  # the worker
print("=", model.name_or_path, type(model).__name__)
from peft import get_peft_model
get_peft_model(model, lora_config(cfg)).save_pretrained({str(tmp_path / "adapter")!r})
from synthalign_ray.train.merge import merge_adapter  # the worker's merge at the end of a run (write_outputs)
merge_adapter(cfg.model, {str(tmp_path / "adapter")!r}, {str(tmp_path / "merged-on-worker")!r})
"""
    environ = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(tmp_path / "hub"), "SYNTHALIGN_ZOO": os.environ["SYNTHALIGN_ZOO"]}
    trained = _python(script, **environ)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert [line for line in trained.stdout.splitlines() if line.startswith("= ")] == ["= 14", f"= {LVLM} LlavaForConditionalGeneration"]
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (adapter["base_model_name_or_path"], adapter["revision"]) == (LVLM, "v1")

    merged = _python(
        f"import sys; from synthalign_ray.cli import main; sys.argv = ['synthalign', 'merge', {str(tmp_path / 'adapter')!r}, '-o', {str(tmp_path / 'merged')!r}]; main()",
        **environ,
    )
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert f"{LVLM}@v1 + {tmp_path / 'adapter'} merged" in merged.stdout
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llava"
    assert json.loads((tmp_path / "merged-on-worker" / "config.json").read_text())["model_type"] == "llava"


CHAT = "org/chat-model"


def test_the_pinned_chat_template_udf_renders_with_that_revisions_template(hub, tmp_path, monkeypatch):
    """The vLLM processor's chat-template actor for `org/chat-model@v1` downloads v1's files but the
    weights and renders with v1's chat template, not the default branch's."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    revisions = {}
    for revision, sha in (("main", "5" * 40), ("v1", "6d" * 20)):
        folder = tmp_path / revision
        words = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
        template = "{% for m in messages %}<" + revision + ":{{ m['content'] }}>{% endfor %}"
        PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", chat_template=template).save_pretrained(folder)
        files = {path.name: path.read_bytes() for path in folder.iterdir()}
        revisions[revision] = (sha, {**files, "model.safetensors": b"weights"})
    monkeypatch.setitem(REVISIONS, CHAT, revisions)
    monkeypatch.setitem(GATED_FLAGS, CHAT, False)
    rendered = _python(
        "from pathlib import Path; from synthalign_ray import ray_private\n"
        f"udf = ray_private.pinned_chat_template_udf()('__data', ['messages'], '{CHAT}@v1')\n"
        "print(udf.processor.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=False))\n"
        "print(sorted(p.name for p in Path(udf.processor.name_or_path).iterdir()))",
        HF_ENDPOINT=hub, HF_HOME=str(tmp_path / "home"), HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    template, files = rendered.stdout.splitlines()[-2:]
    assert template == "<v1:hi>"
    assert "model.safetensors" not in files and "tokenizer.json" in files
