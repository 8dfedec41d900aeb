"""configs/paper_tiny.yaml is configs/paper.yaml on the zoo's twins: it may differ only where a twin or a CPU needs
it (model references, image size, steps, token budgets, pool and Ray sizes, prompt files), so what CI runs is the paper's
configuration. Compared as parsed YAML, key by key."""

import re

import pytest
import yaml

from synthalign_ray.config import load_config
from tests.conftest import REPO

PAIRS = [("paper.yaml", "paper_tiny.yaml")]
# Dotted paths (list items by index) that may differ, and why: a twin's name, a CPU-sized run.
ALLOWED = [
    r"prompts\.path",
    r"instructions\.path",
    r"images\.(model|height|width|steps)",
    r"image_scores\.(model|tokenizer|clip|blip)",
    r"responses\.models\.\d+\.(model|max_tokens)",
    r"response_scores\.model",
    r"(.+\.)?pool(\..+)?",
    r"resources\..+",  # where and how a run executes (the local Ray's size), not what it makes
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


def disallowed(paper: dict, tiny: dict) -> dict[str, tuple]:
    return {k: v for k, v in differences(paper, tiny).items() if not any(re.fullmatch(p, k) for p in ALLOWED)}


@pytest.mark.parametrize("paper_name, tiny_name", PAIRS)
def test_tiny_twin_config_differs_only_in_allowed_fields(paper_name, tiny_name):
    paper = yaml.safe_load((REPO / "configs" / paper_name).read_text())
    tiny = yaml.safe_load((REPO / "configs" / tiny_name).read_text())
    assert disallowed(paper, tiny) == {}
    assert differences(paper, tiny)  # it is a twin config, not a copy
    load_config(REPO / "configs" / tiny_name)


def test_a_changed_setting_outside_the_list_is_reported():
    paper = yaml.safe_load((REPO / "configs" / "paper.yaml").read_text())
    tiny = yaml.safe_load((REPO / "configs" / "paper_tiny.yaml").read_text())
    tiny["images"]["dtype"] = "float32"
    tiny["responses"]["models"][1]["name"] = "another"
    del tiny["response_scores"]["dtype"]
    assert disallowed(paper, tiny) == {
        "images.dtype": ("float16", "float32"),
        "responses.models.1.name": ("llava-v1.6-vicuna-13b", "another"),
        "response_scores.dtype": ("bfloat16", None),
    }
