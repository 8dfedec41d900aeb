"""GPU check (issue 20): the paper's GPU stages measured on one GPU by one command, the models built in place.

    python benchmarks/gpu_check.py --out DIR               # the paper's shapes on a CUDA GPU (~8 min on one H100)
    python benchmarks/gpu_check.py --out DIR --layers 2    # paper widths with 2 layers per stack: a quick try
    python benchmarks/gpu_check.py --tiny --out DIR        # the tiny twins on the CPU: what CI runs

Sections (`--sections` picks some, comma-separated):
  images        SD3-medium, 1024 px, 28 steps (configs/paper.yaml), in float16 and bfloat16, through the real
                ImageGenerator stage: batched guidance (2 prompts x 4 scales in one call) against one call per scale.
                Images/s, peak memory, the transformer's MFU; checks that the outputs stay finite and that the two
                modes' images agree within the twins' tolerance (tests/integration/test_image_stages.py).
  image_reward  our batched ImageReward scorer over a batch-size sweep, and against the official package scoring one
                image at a time on the same weights (target: at least 3x at 16 images).
  armorm        the ResponseScorer stage on ArmoRM-Llama3-8B: rows, answers and tokens per second over micro-batch
                sizes 1 to 32, an instruction with 200-400-token answers, with MFU.
  dpo           one optimizer step of the paper's DPO recipe (configs/train_paper.yaml) on LLaVA-1.5-7B with LoRA:
                tokens/s and peak memory at the paper's micro-batch. Written without TRL (see `dpo_loss`).

DIR/gpu_check.json holds every figure and the environment; DIR/profile.yaml is a `source: measured` profile that
`synthalign plan --profile` reads: images, image_scores and response_scores from these runs, the vLLM answerers
copied from configs/profiles/paper_a100.yaml as estimates. Both are rewritten after every section, so a run cut off
by its time limit leaves what it measured. A section that fails records its error and the next one runs (a GPU
window is scarce); the exit status is 1 if any section failed or any check did not hold.

The GPU machines have PyTorch and the model libraries but no Ray, vLLM, TRL or `datasets`: nothing here imports them,
and each section imports its own model libraries, so a missing one fails that section only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from synthalign_ray.capacity.plan import Profile, ProfileSource, StageProfile, write_profile
from synthalign_ray.stages.image_scores import ImageScoresConfig
from synthalign_ray.stages.images import ImagesConfig
from synthalign_ray.stages.response_scores import ResponseScoresConfig
from synthalign_ray.zoo import CORPUS

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper.yaml"
TRAIN_CONFIG = REPO / "configs" / "train_paper.yaml"
ESTIMATES = REPO / "configs" / "profiles" / "paper_a100.yaml"
SECTIONS = ("images", "image_reward", "armorm", "dpo")

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a part of the name torch reports; the first match counts.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
FLOPS_HOW = (
    "FLOPs: counted by torch.utils.flop_counter.FlopCounterMode from the shapes of the matmuls, convolutions and "
    "attention calls that run (2*m*n*k per matmul; attention 4*batch*heads*q_len*kv_len*head_dim, the full square "
    "even where causal; padding included), over an untimed warm-up call with the timed call's shapes. images: the "
    "SD3 transformer only (both guidance halves), one denoising step counted, times the steps. "
    "MFU = FLOPs / timed seconds / the GPU's dense bf16 peak."
)
# Largest and mean |batched - per-scale| pixel difference (uint8 levels) that tests/integration/test_image_stages.py
# allows on the SD3 twin: half precision rounds differently when the four scales share one batch.
PARITY_LIMITS = {"float16": (4, 0.1), "bfloat16": (64, 0.5)}
IMAGE_REWARD_TARGET = 3.0  # batched over the official package at 16 images (issue 20; 1.33x on the CPU)
OFFICIAL_PAIRS = 16
# train/config.py's LoraSettings.target_modules default (LANGUAGE_MODEL_PROJECTIONS), mirrored with the rest of the
# LoRA recipe in `dpo_settings`: synthalign_ray.train imports Ray (through synthalign_ray.config) and TRL, which the
# GPU machines lack. tests/unit/test_gpu_check.py holds the mirror to the training code.
LANGUAGE_MODEL_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the sections run: the paper's shapes on the GPU, or small ones on the twins on the CPU."""

    device: str
    image_size: int | None  # None: configs/paper.yaml's
    image_steps: int | None
    image_prompts: int
    reward_pairs: int
    reward_batches: tuple[int, ...]
    reward_official: bool
    armorm_rows: int
    armorm_batches: tuple[int, ...]
    answer_tokens: tuple[int, int]  # shortest and longest answer


PAPER = Sizes(
    device="cuda", image_size=None, image_steps=None, image_prompts=2, reward_pairs=32,
    reward_batches=(1, 2, 4, 8, 16, 32), reward_official=True, armorm_rows=16, armorm_batches=(1, 2, 4, 8, 16, 32),
    answer_tokens=(200, 400),
)  # fmt: skip
# The official ImageReward package builds ViT-L/16 at 224 px whatever the checkpoint holds, so it cannot load the tiny
# twin (tests/integration/test_image_reward_parity.py compares the two on a ViT-L checkpoint instead). Batch sweeps
# include the stage's own sizes (16), which the profile reads.
TINY = Sizes(
    device="cpu", image_size=64, image_steps=2, image_prompts=2, reward_pairs=16, reward_batches=(1, 16),
    reward_official=False, armorm_rows=6, armorm_batches=(1, 16), answer_tokens=(8, 16),
)  # fmt: skip


@dataclasses.dataclass
class Run:
    """What every section reads: the mode, its sizes, the GPU's peak and configs/paper.yaml."""

    tiny: bool
    layers: int | None
    sizes: Sizes
    peak_tflops: float | None
    paper: dict[str, Any]  # configs/paper.yaml as read


# --- printing and measuring --------------------------------------------------------------------------

_START = time.perf_counter()


def say(message: str) -> None:
    print(f"[{time.perf_counter() - _START:7.1f} s] {message}", flush=True)


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def counted_flops(call: Callable[[], Any]) -> tuple[dict[str, float], Any]:
    """FLOPs of one call of `call` per top-level module class (and "Global" for all of it), and its result."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        result = call()
    counts = counter.get_flop_counts()
    return {name: float(sum(ops.values())) for name, ops in counts.items() if "." not in name}, result


def timed(device: str, call: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """One call, synchronized: its seconds and peak GPU memory (None on the CPU: no allocator to ask), and its
    result."""
    import torch

    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = call()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return {"seconds": seconds, "peak_memory_bytes": peak}, result


def mfu(flops: float, seconds: float, peak_tflops: float | None) -> float | None:
    """Achieved FLOP/s over the peak; None where no peak is known (the CPU, an unlisted GPU)."""
    return None if peak_tflops is None else flops / seconds / (peak_tflops * 1e12)


def figures(timing: dict[str, Any], flops: float, peak_tflops: float | None, **rates: Any) -> dict[str, Any]:
    return {**rates, **timing, "flops": flops, "mfu": mfu(flops, timing["seconds"], peak_tflops)}


def describe(label: str, measured: dict[str, Any], rate: str) -> None:
    peak = measured["peak_memory_bytes"]
    memory = "" if peak is None else f", peak {peak / 2**30:.1f} GiB"
    utilization = "" if measured["mfu"] is None else f", MFU {100 * measured['mfu']:.1f}%"
    say(f"{label}: {measured['seconds']:.3f} s, {measured[rate]:.2f} {rate.replace('_per_s', '/s')}"
        f"{memory}, {measured['flops'] / 1e12:.3g} TFLOP{utilization}")


@contextlib.contextmanager
def finite_outputs(modules: list) -> Iterator[dict[str, bool]]:
    """Whether every output of `modules` stayed finite inside the block. Half-precision overflow would only show as
    black pixels once images are PNGs, so the tensors are watched, one flag per call kept on the device (no sync)."""
    import torch

    flags: list = []

    def watch(module, args, output):
        tensor = output[0] if isinstance(output, tuple) else getattr(output, "sample", output)
        flags.append(torch.isfinite(tensor).all())

    handles = [module.register_forward_hook(watch) for module in modules]
    state: dict[str, bool] = {}
    try:
        yield state
    finally:
        for handle in handles:
            handle.remove()
        state["finite"] = bool(torch.stack(flags).all()) if flags else False


def all_finite(values) -> bool:
    return all(math.isfinite(value) for value in values)


def release_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def built(name: str, run: Run) -> Iterator[Path]:
    """The zoo model `name`: the tiny twin, or the paper-scale build, deleted afterwards so that the next one fits
    (SD3 ~15 GB, ArmoRM ~16 GB, LLaVA ~14 GB on a 64 GiB disk)."""
    from synthalign_ray import zoo

    if run.tiny:
        yield zoo.build(name)
        return
    layers = {} if run.layers is None else {"layers": run.layers}
    say(f"building {name} at paper scale{'' if run.layers is None else f', {run.layers} layers'}")
    path = Path(zoo.build(name, scale="paper", device=run.sizes.device, **layers))
    say(f"built {name}: {path}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def paper_stages(paper: dict[str, Any]) -> dict[str, Any]:
    """configs/paper.yaml's GPU stage settings as the stages read them. The models are the twins' references until a
    section puts its built folder in (the paper's hub ids would be checked against a hub the machine may not reach);
    image_scores' CLIP and BLIP comparison scorers are left out: only ImageReward is measured."""
    return {
        "images": ImagesConfig.model_validate({**paper["images"], "model": "zoo:sd3"}),
        "image_scores": ImageScoresConfig.model_validate(
            {**paper["image_scores"], "model": "zoo:image-reward", "tokenizer": None, "clip": None, "blip": None}
        ),
        "response_scores": ResponseScoresConfig.model_validate({**paper["response_scores"], "model": "zoo:armorm"}),
    }


def on_device(pool, device: str):
    """A stage pool on this run's device: one GPU in paper mode (as paper.yaml), none for the twins."""
    return pool.model_copy(update={"num_gpus": 1.0 if device == "cuda" else 0.0})


# --- images -------------------------------------------------------------------------------------------


def check_images(run: Run, result: dict[str, Any]) -> None:
    from bench_guidance import benchmark_rows, pixel_differences

    from synthalign_ray.stages.images import ImageGenerator

    device, paper = run.sizes.device, paper_stages(run.paper)["images"]
    steps = run.sizes.image_steps or paper.steps
    height, width = run.sizes.image_size or paper.height, run.sizes.image_size or paper.width
    rows = benchmark_rows(run.sizes.image_prompts)
    images = len(rows) * len(paper.guidance_scales)
    result.update(prompts=len(rows), guidance_scales=paper.guidance_scales, steps=steps, height=height, width=width)
    result["checks"] = {}
    with built("sd3", run) as path:
        for dtype in ("float16", "bfloat16"):
            cfg = paper.model_copy(update={
                "model": str(path), "steps": steps, "height": height, "width": width, "dtype": dtype,
                "pool": on_device(paper.pool, device),
            })  # fmt: skip
            stage = ImageGenerator(cfg)
            transformer = stage.pipe.transformer
            measured: dict[str, Any] = {}
            rendered = {}
            with finite_outputs([transformer, stage.pipe.vae.decoder]) as finite:
                for mode, batched in (("batched", True), ("per_scale", False)):
                    # The warm-up renders one step: the timed call's shapes at one step's cost.
                    stage.cfg = cfg.model_copy(update={"batch_guidance": batched, "steps": 1})
                    flops, _ = counted_flops(lambda: stage.process(rows))
                    stage.cfg = cfg.model_copy(update={"batch_guidance": batched})
                    timing, rendered[mode] = timed(device, lambda: stage.process(rows))
                    measured[mode] = figures(
                        timing, flops[type(transformer).__name__] * steps, run.peak_tflops,
                        images_per_s=images / timing["seconds"], prompts_per_s=len(rows) / timing["seconds"],
                        calls=1 if batched else len(paper.guidance_scales),
                    )  # fmt: skip
                    describe(f"images {dtype} {mode}", measured[mode], "images_per_s")
            largest, mean = pixel_differences(rendered["batched"], rendered["per_scale"])
            limit_largest, limit_mean = PARITY_LIMITS[dtype]
            measured["speedup"] = measured["per_scale"]["seconds"] / measured["batched"]["seconds"]
            measured["parity"] = {
                "largest": largest, "mean": mean, "limit_largest": limit_largest, "limit_mean": limit_mean,
            }  # fmt: skip
            measured["finite"] = finite["finite"]
            result[dtype] = measured
            result["checks"][f"{dtype} finite"] = finite["finite"]
            result["checks"][f"{dtype} parity"] = largest <= limit_largest and mean <= limit_mean
            say(f"images {dtype}: batched {measured['speedup']:.2f}x one call per scale; pixel difference largest "
                f"{largest} (limit {limit_largest}), mean {mean:.3f} (limit {limit_mean}); finite {finite['finite']}")
            stage = transformer = None  # both dtypes' pipelines never held at once
            release_memory()


# --- ImageReward --------------------------------------------------------------------------------------


def check_image_reward(run: Run, result: dict[str, Any]) -> None:
    import torch
    from bench_image_reward import benchmark_pairs, official_one_at_a_time

    from synthalign_ray.models.image_reward import load_image_reward

    device, paper = run.sizes.device, paper_stages(run.paper)["image_scores"]
    prompts, images = benchmark_pairs(run.sizes.reward_pairs)
    result["checks"] = {}
    with built("image-reward", run) as path:
        scorer = load_image_reward(path, device=device, dtype=getattr(torch, paper.dtype))  # as ImageScorer loads it
        result.update(dtype=paper.dtype, pairs=len(prompts), stage_batch_size=scorer.batch_size, sweep=[])
        for batch in run.sizes.reward_batches:
            flops, _ = counted_flops(lambda: scorer.score(prompts, images, batch_size=batch))
            timing, scores = timed(device, lambda: scorer.score(prompts, images, batch_size=batch))
            measured = figures(timing, flops["Global"], run.peak_tflops, batch_size=batch,
                               images_per_s=len(images) / timing["seconds"])
            result["sweep"].append(measured)
            result["checks"][f"scores finite at batch {batch}"] = all_finite(scores)
            describe(f"image_reward {paper.dtype} batch {batch}", measured, "images_per_s")
        if not run.sizes.reward_official:
            result["official"] = {"skipped": "the official package loads only ViT-L/16 checkpoints, not the tiny twin"}
            return
        from synthalign_ray.models._official_image_reward import official_image_reward

        prompts, images = prompts[:OFFICIAL_PAIRS], images[:OFFICIAL_PAIRS]
        ours, ours_scores = timed(device, lambda: scorer.score(prompts, images, batch_size=OFFICIAL_PAIRS))
        with official_image_reward(path) as package:
            official = official_one_at_a_time(package, path, device)
            official(prompts[:1], images[:1])  # warm-up
            theirs, official_scores = timed(device, lambda: official(prompts, images))
        speedup = theirs["seconds"] / ours["seconds"]
        result["official"] = {
            "pairs": len(prompts), "ours": ours, "official": theirs, "speedup": speedup, "target": IMAGE_REWARD_TARGET,
            "largest_score_difference": max(abs(a - b) for a, b in zip(ours_scores, official_scores, strict=True)),
        }  # fmt: skip
        say(f"image_reward: batched {speedup:.2f}x the official package one image at a time "
            f"({len(prompts)} images; target {IMAGE_REWARD_TARGET:g}x), largest score difference "
            f"{result['official']['largest_score_difference']:.2e}")


# --- ArmoRM -------------------------------------------------------------------------------------------


def text_of_tokens(tokenizer, count: int, start: int = 0) -> str:
    """About `count` tokens of corpus words, from word `start` on (every word is at least one token)."""
    words = " ".join(CORPUS[(start + i) % len(CORPUS)] for i in range(count))
    return tokenizer.decode(tokenizer(words, add_special_tokens=False)["input_ids"][:count])


def answer_lengths(count: int, shortest: int, longest: int) -> list[int]:
    """`count` answer lengths spread evenly from `shortest` to `longest` tokens."""
    if count == 1:
        return [longest]
    return [shortest + round((longest - shortest) * i / (count - 1)) for i in range(count)]


def check_armorm(run: Run, result: dict[str, Any]) -> None:
    from synthalign_ray.stages.response_scores import ResponseScorer

    device, paper = run.sizes.device, paper_stages(run.paper)["response_scores"]
    per_row = len(run.paper["responses"]["models"])  # every answerer's answer gets scored
    lengths = iter(answer_lengths(run.sizes.armorm_rows * per_row, *run.sizes.answer_tokens))
    result["checks"] = {}
    with built("armorm", run) as path:
        cfg = paper.model_copy(update={"model": str(path), "pool": on_device(paper.pool, device)})
        scorer = ResponseScorer(cfg)
        rows = [
            {
                "instruction": f"Describe the picture in detail: {text_of_tokens(scorer.tokenizer, 24, start=row)}?",
                "responses": [
                    {"text": text_of_tokens(scorer.tokenizer, next(lengths), start=row + k), "finish_reason": "stop"}
                    for k in range(per_row)
                ],
            }
            for row in range(run.sizes.armorm_rows)
        ]
        # The tokens the stage scores: its own encoding (chat template, truncation) of each answer.
        tokens = sum(len(scorer._encode(row["instruction"], r["text"])) for row in rows for r in row["responses"])
        answers = len(rows) * per_row
        result.update(dtype=cfg.dtype, rows=len(rows), answers=answers, tokens=tokens,
                      stage_micro_batch_size=cfg.micro_batch_size, sweep=[])
        for micro_batch in run.sizes.armorm_batches:
            scorer.cfg = cfg.model_copy(update={"micro_batch_size": micro_batch})
            flops, _ = counted_flops(lambda: scorer.process(rows))
            timing, scored = timed(device, lambda: scorer.process(rows))
            seconds = timing["seconds"]
            measured = figures(timing, flops["Global"], run.peak_tflops, micro_batch_size=micro_batch,
                               rows_per_s=len(rows) / seconds, answers_per_s=answers / seconds,
                               tokens_per_s=tokens / seconds)
            result["sweep"].append(measured)
            result["checks"][f"scores finite at micro-batch {micro_batch}"] = all_finite(
                score for row in scored for score in row["response_scores"]
            )
            describe(f"armorm {cfg.dtype} micro-batch {micro_batch}", measured, "tokens_per_s")


# --- DPO ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DpoSettings:
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_targets: str
    beta: float
    loss_type: list[str]
    micro_batch: int
    accumulation: int
    max_length: int
    gradient_checkpointing: bool
    bf16: bool
    learning_rate: float


def dpo_settings(config: dict[str, Any]) -> DpoSettings:
    """A training config's recipe as TrainConfig reads it: its trl: section, LoRA with the default target modules,
    and the gradient accumulation that global_batch_size derives per worker."""
    trl, lora = config["trl"], config["lora"]
    micro_batch = trl["per_device_train_batch_size"]
    return DpoSettings(
        lora_r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        lora_targets=lora.get("target_modules", LANGUAGE_MODEL_PROJECTIONS),
        beta=trl["beta"],
        loss_type=trl["loss_type"],
        micro_batch=micro_batch,
        accumulation=config["global_batch_size"] // (config["scaling"]["num_workers"] * micro_batch),
        max_length=trl["max_length"],
        gradient_checkpointing=trl["gradient_checkpointing"],
        bf16=trl["bf16"],
        learning_rate=trl["learning_rate"],
    )


def lora_config(settings: DpoSettings):
    """train/dpo.py's `lora_config` on these settings."""
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def dpo_batch(processor, image, question: str, chosen: str, rejected: str) -> dict[str, Any]:
    """One pair as TRL's vision collator builds it: the prompt with its image through the processor (so the image
    tokens count), each answer tokenized without special tokens and right-padded, [chosen, rejected] concatenated,
    and a mask of the answer tokens. The texts are LLaVA-1.5's vicuna_v1 conversation (prompt_format: llava_v1)."""
    import torch

    from synthalign_ray.formats.llava_conversation import llava_v1_pair

    tokenizer = processor.tokenizer
    pair = llava_v1_pair(
        {
            "prompt": [{"role": "user", "content": question}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
        },
        bos=tokenizer.bos_token, eos=tokenizer.eos_token, image_token=processor.image_token,
    )  # fmt: skip
    prompt = processor(images=[image, image], text=[pair["prompt"]] * 2, add_special_tokens=False, return_tensors="pt")
    answers = tokenizer(
        [pair["chosen"], pair["rejected"]], padding=True, padding_side="right", add_special_tokens=False,
        return_tensors="pt",
    )  # fmt: skip
    return {
        "input_ids": torch.cat([prompt["input_ids"], answers["input_ids"]], dim=1),
        "attention_mask": torch.cat([prompt["attention_mask"], answers["attention_mask"]], dim=1),
        "pixel_values": prompt["pixel_values"],
        "completion_mask": torch.cat([torch.zeros_like(prompt["attention_mask"]), answers["attention_mask"]], dim=1),
    }


def sequence_logps(model, batch: dict[str, Any]):
    """Each sequence's summed log-probability of its answer tokens. TRL's DPOTrainer makes the same model call
    (`model(input_ids, attention_mask, pixel_values, use_cache=False)`) and reads the same positions; its fused LM
    head projects only the answer positions where this takes the full logits (~0.1 GB more at LLaVA's 32K
    vocabulary)."""
    import torch

    inputs = {name: value for name, value in batch.items() if name != "completion_mask"}
    logits = model(**inputs, use_cache=False).logits[:, :-1]
    labels = batch["input_ids"][:, 1:]
    per_token = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (per_token * batch["completion_mask"][:, 1:]).sum(dim=-1)


def dpo_loss(model, batch: dict[str, Any], beta: float):
    """The sigmoid DPO loss of a [chosen, rejected] batch. The reference is the base model, its LoRA adapter disabled,
    as TRL computes it for a PEFT model without a reference model."""
    import torch
    import torch.nn.functional as F

    chosen, rejected = sequence_logps(model, batch).chunk(2)
    with torch.no_grad(), model.disable_adapter():
        reference_chosen, reference_rejected = sequence_logps(model, batch).chunk(2)
    return -F.logsigmoid(beta * ((chosen - reference_chosen) - (rejected - reference_rejected))).mean()


def check_dpo(run: Run, result: dict[str, Any]) -> None:
    import numpy as np
    import torch
    from peft import get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    device = run.sizes.device
    settings = dpo_settings(yaml.safe_load(TRAIN_CONFIG.read_text()))
    if settings.loss_type != ["sigmoid"] or settings.micro_batch != 1:
        raise ValueError(f"{TRAIN_CONFIG.name}: this check writes the sigmoid loss of one pair, not {settings}")
    dtype = torch.bfloat16 if settings.bf16 and device == "cuda" else torch.float32  # CPU workers train in fp32
    shortest, longest = run.sizes.answer_tokens
    result["settings"] = dataclasses.asdict(settings) | {"dtype": str(dtype).removeprefix("torch.")}
    result["checks"] = {}
    with built("lvlm-llava", run) as path:
        processor = AutoProcessor.from_pretrained(path)
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device)
        if settings.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        model = get_peft_model(model, lora_config(settings))
        if settings.gradient_checkpointing:
            model.enable_input_require_grads()  # as TRL does for a PEFT model, or checkpointed LoRA gets no gradients
        model.train()
        image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
        question = f"Describe the picture in detail: {text_of_tokens(processor.tokenizer, 24)}?"
        batch = dpo_batch(processor, image, question, text_of_tokens(processor.tokenizer, longest, start=1),
                          text_of_tokens(processor.tokenizer, shortest, start=2))
        batch = {name: value.to(device) for name, value in batch.items()}
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        if max(lengths) > settings.max_length:
            raise ValueError(f"sequences of {lengths} tokens exceed trl.max_length {settings.max_length}")
        trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)

        def optimizer_step():
            """One optimizer step of one worker: `accumulation` micro-batches of one pair, then AdamW."""
            for _ in range(settings.accumulation):
                loss = dpo_loss(model, batch, settings.beta)
                (loss / settings.accumulation).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())

        flops, _ = counted_flops(optimizer_step)  # the warm-up step
        timing, loss = timed(device, optimizer_step)
        tokens = sum(lengths) * settings.accumulation
        measured = figures(timing, flops["Global"], run.peak_tflops, tokens_per_s=tokens / timing["seconds"])
        result.update(
            measured,
            sequence_tokens=lengths,
            image_tokens=int((batch["input_ids"][0] == model.config.image_token_id).sum()),
            tokens_per_step=tokens,
            trainable_parameters=sum(parameter.numel() for parameter in trainable),
            loss=loss if math.isfinite(loss) else None,
            flops_note="executed FLOPs: forward, backward and the checkpointed layers' recomputation",
        )
        result["checks"]["loss finite"] = math.isfinite(loss)
        describe(f"dpo step ({settings.accumulation} x 1 pair, {lengths} tokens, {result['settings']['dtype']})",
                 measured, "tokens_per_s")


CHECKS: dict[str, Callable[[Run, dict[str, Any]], None]] = {
    "images": check_images,
    "image_reward": check_image_reward,
    "armorm": check_armorm,
    "dpo": check_dpo,
}


# --- the profile --------------------------------------------------------------------------------------


def measured_stages(sections: dict[str, dict[str, Any]], paper: dict[str, Any]) -> dict[str, StageProfile]:
    """The profile stages these sections measured, at the batch sizes configs/paper.yaml gives their pools: images
    from batched guidance in the paper's dtype, image_scores from ImageReward at the stage's own batch size (K images
    per prompt), response_scores at the config's micro-batch size. A stage whose figure is missing is left out."""
    stages = paper_stages(paper)
    images, image_scores, response_scores = stages["images"], stages["image_scores"], stages["response_scores"]
    stage: dict[str, StageProfile] = {}

    def add(name: str, pool, rows_per_s: float, note: str) -> None:
        stage[name] = StageProfile(name=name, seconds_per_batch=pool.batch_size / rows_per_s,
                                   batch_size=pool.batch_size, num_gpus=pool.num_gpus, note=note)

    batched = sections.get("images", {}).get(images.dtype, {}).get("batched")
    if batched:
        add("images", images.pool, batched["prompts_per_s"],
            f"measured: {images.dtype}, {sections['images']['height']} px, {sections['images']['steps']} steps, "
            f"{len(images.guidance_scales)} scales in one call")
    scores = sections.get("image_reward", {})
    at_stage_batch = [m for m in scores.get("sweep", []) if m["batch_size"] == scores.get("stage_batch_size")]
    if at_stage_batch:
        k = len(images.guidance_scales)
        add("image_scores", image_scores.pool, at_stage_batch[0]["images_per_s"] / k,
            f"measured: ImageReward {image_scores.dtype}, batches of {scores['stage_batch_size']} images, {k} per "
            "prompt; CLIP and BLIP comparison scorers and PNG decoding not included")
    answers = sections.get("armorm", {})
    at_micro_batch = [m for m in answers.get("sweep", []) if m["micro_batch_size"] == response_scores.micro_batch_size]
    if at_micro_batch:
        per_row = answers["answers"] // answers["rows"]
        add("response_scores", response_scores.pool, at_micro_batch[0]["rows_per_s"],
            f"measured: ArmoRM {response_scores.dtype}, {per_row} answers per prompt, micro-batch "
            f"{response_scores.micro_batch_size}, {answers['tokens'] // answers['answers']} tokens per scored text")
    return stage


def measured_profile(gpu: str, estimates: Profile, measured: dict[str, StageProfile], how: str) -> Profile:
    """The estimates' stages, in their order, with the measured ones in place; the rest keep their figures, noted as
    estimates. The GPU prices are the estimates' too."""
    unknown = sorted(set(measured) - {s.name for s in estimates.stages})
    if unknown:
        raise ValueError(f"measured stages {unknown} are not in the estimated profile")
    stages = [
        measured.get(s.name) or s.model_copy(update={"note": f"estimate, not measured by gpu_check: {s.note}"})
        for s in estimates.stages
    ]
    return Profile(gpu=gpu, gpu_hour_usd=estimates.gpu_hour_usd,
                   source=ProfileSource(kind="measured", how=how), stages=stages)


def write_outputs(out: Path, report: dict[str, Any], run: Run) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    environment = report["environment"]
    measured = measured_stages(report["sections"], run.paper)
    how = (
        f"benchmarks/gpu_check.py{' --tiny' if run.tiny else ''}"
        f"{'' if run.layers is None else f' --layers {run.layers}'} at {environment['commit']} on "
        f"{environment['gpu'] or 'the CPU'}, {environment['date']}: {', '.join(measured) or 'no stage'} measured; "
        f"the other stages are {ESTIMATES.relative_to(REPO)}'s estimates"
    )
    # Not load_profile: it imports Ray (its error messages come from synthalign_ray.config).
    estimates = Profile.model_validate(yaml.safe_load(ESTIMATES.read_text()))
    profile = measured_profile(environment["gpu"] or "cpu", estimates, measured, how)
    header = (
        f"Measured by benchmarks/gpu_check.py (figures in gpu_check.json beside this file).\n"
        f"Stages noted \"estimate\" and the GPU prices are copied from {ESTIMATES.relative_to(REPO)}\n"
        "(A100 estimates): replace the prices with this GPU's before planning a budget."
    )
    write_profile(profile, out / "profile.yaml", header=header)


# --- the run ------------------------------------------------------------------------------------------


def peak_bf16_tflops(gpu: str | None) -> float | None:
    """The dense bf16 peak of a GPU, by the name torch reports; None for the CPU or a GPU not in the table."""
    if gpu is None:
        return None
    return next((tflops for part, tflops in PEAK_BF16_TFLOPS if part in gpu), None)


def git_commit() -> str | None:
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    try:
        commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None  # a copy of the tree without its .git
    return f"{commit} (with uncommitted changes)" if changes else commit


def environment(device: str) -> dict[str, Any]:
    import torch

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    packages = ("torch", "transformers", "diffusers", "peft", "accelerate", "torchvision", "pydantic", "image-reward",
                "timm", "fairscale")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cuda": torch.version.cuda,
        "versions": {package: version(package) for package in packages},
    }


def run_section(name: str, run: Run) -> dict[str, Any]:
    """One section, its figures filled in as they are measured; an error is recorded beside those already there."""
    say(f"== {name} (started {datetime.now().strftime('%H:%M:%S')})")
    result: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        CHECKS[name](run, result)
    except Exception as error:
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
        say(f"{name} FAILED: {result['error']}")
    finally:
        result["section_seconds"] = time.perf_counter() - start
        release_memory()
    say(f"== {name} done in {result['section_seconds']:.1f} s")
    return result


def failures(sections: dict[str, dict[str, Any]]) -> list[str]:
    found = [f"{name}: {result['error']}" for name, result in sections.items() if "error" in result]
    found += [
        f"{name}: check failed: {check}"
        for name, result in sections.items()
        for check, held in result.get("checks", {}).items()
        if not held
    ]
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and profile.yaml")
    parser.add_argument("--tiny", action="store_true", help="the tiny twins on the CPU at small sizes (CI)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--layers", type=int, help="paper mode: layers per stack of the paper-scale builds")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = [name for name in args.sections if name not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; the sections are {', '.join(SECTIONS)}")
    if args.tiny and args.layers is not None:
        parser.error("--layers is for the paper-scale builds; the tiny twins have their own")
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    sizes = TINY if args.tiny else PAPER
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA device; use --tiny on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment(sizes.device)
    peak = args.peak_tflops or peak_bf16_tflops(env["gpu"])
    run = Run(tiny=args.tiny, layers=args.layers, sizes=sizes, peak_tflops=peak,
              paper=yaml.safe_load(PAPER_CONFIG.read_text()))
    say(f"gpu_check {'--tiny ' if args.tiny else ''}on {env['gpu'] or 'the CPU'}: torch {env['versions']['torch']}, "
        f"transformers {env['versions']['transformers']}, diffusers {env['versions']['diffusers']}; "
        f"dense bf16 peak {'unknown (MFU not computed)' if peak is None else f'{peak:g} TFLOP/s'}")
    say(FLOPS_HOW)
    report: dict[str, Any] = {
        "mode": "tiny" if args.tiny else "paper",
        "layers": args.layers,
        "environment": env,
        "peak_bf16_tflops": peak,
        "flops_how": FLOPS_HOW,
        "sections": {},
    }
    for name in args.sections:
        report["sections"][name] = run_section(name, run)
        report["failures"] = failures(report["sections"])
        write_outputs(args.out, report, run)
    for failure in report["failures"]:
        say(f"FAILED {failure}")
    say(f"wrote {args.out / 'gpu_check.json'} and {args.out / 'profile.yaml'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
