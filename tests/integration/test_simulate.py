"""`synthalign simulate` (capacity questions only) on 8 fake GPUs: the paper's config and profile, a few
rows. Checks the plumbing of the simulation itself: generate's accounting holds, every pool started the
planned replicas on the planned fake GPUs, a rerun resumes. It never stands in for a functional test."""

import json
import os
import subprocess
import sys

import pytest

from synthalign_ray.config import load_config
from synthalign_ray.capacity.plan import best_split, load_profile, stage_rates
from tests.conftest import REPO

pytestmark = pytest.mark.slow
CONFIG = REPO / "configs" / "paper.yaml"
PROFILE = REPO / "configs" / "profiles" / "paper_a100.yaml"
ROWS = 96


def simulate(output, *sets):
    command = [
        sys.executable, "-m", "synthalign_ray.cli", "simulate", "--config", str(CONFIG), "--profile", str(PROFILE),
        "--gpus", "8", "--rows", str(ROWS), "--output", str(output), "--time-scale", "0.004",
        *[arg for item in sets for arg in ("--set", item)],
    ]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}  # paper.yaml names hub models; none is loaded
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return result


def test_simulate_accounting_and_planned_replicas(tmp_path):
    output = tmp_path / "sim8"
    first = simulate(output)
    manifest = json.loads((output / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["complete"] and counts["rows"] == ROWS
    assert counts["pairs"] + counts["dropped"] + counts["failed"] == ROWS
    assert counts["pairs"] == ROWS, counts  # simulated answers get distinct scores: every row is a pair
    assert counts["processed_this_run"] == ROWS

    planned = best_split(stage_rates(load_config(CONFIG), load_profile(PROFILE)), 8)
    assert planned == {
        "images": 3, "image_scores": 1, "llava-v1.6-mistral-7b": 1, "llava-v1.6-vicuna-13b": 1,
        "llava-v1.6-vicuna-7b": 1, "response_scores": 1,
    }
    summary = json.loads((output / "simulation" / "simulation.json").read_text())
    assert summary["replicas"] == planned
    started = summary["actors_started"]
    assert {stage: s["replicas"] for stage, s in started.items()} == planned
    assert {stage: s["gpus"] for stage, s in started.items()} == {stage: float(n) for stage, n in planned.items()}
    # Each fake GPU went to exactly one replica: Ray placed the pools on distinct GPU ids.
    gpu_ids = [i for s in started.values() for i in s["gpu_ids"]]
    assert len(gpu_ids) == len(set(gpu_ids)) == 8
    assert summary["bound_rows_per_s"] == pytest.approx(3 * 2 / 28.0)
    assert "achieved / bound" in first.stdout

    again = simulate(output)  # the same command resumes: nothing left to do
    assert json.loads((output / "manifest.json").read_text())["counts"]["processed_this_run"] == 0
    assert f"{ROWS} rows -> {ROWS} pairs" in again.stdout


def test_waves_run_one_after_the_other_and_add_up(tmp_path):
    output = tmp_path / "waves"
    simulate(output, "resources.rows_per_block=8", "resources.blocks_per_wave=5")  # 12 blocks: waves of 5, 5, 2
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["waves"] == 3 and manifest["counts"]["pairs"] == ROWS
    # each wave was driven by a process of its own, which reported its peak memory
    assert len(manifest["wave_process_peak_rss_mib"]) == 3 and all(mib > 0 for mib in manifest["wave_process_peak_rss_mib"])
    assert [operator["rows_out"] for operator in manifest["operators"]] == [ROWS] * len(manifest["operators"])
    assert manifest["operators"][0]["stage"] == "ReadBlockFile" and manifest["operators"][-1]["stage"].endswith("Write")
    # the stand-ins are named by the stages they stand for
    assert [stage["stage"] for stage in manifest["stages"]][:3] == ["prompts", "images", "image_scores"]
