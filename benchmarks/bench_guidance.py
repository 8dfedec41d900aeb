"""Batched guidance vs one denoising call per guidance scale, on the same prompts and seeds.

Prints the time of each mode (median of --repeats runs after a warm-up), their ratio (target >= 1.5x
at 8 prompts x 4 scales) and the largest pixel difference between the two modes' images (parity:
uint8 rounding only, <= 1). Both modes go through the real ImageGenerator stage.

    python benchmarks/bench_guidance.py [--prompts 8] [--steps 28] [--model zoo:diffusion]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from synthalign_ray.hf_image import decode_image
from synthalign_ray.stages.images import ImageGenerator, ImagesConfig
from synthalign_ray.stages.prompts import prompt_seed, prompts_table
from synthalign_ray.zoo import CORPUS


def benchmark_rows(count: int) -> list[dict]:
    """`count` prompt rows of seven corpus words each, with the seeds a run would give them."""
    return [
        {"id": f"b{i}", "category": "bench", "t2i_prompt": " ".join(CORPUS[7 * i : 7 * i + 7]), "seed": prompt_seed(0, f"b{i}"), "source_line": i}
        for i in range(count)
    ]


def pixel_differences(batched: list[dict], per_scale: list[dict]) -> tuple[int, float]:
    """Largest and mean |batched - per-scale| in uint8 levels over the candidate images of the same rows."""
    differences = [
        np.abs(np.asarray(decode_image(a), np.int16) - np.asarray(decode_image(b), np.int16))
        for ra, rb in zip(batched, per_scale, strict=True)
        for a, b in zip(ra["candidate_images"], rb["candidate_images"], strict=True)
    ]
    return int(max(d.max() for d in differences)), float(np.mean([d.mean() for d in differences]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=28, help="denoising steps (28: the official code)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default="zoo:diffusion")
    args = parser.parse_args()

    table = prompts_table(benchmark_rows(args.prompts))
    cfg = ImagesConfig(model=args.model, steps=args.steps, height=args.size, width=args.size)
    stage = ImageGenerator(cfg)

    def run(batched: bool):
        stage.cfg = cfg.model_copy(update={"batch_guidance": batched})
        stage(table)  # warm-up
        times, out = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = stage(table).to_pylist()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    per_scale_s, per_scale = run(batched=False)
    batched_s, batched = run(batched=True)
    max_diff, _ = pixel_differences(batched, per_scale)
    k = len(cfg.guidance_scales)
    print(f"images: {args.prompts} prompts x {k} scales, {args.steps} steps, {args.size}px, model {args.model}")
    print(f"one call per scale : {per_scale_s:.3f} s ({k} calls)")
    print(f"batched guidance   : {batched_s:.3f} s (1 call)")
    print(f"speedup ratio      : {per_scale_s / batched_s:.2f}x (target >= 1.5x)")
    print(f"max pixel diff     : {max_diff} (parity: <= 1, uint8 rounding)")


if __name__ == "__main__":
    main()
