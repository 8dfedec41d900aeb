"""Hub references checked before anything starts, against a local HTTP server that answers as the hub's
API does (`GET /api/models/ID`, `GET /api/models/ID/auth-check`, errors named in `X-Error-Code`), reached
through huggingface_hub's own client at HF_ENDPOINT: no mock of the client."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from synthalign_ray.cli import app
from synthalign_ray.hub import check_hub_models
from tests.ray_head import free_port

PUBLIC, GATED, MISSING = "org/public-model", "org/gated-model", "org/no-such-model"
GRANTED_TOKEN = "hf_granted"


class FakeHub(BaseHTTPRequestHandler):
    def do_GET(self):
        path = self.path.split("?")[0]
        if path == f"/api/models/{PUBLIC}":
            self._answer(200, {"id": PUBLIC, "sha": "0" * 40, "private": False, "gated": False})
        elif path == f"/api/models/{GATED}":
            self._answer(200, {"id": GATED, "sha": "1" * 40, "private": False, "gated": "manual"})
        elif path == f"/api/models/{GATED}/auth-check":
            if self.headers.get("authorization") == f"Bearer {GRANTED_TOKEN}":
                self._answer(200, {})
            else:
                self._answer(403, {"error": "Access to model org/gated-model is restricted."}, "GatedRepo")
        else:
            self._answer(404, {"error": "Repository not found"}, "RepoNotFound")

    def _answer(self, status: int, body: dict, error_code: str | None = None):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if error_code:
            self.send_header("X-Error-Code", error_code)
        self.end_headers()
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
