"""`ray job submit` of the tiny generate job, its resume, and the tiny DPO training on its pairs, to a Ray
head the test starts on 127.0.0.1 with Ray's token auth on, joined by a worker node, as a user submits to a
cluster: the client has RAY_AUTH_MODE=token and the token (without the mode it sends none and is refused),
`--working-dir .` uploads the repo, the job joins the cluster through the RAY_ADDRESS Ray gives it. The
output goes to s3:// on a local S3-compatible server (moto's), as a cluster's would go to a bucket; one
generate run serves the job, the object-storage and the resume checks.

The head is the test's own and is stopped without touching anyone else's Ray (tests/ray_head.py).
"""

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from synthalign_ray import store
from tests.conftest import ONE_ANSWERER, REPO
from tests.ray_head import RAY, RayHead, local_ray_head
from tests.integration.test_object_storage import BUCKET, S3_CREDENTIALS, s3_endpoint  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow
PROMPT_IDS = sorted(json.loads(line)["id"] for line in (REPO / "configs/prompts/tiny.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def ray_head_with_dashboard():
    """A head with the dashboard (the job server) on free loopback ports and Ray's token auth on: a token
    file and RAY_AUTH_MODE=token, as cluster/*.yaml start their nodes (they mount the laptop's token)."""
    with local_ray_head(dashboard=True, token_auth=True) as head:
        yield head


def submit(head: RayHead, *entrypoint: str, env_vars: dict, timeout: float) -> subprocess.CompletedProcess:
    runtime_env = {
        # The repo goes up as the job's working dir; the local venv and outputs do not.
        "excludes": [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", "*.egg-info"],
        # The job's driver and its workers build and load the zoo models the test session uses, and
        # reach the bucket with the credentials and endpoint given here.
        "env_vars": {
            "SYNTHALIGN_ZOO": os.environ["SYNTHALIGN_ZOO"],
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            **env_vars,
        },
    }
    # The entry point runs through the head's shell: name the venv's python (on a cluster node the
    # launcher puts it first on the PATH, so `python` is the same interpreter).
    command = [
        RAY, "job", "submit", "--address", head.dashboard, "--working-dir", ".",
        "--runtime-env-json", json.dumps(runtime_env), "--", sys.executable, *entrypoint,
    ]  # fmt: skip
    # A fresh head's job server answers before its dashboard agent has registered, and then refuses jobs
    # with "No available agent to submit job, please try again later": as it says, try again.
    deadline = time.monotonic() + 300  # a loaded machine (CI runners) registers the agent late
    while True:
        # The documented submit: RAY_AUTH_MODE=token, the token from its file (head.env).
        result = subprocess.run(command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=timeout)
        if "No available agent to submit job" not in result.stdout + result.stderr or time.monotonic() > deadline:
            return result
        time.sleep(3)


def ids_in(output: str, folder: str) -> list[str]:
    fs, _ = store.filesystem(output)
    shards = store.list_shards(store.join(output, folder))
    return [i for shard in shards for i in pq.read_table(shard, columns=["id"], filesystem=fs).column("id").to_pylist()]


def test_generate_resume_and_train_jobs_on_s3_submitted_to_two_nodes_with_auth(ray_head_with_dashboard, s3_endpoint, tmp_path, monkeypatch):
    run, dpo = f"s3://{BUCKET}/tiny", tmp_path / "dpo"
    s3_env = {**S3_CREDENTIALS, "AWS_ENDPOINT_URL": s3_endpoint}
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # this process reads the bucket too
    generate = ["jobs/generate.py", "--config", "configs/tiny.yaml", "--set", ONE_ANSWERER, "--output", run]
    head = ray_head_with_dashboard
    without_mode = {key: value for key, value in head.env.items() if key != "RAY_AUTH_MODE"}
    # A worker node joins the way cluster/*.yaml start theirs, with RAY_AUTH_MODE=token, and only so: the jobs
    # then run on a cluster of two nodes with auth on.
    refused_node = head.add_node(2, without_mode)
    assert refused_node.returncode != 0 and "InvalidAuthToken" in refused_node.stdout + refused_node.stderr
    joined = head.add_node(2)
    assert joined.returncode == 0, joined.stdout[-3000:] + joined.stderr[-3000:]

    started = time.monotonic()
    result = submit(head, *generate, env_vars=s3_env, timeout=900)
    generate_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "succeeded" in result.stdout
    # Token auth is on: the same client without RAY_AUTH_MODE=token sends no token, and is refused.
    refused = subprocess.run([RAY, "job", "list", "--address", head.dashboard], env=without_mode, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode != 0, refused.stdout[-3000:]
    assert "Token authentication is enabled but no authentication token was found" in refused.stdout + refused.stderr

    manifest = store.read_json(store.join(run, store.MANIFEST))
    counts = manifest["counts"]
    assert manifest["complete"] is True
    assert counts["pairs"] + counts["dropped"] + counts["failed"] == counts["rows"] == len(PROMPT_IDS)
    committed = {folder: ids_in(run, folder) for folder in ("pairs", "dropped", "failed")}
    assert sorted(sum(committed.values(), [])) == PROMPT_IDS  # every prompt exactly once
    assert counts["pairs"] == len(committed["pairs"]) > 0  # something for the training job

    # The pairs as TRL's DPOTrainer gets them: `datasets` decodes the images from the shards' features.
    import datasets

    fs, _ = store.filesystem(run)
    shards = store.list_shards(store.join(run, "pairs"))
    pairs = datasets.Dataset(pq.ParquetDataset(shards, filesystem=fs).read())
    assert pairs[0]["images"][0].size == (64, 64) and pairs[0]["chosen"] and pairs[0]["rejected"]

    # The same job again: a resume with nothing left to do but the failed rows, which it retries.
    shards_before = {folder: store.list_shards(store.join(run, folder)) for folder in ("pairs", "dropped")}
    started = time.monotonic()
    result = submit(head, *generate, env_vars=s3_env, timeout=600)
    resume_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    resumed = store.read_json(store.join(run, store.MANIFEST))
    assert resumed["complete"] is True and resumed["counts"]["processed_this_run"] == counts["failed"]
    if counts["failed"] == 0:
        assert {f: store.list_shards(store.join(run, f)) for f in ("pairs", "dropped")} == shards_before
    assert sorted(ids_in(run, "pairs") + ids_in(run, "dropped") + ids_in(run, "failed")) == PROMPT_IDS
    ids_in_before = {"pairs": ids_in(run, "pairs")}

    # DPO on those pairs, read from the bucket: two Ray Train workers on the same head, two steps.
    started = time.monotonic()
    result = submit(
        head, "jobs/train_dpo.py", "--config", "configs/train_tiny.yaml",
        "--data", run, "--output", str(dpo), "--set", "trl.max_steps=2", "--set", "run.checkpoint_every=2",
        # Two nodes: a local output is refused unless declared shared, as it truly is between processes of one machine.
        "--set", "run.shared_filesystem=true",
        env_vars=s3_env, timeout=600,
    )  # fmt: skip
    train_seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert (dpo / "train_summary.json").is_file()
    steps = [json.loads(line) for line in (dpo / "train_log.jsonl").read_text().splitlines() if line.strip()]
    assert max(step["step"] for step in steps if "step" in step) == 2
    assert (dpo / "adapter" / "adapter_config.json").is_file()

    # Another pair filter on the bucket: a new generation built from the stage store on s3 (checkpoints.py),
    # with no model started; the first generation moves aside, whole.
    result = submit(head, *generate, "--set", "pairs.min_margin=1000", env_vars=s3_env, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    changed = store.read_json(store.join(run, store.MANIFEST))
    assert [figures["computed"] for figures in changed["checkpoints"].values()] == [0] * len(changed["checkpoints"])
    assert changed["counts"]["dropped_by_reason"] == {"low_margin": len(PROMPT_IDS)}
    assert sorted(ids_in(store.join(run, "generations", manifest["config_fingerprint"]), "pairs")) == sorted(ids_in_before["pairs"])
    print(f"\ngenerate job {generate_seconds:.0f} s, resume job {resume_seconds:.0f} s, train job {train_seconds:.0f} s")
