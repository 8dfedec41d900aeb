"""SIGKILL the `synthalign generate` driver at several points, rerun the same command, and check the
output holds every prompt exactly once (pairs + dropped), none lost, none duplicated, and that no image
committed to the stage store (checkpoints.py) was rendered again.

The run joins a Ray head the test starts (as under `ray job submit`; tests/ray_head.py), so killing the
driver kills only the driver; its job's actors are cleaned up by Ray.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import ONE_ANSWERER, REPO, stage_entry_ids
from tests.ray_head import local_ray_head, ray_env

pytestmark = pytest.mark.slow
PROMPT_IDS = sorted(json.loads(line)["id"] for line in (REPO / "configs/prompts/tiny.jsonl").read_text().splitlines())
GENERATE = [sys.executable, "-m", "synthalign_ray.cli", "generate", "--config", "configs/tiny.yaml", "--set", ONE_ANSWERER]
# On the tiny config every stage is done in a second once the vLLM engines are up, so all shards would
# land at once and a kill "after the first shard" could come too late. The pairs stage holds the block
# of weather-0001 back for a minute in that run, so the kill surely lands between shards.
HOLD_ONE_BLOCK = ["--set", "resources.env.SYNTHALIGN_INJECT_DELAYS=pairs:weather-0001=60"]
# The same for the kill among the answers: the reward model holds weather-0001's block back, so rows whose
# images and answers are committed surely have no outcome yet when the kill lands (without it, the few
# rows could all reach the output between the first answer entry and the kill).
HOLD_AFTER_ANSWERS = ["--set", "resources.env.SYNTHALIGN_INJECT_DELAYS=response_scores:weather-0001=60"]


@pytest.fixture(scope="module")
def ray_head():
    with local_ray_head() as head:
        yield head.address


def shards(out: Path, folder: str) -> list[Path]:
    return sorted((out / folder).glob("*.parquet"))


def committed_ids(out: Path) -> list[str]:
    return sorted(i for folder in ("pairs", "dropped") for f in shards(out, folder) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def start(out: Path, env: dict, log: Path, extra: list[str]) -> subprocess.Popen:
    with log.open("w") as sink:
        return subprocess.Popen([*GENERATE, "--output", str(out), *extra], cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT)


def kill_when(process: subprocess.Popen, condition, timeout: float) -> bool:
    """SIGKILL the driver as soon as `condition()` holds; False if it finished first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return False
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.2)
    process.kill()
    raise AssertionError("kill point not reached in time")


def test_driver_killed_at_several_points_then_resumed_exactly_once(ray_head, tmp_path):
    out = tmp_path / "run"
    env = ray_env(RAY_ADDRESS=ray_head)
    started, committed, answered = time.time(), 0, 0
    kills = {
        "while starting up": lambda: time.time() - started > 4,
        "while the actor pools load models": lambda: time.time() - started > 20,
        "while the answerer runs": lambda: len(stage_entry_ids(out, "responses[llava-1.5]")) > answered,
        "after the first committed shard": lambda: len(committed_ids(out)) > committed,
    }
    killed_at = []
    for n, (point, condition) in enumerate(kills.items()):
        started, committed, answered = time.time(), len(committed_ids(out)), len(stage_entry_ids(out, "responses[llava-1.5]"))
        log = tmp_path / f"run{n}.log"
        holds = {"while the answerer runs": HOLD_AFTER_ANSWERS, "after the first committed shard": HOLD_ONE_BLOCK}
        process = start(out, env, log, holds.get(point, []))
        if kill_when(process, condition, timeout=600):
            killed_at.append(point)
            ids = committed_ids(out)
            assert len(ids) == len(set(ids)), f"duplicate ids after a kill {point}"
        else:
            assert process.returncode == 0, log.read_text()[-6000:]
        if point == "while the answerer runs":
            assert point in killed_at, "the run ended before its first answer entry was seen"
            rendered, done = set(stage_entry_ids(out, "images")), set(committed_ids(out))
        if point == "after the first committed shard":
            # The run after the kill among the answers restored every image committed before it (its
            # manifest, written before its first wave, plans it) and rendered only the others.
            images = json.loads((out / "manifest.json").read_text())["checkpoints"]["images"]
            assert images["reused"] == len(rendered - done) > 0, (images, rendered, done)
            assert images["computed"] == len(PROMPT_IDS) - len(done) - images["reused"]
    assert killed_at[:2] == ["while starting up", "while the actor pools load models"]
    assert killed_at[-2:] == ["while the answerer runs", "after the first committed shard"]
    assert 0 < len(committed_ids(out)) < len(PROMPT_IDS), "the last kill did not land mid-run"
    assert json.loads((out / "manifest.json").read_text())["complete"] is False

    result = subprocess.run([*GENERATE, "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert committed_ids(out) == PROMPT_IDS  # every prompt exactly once
    assert stage_entry_ids(out, "images") == PROMPT_IDS  # and each image rendered once, over all five runs
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True
    counts = manifest["counts"]
    assert counts["pairs"] + counts["dropped"] + counts["failed"] == counts["rows"] == len(PROMPT_IDS)
