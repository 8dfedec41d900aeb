"""Our batched ImageReward scorer against the official `image-reward` package, on the same (random) weights.

The official package runs through synthalign_ray.models._official_image_reward (its transformers 5 patches, undone
after use). Random weights are scaled so scores spread over ~1 unit: a 1e-4 tolerance then catches any mis-mapped
weight, wrong preprocessing or tokenization.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from synthalign_ray import zoo
from synthalign_ray.models._official_image_reward import official_image_reward
from synthalign_ray.models.image_reward import (
    CHECKPOINT_FILE,
    MED_CONFIG_FILE,
    VOCAB_FILE,
    load_image_reward,
    write_random_checkpoint,
)
from tests.conftest import REPO
from tests.without_packages import command

PARITY_TOLERANCE = 1e-4
PROMPTS = [
    "a red dog running in the park",
    "Two cats sitting on a table, watercolor!",
    "sunset over the ocean",
    # longer than the package's 35-token limit: truncation must match too
    "an old man reading a book in a quiet library with tall windows, golden light, detailed oil painting, "
    "high quality, many books on every wall and a small cat sleeping on the floor near the door",
]


def _test_images() -> list[Image.Image]:
    """Sizes and modes the package's preprocessing treats differently: square, landscape, portrait, RGBA, grayscale."""
    rng = np.random.default_rng(7)

    def noisy_gradient(height: int, width: int, channels: int) -> np.ndarray:
        gradient = np.linspace(0, 255, width)[None, :, None] * np.linspace(0.2, 1.0, height)[:, None, None]
        noise = rng.integers(0, 96, (height, width, channels))
        return np.clip(gradient + noise, 0, 255).astype(np.uint8)

    return [
        Image.fromarray(noisy_gradient(224, 224, 3), "RGB"),
        Image.fromarray(noisy_gradient(200, 320, 3), "RGB"),
        Image.fromarray(noisy_gradient(400, 150, 3), "RGB"),
        Image.fromarray(noisy_gradient(256, 256, 4), "RGBA"),
        Image.fromarray(noisy_gradient(80, 100, 1)[:, :, 0], "L"),
    ]


def _parity_pairs() -> tuple[list[str], list[Image.Image]]:
    """Same image under different prompts and same prompt over different images."""
    images = _test_images()
    pairs = [(0, 0), (1, 0), (0, 1), (2, 2), (3, 3), (1, 4)]
    return [PROMPTS[p] for p, _ in pairs], [images[i] for _, i in pairs]


@pytest.fixture(scope="module")
def large_checkpoint(tmp_path_factory):
    """The package's own architecture (ViT-L/16 at 224 px), random weights, 2 text layers."""
    return write_random_checkpoint(tmp_path_factory.mktemp("image-reward-large"), seed=3, vit="large")


@pytest.fixture(scope="module")
def official(large_checkpoint):
    """Everything the test needs from the official package, computed once; the package is unloaded afterwards."""
    prompts, images = _parity_pairs()
    checkpoint_keys = set(torch.load(large_checkpoint / CHECKPOINT_FILE, weights_only=True, mmap=True))
    with official_image_reward(large_checkpoint) as package:
        model = package.load(
            str(large_checkpoint / CHECKPOINT_FILE), device="cpu", med_config=str(large_checkpoint / MED_CONFIG_FILE)
        )
        # The package loads with strict=False: a weight missing from the file would silently stay randomly initialised.
        missing = sorted(set(model.state_dict()) - checkpoint_keys)
        input_ids = model.blip.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35).input_ids
        scores = [model.score(prompt, image) for prompt, image in zip(prompts, images)]
    return {"missing": missing, "input_ids": input_ids, "scores": scores}


@pytest.fixture(scope="module")
def large_scorer(large_checkpoint):
    return load_image_reward(large_checkpoint, batch_size=4)


@pytest.mark.slow
def test_random_checkpoint_has_every_weight_the_package_loads(official):
    assert official["missing"] == []


@pytest.mark.slow
def test_batched_scores_match_official_package(official, large_scorer):
    prompts, images = _parity_pairs()
    ours = large_scorer.score(prompts, images)  # batches of 4: one full batch and one partial

    differences = [abs(a - b) for a, b in zip(ours, official["scores"])]
    assert max(differences) < PARITY_TOLERANCE, f"ours {ours} vs official {official['scores']}"
    # The tolerance is only meaningful if prompts and images move the scores by far more than it.
    assert abs(official["scores"][0] - official["scores"][1]) > 10 * PARITY_TOLERANCE, "prompt does not matter"
    assert abs(official["scores"][0] - official["scores"][2]) > 10 * PARITY_TOLERANCE, "image does not matter"


@pytest.mark.slow
def test_tokenizer_matches_package_and_is_not_degenerate(official, large_scorer):
    ours = large_scorer.tokenize(PROMPTS)["input_ids"].tolist()
    assert ours == official["input_ids"]
    unk_id = large_scorer.tokenizer.unk_token_id
    for ids in ours:
        words = [token for token in ids if token not in large_scorer.tokenizer.all_special_ids]
        assert words and unk_id not in words
    assert len(ours[-1]) == 35 and ours[-1][-1] == large_scorer.tokenizer.sep_token_id  # truncated, still closed


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("image-reward-tiny"), seed=0, vit="tiny")


WITHOUT_DATASETS = '''
import json, sys
from pathlib import Path
from synthalign_ray.models._official_image_reward import official_image_reward

with official_image_reward(Path(sys.argv[1])) as package:
    inside = {"package": package.__name__, "stubbed": sorted(name for name in ("clip", "datasets") if name in sys.modules)}
print(json.dumps({**inside, "left": sorted(name for name in ("clip", "datasets", "ImageReward") if name in sys.modules)}))
'''


@pytest.mark.slow
def test_official_package_imports_where_datasets_is_not_installed(tiny_checkpoint):
    """The package's fine-tuning module imports `datasets`, which benchmarks/gpu_check.py's GPU machines lack."""
    result = subprocess.run(
        [*command(["datasets"], "-c", WITHOUT_DATASETS), str(tiny_checkpoint)],
        cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {
        "package": "ImageReward", "stubbed": ["clip", "datasets"], "left": [],
    }  # fmt: skip


def test_zoo_model_scores_images_distinctly(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTHALIGN_ZOO", str(tmp_path))
    folder = zoo.build("image-reward")

    scorer = load_image_reward(folder, batch_size=2)
    images = _test_images()
    scores = scorer.score([PROMPTS[0]] * len(images), images)
    assert len(scores) == len(images)
    assert all(math.isfinite(score) for score in scores)
    assert min(abs(a - b) for i, a in enumerate(scores) for b in scores[i + 1 :]) > 1e-3, scores
    assert scorer.score([PROMPTS[1]], images[:1]) != scores[:1]
    assert scorer.tokenizer.unk_token_id not in scorer.tokenize([PROMPTS[0]])["input_ids"][0].tolist()


@pytest.mark.parametrize("missing_file", [CHECKPOINT_FILE, MED_CONFIG_FILE, VOCAB_FILE])
def test_missing_file_is_named(tiny_checkpoint, tmp_path, missing_file):
    folder = shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint")
    (folder / missing_file).unlink()
    with pytest.raises(FileNotFoundError, match=missing_file) as error:
        load_image_reward(folder)
    assert str(folder) in str(error.value)


def test_hub_cache_layout_with_separate_tokenizer(tiny_checkpoint, tmp_path):
    """models--THUDM--ImageReward holds no tokenizer: it comes from tokenizer=, or from a tokenizer/ subfolder."""
    images = _test_images()[:2]
    expected = load_image_reward(tiny_checkpoint).score(PROMPTS[:2], images)

    repo = tmp_path / "models--THUDM--ImageReward"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name in (CHECKPOINT_FILE, MED_CONFIG_FILE):
        shutil.copy(tiny_checkpoint / name, snapshot / name)
    with pytest.raises(FileNotFoundError, match=VOCAB_FILE):
        load_image_reward(repo)
    assert load_image_reward(repo, tokenizer=tiny_checkpoint).score(PROMPTS[:2], images) == expected

    (snapshot / "tokenizer").mkdir()
    for name in (VOCAB_FILE, "tokenizer_config.json"):
        shutil.copy(tiny_checkpoint / name, snapshot / "tokenizer" / name)
    assert load_image_reward(snapshot).score(PROMPTS[:2], images) == expected
