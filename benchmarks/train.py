"""DPO throughput: 2 Ray Train workers (DeepSpeed ZeRO-2) vs 1 plain TRL process, on the same data.

Both train the tiny zoo LLaVA with LoRA on the same synthetic pairs with the same global batch and
steps. Prints, for each, the time to the first optimizer step (from the call that starts training:
Ray start-up, worker start, model load, DeepSpeed init included) and tokens/s after the first step
(TRL's own `num_tokens` count over wall-clock step times), then their ratios, measured in one run.
On a 2-core CPU box the two Ray workers share the cores the plain process uses alone: the ratio shows
the cost of the distributed machinery, not a speed-up (that needs more cores or GPUs than one process).

    python benchmarks/train.py [--pairs 32] [--steps 12] [--max-length 128]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]

from synthalign_ray.train import data as train_data
from synthalign_ray.train.config import load_train_config
from synthalign_ray.train.dpo import dpo_args, load_model, lora_config
from synthalign_ray.train.log import LOG_FILE, read_log
from synthalign_ray.train.fixture import write_pairs
from synthalign_ray.train.trainer import train


def speed(step_end: dict[int, float], tokens: dict[int, float], started: float) -> tuple[float, float]:
    """(seconds from start to the end of step 1, tokens/s over steps 2..last)."""
    first, last = min(step_end), max(step_end)
    return step_end[first] - started, (tokens[last] - tokens[first]) / (step_end[last] - step_end[first])


def plain_trl(cfg, data: str, output: str) -> tuple[float, float]:
    """One process, no Ray, no DeepSpeed: TRL's DPOTrainer as its docs run it."""
    from transformers import AutoProcessor, TrainerCallback, set_seed
    from trl import DPOTrainer

    from synthalign_ray.base import resolve_model_path

    started = time.time()
    step_end: dict[int, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            step_end[state.global_step] = time.time()

    path = resolve_model_path(cfg.model)
    files = train_data.parquet_files(data)
    dataset = train_data.load_pairs(files, train_data.image_column(files))
    set_seed(cfg.trl_args()["seed"])
    args = dpo_args(cfg, output)
    args.save_strategy = "no"
    trainer = DPOTrainer(
        model=load_model(path, cfg),
        args=args,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(path),
        peft_config=lora_config(cfg),
        callbacks=[Clock()],
    )
    trainer.train()
    tokens = {int(e["step"]): e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e}
    return speed(step_end, tokens, started)


def ray_workers(cfg, data: str, output: str) -> tuple[float, float]:
    import ray

    started = time.time()
    ray.init(num_cpus=2)
    try:
        result = train(cfg, data, output)
    finally:
        ray.shutdown()
    step_end = {int(step): t for step, t in result.worker["step_end_unix"].items()}
    tokens = {r["step"]: r["num_tokens"] for r in read_log(f"{output}/{LOG_FILE}")}
    return speed(step_end, tokens, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()

    common = [f"trl.max_steps={args.steps}", f"trl.max_length={args.max_length}", "merge=false"]
    common += [f"run.checkpoint_every={args.steps}"]  # one checkpoint, at the end: measure training
    # The same global batch of 2 pairs per step: 2 workers x 1, or 1 process x 2.
    two = load_train_config(REPO / "configs" / "train_tiny.yaml", [*common, "scaling.num_workers=2", "trl.per_device_train_batch_size=1"])
    one = load_train_config(
        REPO / "configs" / "train_tiny.yaml",
        [*common, "scaling.num_workers=1", "trl.per_device_train_batch_size=2", "deepspeed.enabled=false"],
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = write_pairs(str(Path(tmp) / "data"), args.pairs)
        plain_first, plain_tps = plain_trl(one, data, f"{tmp}/plain")
        ray_first, ray_tps = ray_workers(two, data, f"{tmp}/ray")

    print(f"{args.pairs} pairs, {args.steps} steps of 2 pairs, max_length {args.max_length}, tiny zoo LLaVA + LoRA")
    print(f"{'':34s} {'first step (s)':>15s} {'tokens/s':>10s}")
    print(f"{'1 plain TRL process':34s} {plain_first:15.1f} {plain_tps:10.0f}")
    print(f"{'2 Ray Train workers, ZeRO-2':34s} {ray_first:15.1f} {ray_tps:10.0f}")
    print(f"ratio 2 Ray workers / 1 process:   time to first step {ray_first / plain_first:.2f}x, "
          f"tokens/s {ray_tps / plain_tps:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
