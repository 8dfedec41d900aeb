"""benchmarks/gpu_check.py's pure parts: the GPU peaks and MFU, FLOP counting, the training recipe it mirrors, the
failures it reports, and the measured profile it writes for `plan`. (The whole script runs in
tests/integration/test_gpu_check.py.)"""

import pytest
import yaml

from synthalign_ray.capacity.plan import load_profile, write_profile
from synthalign_ray.train.config import load_train_config
from synthalign_ray.train.dpo import lora_config
from tests.conftest import REPO, benchmark_script

gpu_check = benchmark_script("gpu_check")

PAPER = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())


@pytest.mark.parametrize(
    "name, tflops",
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", None),
        (None, None),
    ],
)
def test_peak_by_gpu_name(name, tflops):
    assert gpu_check.peak_bf16_tflops(name) == tflops


def test_mfu():
    assert gpu_check.mfu(989e12 / 2, 1.0, 989.0) == pytest.approx(0.5)
    assert gpu_check.mfu(1e12, 2.0, None) is None


def test_counted_flops_come_from_the_shapes():
    import torch

    layer = torch.nn.Linear(8, 4, bias=False)
    flops, out = gpu_check.counted_flops(lambda: layer(torch.ones(3, 8)))
    assert out.shape == (3, 4)
    assert flops["Global"] == 2 * 3 * 8 * 4
    assert flops["Linear"] == 2 * 3 * 8 * 4  # per top-level module class: how the images section finds the transformer


def test_answer_lengths_spread_over_the_range():
    assert gpu_check.answer_lengths(5, 200, 400) == [200, 250, 300, 350, 400]
    assert gpu_check.answer_lengths(1, 200, 400) == [400]


def test_dpo_settings_mirror_the_training_code():
    """gpu_check reads train_paper.yaml without synthalign_ray.train (which imports Ray and TRL): the same recipe."""
    path = REPO / "configs" / "train_paper.yaml"
    cfg = load_train_config(path, ["model=zoo:lvlm-llava"])  # no hub here
    settings = gpu_check.dpo_settings(yaml.safe_load(path.read_text()))
    trl = cfg.trl_args()
    assert (settings.beta, settings.loss_type, settings.max_length, settings.learning_rate) == (
        trl["beta"], trl["loss_type"], trl["max_length"], trl["learning_rate"],
    )  # fmt: skip
    assert (settings.micro_batch, settings.accumulation) == (1, 4) == (
        trl["per_device_train_batch_size"], trl["gradient_accumulation_steps"],
    )  # fmt: skip
    assert (settings.gradient_checkpointing, settings.bf16) == (trl["gradient_checkpointing"], cfg.use_bf16())
    ours, theirs = gpu_check.lora_config(settings), lora_config(cfg)
    for field in ("r", "lora_alpha", "lora_dropout", "target_modules", "bias", "task_type"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_failures_name_errors_and_failed_checks():
    sections = {
        "images": {"checks": {"float16 finite": True, "bfloat16 parity": False}},
        "armorm": {"error": "OutOfMemoryError: CUDA out of memory", "checks": {}},
        "dpo": {"checks": {"loss finite": True}},
    }
    assert gpu_check.failures(sections) == [
        "armorm: OutOfMemoryError: CUDA out of memory",
        "images: check failed: bfloat16 parity",
    ]


SECTIONS = {
    "images": {"height": 1024, "steps": 28, "float16": {"batched": {"prompts_per_s": 0.1}}},
    "image_reward": {"stage_batch_size": 16, "sweep": [{"batch_size": 1, "images_per_s": 5.0},
                                                       {"batch_size": 16, "images_per_s": 64.0}]},
    "armorm": {"rows": 16, "answers": 48, "tokens": 16000,
               "sweep": [{"micro_batch_size": 16, "rows_per_s": 4.0}, {"micro_batch_size": 32, "rows_per_s": 5.0}]},
}  # fmt: skip


def test_measured_stages_at_the_paper_configs_batch_sizes():
    stages = gpu_check.measured_stages(SECTIONS, PAPER)
    assert sorted(stages) == ["image_scores", "images", "response_scores"]
    assert (stages["images"].batch_size, stages["images"].seconds_per_batch) == (2, pytest.approx(20.0))
    # 8 prompts x 4 candidate images at 64 images/s, at the stage's own batch of 16
    assert (stages["image_scores"].batch_size, stages["image_scores"].seconds_per_batch) == (8, pytest.approx(0.5))
    # 8 prompts at paper.yaml's micro-batch (16 answers per forward pass)
    assert (stages["response_scores"].batch_size, stages["response_scores"].seconds_per_batch) == (8, pytest.approx(2.0))
    assert all(stage.num_gpus == 1 for stage in stages.values())


def test_a_stage_without_figures_is_not_measured():
    sections = {**SECTIONS, "images": {"error": "RuntimeError: boom"}}
    sections["armorm"] = {**SECTIONS["armorm"], "sweep": SECTIONS["armorm"]["sweep"][1:]}  # not at micro-batch 16
    assert sorted(gpu_check.measured_stages(sections, PAPER)) == ["image_scores"]


def test_measured_profile_is_what_plan_reads(tmp_path):
    estimates = load_profile(gpu_check.ESTIMATES)
    measured = gpu_check.measured_stages(SECTIONS, PAPER)
    profile = gpu_check.measured_profile("NVIDIA H100 80GB HBM3", estimates, measured, "a test")
    write_profile(profile, tmp_path / "profile.yaml")
    loaded = load_profile(tmp_path / "profile.yaml")
    assert (loaded.gpu, loaded.source.kind) == ("NVIDIA H100 80GB HBM3", "measured")
    assert [s.name for s in loaded.stages] == [s.name for s in estimates.stages]
    for stage in loaded.stages:
        if stage.name in measured:
            assert stage == measured[stage.name]
        else:
            assert stage.note.startswith("estimate, not measured by gpu_check")
            assert stage.seconds_per_batch == estimates.stage(stage.name).seconds_per_batch


def test_measured_profile_refuses_a_stage_the_estimates_lack():
    estimates = load_profile(gpu_check.ESTIMATES)
    stray = gpu_check.measured_stages(SECTIONS, PAPER)["images"].model_copy(update={"name": "judge"})
    with pytest.raises(ValueError, match="judge"):
        gpu_check.measured_profile("cpu", estimates, {"judge": stray}, "a test")
