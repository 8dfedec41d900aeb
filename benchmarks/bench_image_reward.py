"""ImageReward: the official package scoring one image at a time vs our batched scorer, same weights, same pairs.

Writes a random-weight checkpoint of the package's real architecture (ViT-L/16 at 224 px; 2 text layers), scores the
same (prompt, image) pairs with the official package (as it is meant to be called: `model.score(prompt, image)` per
pair, through the transformers 5 patches in synthalign_ray.models._official_image_reward) and with
`load_image_reward(...).score(prompts, images)` in one batch, in float32 and in bfloat16. Prints times, the speedup over
the package and the largest score difference from it. Each scorer scores one pair first, untimed, so one-off kernel
set-up is not counted; then the scorers take turns for a few rounds and the best round counts, because the machines we
run on are shared and a single round can be slowed by someone else's job.

    .venv/bin/python benchmarks/bench_image_reward.py [--pairs 16] [--rounds 3] [--checkpoint DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from synthalign_ray.models._official_image_reward import official_image_reward
from synthalign_ray.models.image_reward import (
    CHECKPOINT_FILE,
    MED_CONFIG_FILE,
    load_image_reward,
    write_random_checkpoint,
)

PROMPTS = [
    "a red dog running in the park",
    "two cats sitting on a table, watercolor",
    "sunset over the ocean with boats",
    "an old man reading a book in a quiet library",
]
IMAGE_SIZES = [(512, 512), (768, 512), (512, 768), (640, 480)]  # (width, height): diffusion-like outputs


def benchmark_pairs(count: int) -> tuple[list[str], list[Image.Image]]:
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        width, height = IMAGE_SIZES[index % len(IMAGE_SIZES)]
        pixels = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)  # smooth-ish once upscaled
        images.append(Image.fromarray(pixels).resize((width, height), Image.BILINEAR))
    return [PROMPTS[index % len(PROMPTS)] for index in range(count)], images


def official_one_at_a_time(package, checkpoint: Path, device: str):
    """The official package as it is meant to be called: `model.score(prompt, image)` for each pair in turn."""
    model = package.load(str(checkpoint / CHECKPOINT_FILE), device=device, med_config=str(checkpoint / MED_CONFIG_FILE))
    return lambda prompts, images: [model.score(prompt, image) for prompt, image in zip(prompts, images)]


def run(checkpoint: Path, pair_count: int, rounds: int) -> None:
    prompts, images = benchmark_pairs(pair_count)
    with official_image_reward(checkpoint) as package:
        official = official_one_at_a_time(package, checkpoint, "cpu")
        ours_fp32 = load_image_reward(checkpoint, dtype=torch.float32, batch_size=pair_count)
        ours_bf16 = load_image_reward(checkpoint, dtype=torch.bfloat16, batch_size=pair_count)
        contenders = {
            "official package, one at a time, fp32": lambda pairs: official(*pairs),
            "ours, one batch, fp32": lambda pairs: ours_fp32.score(*pairs),
            "ours, one batch, bf16": lambda pairs: ours_bf16.score(*pairs),
        }
        for score_pairs in contenders.values():
            score_pairs((prompts[:1], images[:1]))
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        scores: dict[str, list[float]] = {}
        for _ in range(rounds):  # interleaved, so a burst of load from other processes hits every contender alike
            for name, score_pairs in contenders.items():
                start = time.perf_counter()
                scores[name] = score_pairs((prompts, images))
                seconds[name].append(time.perf_counter() - start)

    reference_name = next(iter(contenders))
    reference_best = min(seconds[reference_name])
    print(f"ImageReward ViT-L/16, {pair_count} pairs, best of {rounds} interleaved rounds, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'scorer':38s} {'best s':>7s} {'median s':>9s} {'s/pair':>7s} {'speedup':>8s} {'max |diff|':>11s}")
    for name in contenders:
        best = min(seconds[name])
        max_difference = max(abs(a - b) for a, b in zip(scores[name], scores[reference_name]))
        print(f"{name:38s} {best:7.2f} {statistics.median(seconds[name]):9.2f} {best / pair_count:7.3f} "
              f"{reference_best / best:7.2f}x {max_difference:11.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per scorer; the best one is reported")
    parser.add_argument("--checkpoint", type=Path, help="an existing vit='large' random checkpoint folder to reuse")
    args = parser.parse_args()
    if args.checkpoint is not None:
        run(args.checkpoint, args.pairs, args.rounds)
        return
    with tempfile.TemporaryDirectory(prefix="bench-image-reward-") as folder:
        run(write_random_checkpoint(Path(folder), seed=0, vit="large"), args.pairs, args.rounds)


if __name__ == "__main__":
    main()
