"""`synthalign generate` on configs/tiny.yaml, as a user runs it: Parquet out, read back with `datasets`."""

import json
import os
import subprocess
import sys

import datasets
import pytest
from PIL import Image

from tests.conftest import REPO

pytestmark = pytest.mark.slow
SYNTHALIGN = [sys.executable, "-m", "synthalign_ray.cli"]


def run_cli(*args, check=True):
    result = subprocess.run([*SYNTHALIGN, *args], capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def load(folder):
    return datasets.load_dataset("parquet", data_files=str(folder / "images" / "*.parquet"), split="train")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    # First a run cut short (only 3 prompts), then the full command: it must resume, not redo.
    run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(out), "--set", "prompts.limit=3")
    result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(out))
    assert "6/6 rows completed (3 this run), 0 failed" in result.stdout
    return out


def test_every_prompt_has_k_candidates_scores_and_the_chosen_image(run_dir):
    ds = load(run_dir)
    prompts = [json.loads(line) for line in (REPO / "configs" / "prompts" / "tiny.jsonl").read_text().splitlines()]
    assert sorted(ds["id"]) == sorted(p["id"] for p in prompts)  # exactly once each
    for row in ds:
        assert row["status"] == "ok" and row["error"] is None
        assert row["guidance_scales"] == [5.0, 7.0, 9.0, 11.0]
        assert len(row["candidate_images"]) == 4 and all(isinstance(i, Image.Image) for i in row["candidate_images"])
        assert isinstance(row["image"], Image.Image) and row["image"].size == (64, 64)
        for column in ("image_scores", "clip_scores", "blip_scores"):
            assert len(row[column]) == 4
        assert row["image_index"] == max(range(4), key=lambda k: (row["image_scores"][k], -k))
        assert row["image"].tobytes() == row["candidate_images"][row["image_index"]].tobytes()


def test_manifest_accounts_for_every_input_row(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    assert counts["input_rows"] == counts["rows"] + counts["rejected_input_rows"] == 6
    assert counts["completed"] + counts["failed"] == counts["rows"]
    assert manifest["config"]["images"]["guidance_scales"] == [5.0, 7.0, 9.0, 11.0]
    assert manifest["models"]["images.model"] == "zoo:diffusion"
    assert {"ray", "torch", "diffusers", "transformers"} <= set(manifest["versions"])


def test_rerun_is_a_no_op_and_reproducible(run_dir, tmp_path):
    before = sorted(load(run_dir)["id"])
    result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(run_dir))
    assert "6/6 rows completed (0 this run)" in result.stdout
    assert sorted(load(run_dir)["id"]) == before
    # A fresh run of two prompts renders the same pixels and scores as the first run did.
    fresh = tmp_path / "fresh"
    run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(fresh), "--set", "prompts.limit=2")
    again = {r["id"]: r for r in load(fresh)}
    for row in load(run_dir):
        if row["id"] in again:
            assert row["image_scores"] == again[row["id"]]["image_scores"]
            assert row["image"].tobytes() == again[row["id"]]["image"].tobytes()


def test_user_errors_exit_2_without_traceback(tmp_path):
    result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(tmp_path), "--set", "images.steps=-1", check=False)
    assert result.returncode == 2
    assert "configs/tiny.yaml: images.steps: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    result = run_cli("config", "validate", "configs/tiny.yaml", "--set", f"prompts.path={bad}", check=False)
    assert result.returncode == 2 and "line 2: duplicate id 'a'" in result.stderr
