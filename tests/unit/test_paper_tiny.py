"""The paper configs' twins run what the paper configs say, on the zoo's twins: each `*_tiny` file may differ from its
paper file only where a twin or a CPU needs it (model references, image size, steps, token budgets, pool and Ray sizes,
input files), so what CI runs is the paper's configuration. Compared as parsed YAML, key by key."""

import re

import pytest
import yaml

from synthalign_ray.config import load_config
from synthalign_ray.evaluate.runner import load_eval_config
from synthalign_ray.train.config import load_train_config
from tests.conftest import REPO

# Dotted paths (list items by index) that may differ, and why: a twin's name, a CPU-sized run.
SIZES = [r"(.+\.)?pool(\..+)?", r"resources\..+"]  # where and how a run executes, not what it makes
GENERATE_ALLOWED = [
    r"prompts\.path",
    r"instructions\.path",
    r"images\.(model|height|width|steps)",
    r"image_scores\.(model|tokenizer|clip|blip)",
    r"responses\.models\.\d+\.(model|max_tokens)",
    r"response_scores\.model",
    *SIZES,
]
TRAIN_ALLOWED = [
    r"model",
    r"trl\.max_steps",  # a few steps
    r"trl\.bf16",  # CPU workers train in fp32: train refuses bf16 without GPUs
    r"scaling\.(use_gpu|cpus_per_worker)",
]
EVAL_ALLOWED = [r"pope\.(question_dir|image_dir)", r"generation\.max_tokens", *SIZES]
# (paper file, twin file, allowed differences, top-level sections the twin may leave out whole, loader)
PAIRS = [
    ("paper.yaml", "paper_tiny.yaml", GENERATE_ALLOWED, [], load_config),
    ("train_paper.yaml", "train_paper_tiny.yaml", TRAIN_ALLOWED, [], load_train_config),
    # POPE first (the benchmark); CHAIR, MMHal-Bench and AMBER run on eval_tiny.yaml's fixture formats.
    ("eval_paper.yaml", "eval_paper_tiny.yaml", EVAL_ALLOWED, ["chair", "mmhal", "amber"], load_eval_config),
]


def flatten(value, prefix=""):
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    flat = {}
    for key, item in items:
        flat |= flatten(item, f"{prefix}.{key}" if prefix else str(key))
    return flat


def differences(paper: dict, tiny: dict) -> dict[str, tuple]:
    a, b = flatten(paper), flatten(tiny)
    return {key: (a.get(key), b.get(key)) for key in sorted(a.keys() | b.keys()) if a.get(key) != b.get(key)}


def disallowed(paper: dict, tiny: dict, allowed: list[str], omitted: list[str] = ()) -> dict[str, tuple]:
    paper = {key: value for key, value in paper.items() if not (key in omitted and key not in tiny)}
    return {k: v for k, v in differences(paper, tiny).items() if not any(re.fullmatch(p, k) for p in allowed)}


@pytest.mark.parametrize("paper_name, tiny_name, allowed, omitted, load", PAIRS)
def test_tiny_twin_config_differs_only_in_allowed_fields(paper_name, tiny_name, allowed, omitted, load):
    paper = yaml.safe_load((REPO / "configs" / paper_name).read_text())
    tiny = yaml.safe_load((REPO / "configs" / tiny_name).read_text())
    assert disallowed(paper, tiny, allowed, omitted) == {}
    assert differences(paper, tiny)  # it is a twin config, not a copy
    load(REPO / "configs" / tiny_name)


def _pair(paper_name: str, tiny_name: str) -> tuple[dict, dict]:
    return tuple(yaml.safe_load((REPO / "configs" / name).read_text()) for name in (paper_name, tiny_name))


def test_a_changed_setting_outside_the_list_is_reported():
    paper, tiny = _pair("paper.yaml", "paper_tiny.yaml")
    tiny["images"]["dtype"] = "float32"
    tiny["responses"]["models"][1]["name"] = "another"
    del tiny["response_scores"]["dtype"]
    assert disallowed(paper, tiny, GENERATE_ALLOWED) == {
        "images.dtype": ("float16", "float32"),
        "responses.models.1.name": ("llava-v1.6-vicuna-13b", "another"),
        "response_scores.dtype": ("bfloat16", None),
    }

    paper, tiny = _pair("train_paper.yaml", "train_paper_tiny.yaml")
    tiny["lora"]["r"], tiny["trl"]["learning_rate"], tiny["prompt_format"] = 8, 1e-3, "chat_template"
    assert disallowed(paper, tiny, TRAIN_ALLOWED) == {
        "lora.r": (128, 8),
        "trl.learning_rate": (1e-5, 1e-3),
        "prompt_format": ("llava_v1", "chat_template"),
    }


def test_a_benchmark_the_eval_twin_keeps_must_match_and_only_listed_ones_may_be_left_out():
    paper, tiny = _pair("eval_paper.yaml", "eval_paper_tiny.yaml")
    tiny["generation"]["prompt_format"] = "chat_template"
    tiny["amber"] = {**paper["amber"], "max_tokens": 64}  # kept, so held to the paper's
    assert disallowed(paper, tiny, EVAL_ALLOWED, ["chair", "mmhal", "amber"]) == {
        "generation.prompt_format": ("llava_v1", "chat_template"),
        "amber.max_tokens": (512, 64),
    }
    del tiny["pope"]  # not in the list: dropping it is reported
    assert disallowed(paper, tiny, EVAL_ALLOWED, ["chair", "mmhal", "amber"])["pope.splits"] == (paper["pope"]["splits"], None)
