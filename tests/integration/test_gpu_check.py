"""`benchmarks/gpu_check.py --tiny`: the GPU check on the twins on the CPU, where Ray, vLLM, TRL and `datasets` cannot
be imported (the GPU machines have none of them), so the kit keeps working between the rare GPU windows."""

import json
import math
import os
import subprocess

import pytest

from synthalign_ray.capacity.plan import load_profile
from tests.conftest import REPO, benchmark_script
from tests.without_packages import command

pytestmark = pytest.mark.slow

ABSENT_ON_GPU_MACHINES = ["ray", "vllm", "trl", "datasets"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def assert_measured(figures: dict, rate: str) -> None:
    assert positive(figures[rate]) and positive(figures["seconds"]) and positive(figures["flops"]), figures
    assert figures["peak_memory_bytes"] is None and figures["mfu"] is None  # the CPU: no allocator peak, no bf16 peak


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    result = subprocess.run(
        command(ABSENT_ON_GPU_MACHINES, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)),
        cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return result, json.loads((out / "gpu_check.json").read_text()), out / "profile.yaml"


def test_runs_every_section_and_passes_its_checks(checked):
    result, report, _ = checked
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    assert report["mode"] == "tiny" and report["failures"] == []
    assert list(report["sections"]) == ["images", "image_reward", "armorm", "dpo"]
    for name, section in report["sections"].items():
        assert "error" not in section, (name, section.get("traceback"))
        assert section["checks"] and all(section["checks"].values()), (name, section["checks"])
    assert "== dpo" in result.stdout and "FlopCounterMode" in result.stdout  # a line per section, the FLOP formula


def test_images_batched_against_one_call_per_scale(checked):
    images = checked[1]["sections"]["images"]
    for dtype in ("float16", "bfloat16"):
        measured = images[dtype]
        for mode in ("batched", "per_scale"):
            assert_measured(measured[mode], "images_per_s")
        assert measured["batched"]["calls"] == 1 and measured["per_scale"]["calls"] == 4
        assert positive(measured["speedup"]) and measured["finite"] is True
        parity = measured["parity"]
        assert parity["largest"] <= parity["limit_largest"] and parity["mean"] <= parity["limit_mean"], parity
    assert images["float16"]["parity"]["limit_largest"] == 4 and images["bfloat16"]["parity"]["limit_largest"] == 64


def test_score_sweeps_and_dpo_step(checked):
    sections = checked[1]["sections"]
    reward, armorm, dpo = sections["image_reward"], sections["armorm"], sections["dpo"]
    assert [m["batch_size"] for m in reward["sweep"]] == [1, 16] and "skipped" in reward["official"]
    for measured in reward["sweep"]:
        assert_measured(measured, "images_per_s")
    assert [m["micro_batch_size"] for m in armorm["sweep"]] == [1, 16]
    for measured in armorm["sweep"]:
        assert_measured(measured, "tokens_per_s")
        assert positive(measured["rows_per_s"]) and positive(measured["answers_per_s"])
    assert_measured(dpo, "tokens_per_s")
    assert dpo["settings"]["lora_r"] == 128 and dpo["settings"]["accumulation"] == 4
    assert dpo["image_tokens"] > 0 and positive(dpo["loss"]) and positive(dpo["trainable_parameters"])


def test_profile_is_measured_and_plan_reads_it(checked):
    profile = load_profile(checked[2])
    assert (profile.gpu, profile.source.kind) == ("cpu", "measured")
    estimates = load_profile(REPO / "configs" / "profiles" / "paper_a100.yaml")
    assert [s.name for s in profile.stages] == [s.name for s in estimates.stages]
    for stage in profile.stages:
        measured = stage.name in ("images", "image_scores", "response_scores")
        assert stage.note.startswith("measured" if measured else "estimate, not measured by gpu_check"), stage


def test_paper_scale_image_reward_against_the_official_package(tmp_path, monkeypatch):
    """What --tiny cannot reach, on the CPU: the paper-scale build (ViT-L/16 and BERT-base at the released widths and
    depths, built where it runs, then deleted) and the official package scoring one image at a time on its weights."""
    import yaml

    gpu_check = benchmark_script("gpu_check")
    monkeypatch.setenv("SYNTHALIGN_ZOO", str(tmp_path))
    sizes = gpu_check.dataclasses.replace(gpu_check.PAPER, device="cpu", reward_pairs=4, reward_batches=(4,))
    run = gpu_check.Run(tiny=False, layers=None, sizes=sizes, peak_tflops=None,
                        paper=yaml.safe_load(gpu_check.PAPER_CONFIG.read_text()))  # fmt: skip
    section = gpu_check.run_section("image_reward", run)
    assert "error" not in section, section.get("traceback")
    official = section["official"]
    assert official["pairs"] == 4 and positive(official["speedup"])
    assert official["largest_score_difference"] < 1e-4  # the same weights, batched or not
    assert_measured(section["sweep"][0], "images_per_s")
    assert list(tmp_path.iterdir()) == []  # the build is gone once measured
