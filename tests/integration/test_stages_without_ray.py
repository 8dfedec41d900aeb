"""The model stages that a GPU check runs (images, image scores, response scores) import and run where Ray
and vLLM are not installed: a machine that only has PyTorch and the model libraries (issue 20's GPU kit).

The stages run in a subprocess whose import system refuses `ray` and `vllm` (tests/without_packages.py), on the
paper models' twins in the paper's precisions (SD3 in float16, ImageReward, ArmoRM in bfloat16), called on pyarrow
tables."""

import json
import os
import subprocess

import pytest

from synthalign_ray import zoo
from tests.conftest import REPO
from tests.without_packages import command

pytestmark = pytest.mark.slow

WITHOUT_RAY = r'''
import json, math, sys

import pyarrow as pa
from synthalign_ray.stages.image_scores import ImageScorer, ImageScoresConfig, ImageSelector
from synthalign_ray.stages.images import ImageGenerator, ImagesConfig
from synthalign_ray.stages.prompts import prompt_seed, prompts_table
from synthalign_ray.stages.response_scores import ResponseScorer, ResponseScoresConfig

rows = prompts_table([
    {"id": f"p{i}", "category": "c", "t2i_prompt": p, "seed": prompt_seed(0, f"p{i}"), "source_line": i + 1}
    for i, p in enumerate(["a red boat on a lake", "children in a classroom"])
])
images = ImageGenerator(ImagesConfig(model="zoo:sd3", steps=2, height=64, width=64, dtype="float16"))(rows)
scored = ImageScorer(ImageScoresConfig(model="zoo:image-reward"))(images)
selected = ImageSelector()(scored)
answers = pa.array(
    [[{"model": m, "text": t, "finish_reason": "stop", "error": None} for m, t in (("a", "a boat"), ("b", "a lake at dusk"))]] * 2,
    pa.list_(pa.struct([("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())])),
)
table = selected.append_column("instruction", pa.array(["what is in the picture"] * 2)).append_column("responses", answers)
out = ResponseScorer(ResponseScoresConfig(model="zoo:armorm", dtype="bfloat16"))(table).to_pylist()
print(json.dumps({
    "errors": [row["error"] for row in out],
    "image_scores": [len(row["image_scores"]) for row in out],
    "finite": all(math.isfinite(s) for row in out for s in row["image_scores"] + row["response_scores"]),
    "response_scores": [len(row["response_scores"]) for row in out],
    "loaded": sorted(m for m in ("ray", "vllm") if m in sys.modules),
}))
'''


def test_image_and_score_stages_run_where_ray_and_vllm_cannot_be_imported():
    for name in ("sd3", "image-reward", "armorm"):
        zoo.build(name)  # here, with the full stack: the subprocess only loads them
    result = subprocess.run(
        command(["ray", "vllm"], "-c", WITHOUT_RAY), cwd=REPO, env=os.environ, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-6000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "errors": [None, None],
        "image_scores": [4, 4],
        "finite": True,
        "response_scores": [2, 2],
        "loaded": [],
    }
