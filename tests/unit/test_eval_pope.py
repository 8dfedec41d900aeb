"""POPE files and the evaluate command's model-free parts: question files checked with file and line,
prompts, split discovery, model selection, scoring, the comparison table, CLI errors before Ray starts."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from synthalign_ray.cli import app
from synthalign_ray.config import ConfigError
from synthalign_ray.evaluate.fixture import IMAGES, write_pope_fixture
from synthalign_ray.evaluate.pope import (
    LLAVA_POPE_SUFFIX,
    BenchmarkFileError,
    PopeConfig,
    load_questions,
    pope_prompt,
    predictions,
    read_questions,
    score,
)
from synthalign_ray.evaluate.runner import (
    ModelUnderTest,
    benchmark_list,
    comparison_table,
    load_eval_config,
    models_to_evaluate,
)
from tests.conftest import REPO


def _write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))
    return str(path)


GOOD = {"question_id": 1, "image": "a.png", "text": "Is there a dog in the image?", "label": "yes"}


def test_read_questions(tmp_path):
    path = _write(tmp_path / "q.json", [GOOD, "\n", {**GOOD, "question_id": 2, "label": "no"}])
    rows = read_questions(path, "random")
    assert [(r["question_id"], r["label"], r["line"]) for r in rows] == [("1", "yes", 1), ("2", "no", 3)]
    assert read_questions(path, "random", limit=1)[0]["split"] == "random"


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        ([GOOD, "{not json\n"], r"q.json:2: not valid JSON"),
        ([GOOD, "[1, 2]\n"], r"q.json:2: expected a JSON object, got list"),
        ([{k: v for k, v in GOOD.items() if k != "label"}], r"q.json:1: missing field\(s\) \['label'\]"),
        ([{**GOOD, "label": "Yes"}], r"q.json:1: label 'Yes' is not 'yes' or 'no'"),
        ([{**GOOD, "text": "  "}], r"q.json:1: empty question text"),
        ([GOOD, GOOD], r"q.json:2: question_id 1 repeats line 1"),
        (["\n"], r"q.json: no questions"),
    ],
)
def test_malformed_question_files_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(BenchmarkFileError, match=message):
        read_questions(_write(tmp_path / "q.json", lines), "random")


def test_missing_question_file(tmp_path):
    with pytest.raises(BenchmarkFileError, match=r"nope.json: cannot read POPE question file"):
        read_questions(str(tmp_path / "nope.json"), "random")


def test_prompt_suffix_appended_once():
    assert pope_prompt("Is there a cat?", LLAVA_POPE_SUFFIX) == "Is there a cat?" + LLAVA_POPE_SUFFIX
    assert pope_prompt("Is there a cat?" + LLAVA_POPE_SUFFIX, LLAVA_POPE_SUFFIX) == "Is there a cat?" + LLAVA_POPE_SUFFIX
    assert pope_prompt("Is there a cat?", "") == "Is there a cat?"


def test_load_questions_from_the_fixture(tmp_path):
    folder = write_pope_fixture(tmp_path)
    cfg = PopeConfig(question_dir=str(folder / "questions"), image_dir=str(folder / "images"))
    rows = load_questions(cfg, max_tokens=8)
    assert len(rows) == 3 * 2 * len(IMAGES)
    assert {r["split"] for r in rows} == {"random", "popular", "adversarial"}
    assert all(r["image_uri"].startswith(str(folder / "images")) and r["prompt"].endswith(LLAVA_POPE_SUFFIX) and r["max_tokens"] == 8 for r in rows)
    for row in rows:  # labels are true of the drawn pictures
        obj = row["text"].removeprefix("Is there a ").removesuffix(" in the image?")
        assert (obj in IMAGES[row["image_file"]]) == (row["label"] == "yes")


def test_missing_image_and_ambiguous_split_files(tmp_path):
    folder = write_pope_fixture(tmp_path)
    (folder / "images" / "shapes_1.png").unlink()
    cfg = PopeConfig(question_dir=str(folder / "questions"), image_dir=str(folder / "images"), splits=["random"])
    with pytest.raises(BenchmarkFileError, match=r"coco_pope_random.json:3: image 'shapes_1.png' not found"):
        load_questions(cfg, max_tokens=8)
    (folder / "questions" / "llava_pope_random.jsonl").write_text("")
    with pytest.raises(BenchmarkFileError, match=r"expected one file named \*pope_random.json\(l\) .* found coco_pope_random.json, llava"):
        cfg.question_file("random")
    with pytest.raises(ValueError, match=r"no question file for split\(s\) \['random'\]"):
        PopeConfig(image_dir="x", splits=["random"])


def test_predictions_parse_the_stripped_answer_and_keep_the_generated_text():
    questions = [{"id": f"pope/random/{i}", "split": "random", "question_id": i, "image_file": "a.jpg", "label": "no", "text": "Is there a cat?"} for i in (1, 2)]
    answers = {"pope/random/1": {"answer": "\nNo.", "finish_reason": "stop"}, "pope/random/2": {"answer": " Yes.", "finish_reason": "stop"}}
    rows = predictions(questions, answers).to_pylist()
    assert [(row["answer"], row["prediction"]) for row in rows] == [("\nNo.", "no"), (" Yes.", "yes")]


def test_score_per_split_mean_and_pooled():
    table = pa.table(
        {
            "split": ["random"] * 2 + ["popular"] * 2,
            "label": ["yes", "no", "yes", "no"],
            "prediction": ["yes", "no", "yes", "yes"],
        }
    )
    scores = score(table, ["random", "popular"])
    assert scores["splits"]["random"]["accuracy"] == 1.0 and scores["splits"]["popular"]["accuracy"] == 0.5
    assert scores["mean"]["accuracy"] == 0.75 and scores["mean"]["yes_ratio"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["pooled"]["n"] == 4 and scores["pooled"]["fp"] == 1


def test_models_to_evaluate(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    assert models_to_evaluate("zoo:lvlm-llava") == [ModelUnderTest("model", "zoo:lvlm-llava")]
    assert models_to_evaluate("zoo:lvlm-llava", str(adapter)) == [
        ModelUnderTest("base", "zoo:lvlm-llava"),
        ModelUnderTest("trained", "zoo:lvlm-llava", str(adapter)),
    ]
    assert [m.reference for m in models_to_evaluate(str(tmp_path), base="zoo:lvlm-llava")] == ["zoo:lvlm-llava", str(tmp_path)]
    with pytest.raises(ConfigError, match=r"--model: model path './nowhere' does not exist"):
        models_to_evaluate("./nowhere")
    with pytest.raises(ConfigError, match=r"--adapter .*: not a LoRA adapter folder"):
        models_to_evaluate("zoo:lvlm-llava", str(tmp_path))


def test_benchmark_list():
    assert benchmark_list("pope") == ["pope"]
    with pytest.raises(ConfigError, match=r"--benchmarks 'pope,mme': runnable benchmarks are pope"):
        benchmark_list("pope,mme")


def test_comparison_table_rows_and_deltas():
    def result(accuracy):
        split = {"accuracy": accuracy, "precision": 0.5, "recall": None, "f1": 0.5, "yes_ratio": 0.25}
        return {"pope": {"splits": {"random": split}, "mean": split}}

    models = [ModelUnderTest("base", "llava"), ModelUnderTest("trained", "llava", "runs/dpo/adapter")]
    table = comparison_table({"base": result(0.861), "trained": result(0.876)}, models)
    assert "# Evaluation: llava + runs/dpo/adapter vs llava" in table
    assert "| pope | random | accuracy | 86.1 | 87.6 | +1.5 |" in table
    assert "| pope | mean | recall | n/a | n/a | n/a |" in table
    assert "| pope | mean | yes_ratio | 25.0 | 25.0 | +0.0 |" in table


def test_eval_config_paths_relative_to_the_config(tmp_path):
    write_pope_fixture(tmp_path / "bench")
    config = tmp_path / "eval.yaml"
    config.write_text("pope: {question_dir: bench/questions, image_dir: bench/images}\n")
    cfg = load_eval_config(str(config))
    assert cfg.pope.question_dir == str(tmp_path / "bench" / "questions")
    config.write_text("pope: {image_dir: x, question_dir: y, splitz: [random]}\n")
    with pytest.raises(ConfigError, match=r"eval.yaml: pope.splitz: unknown key"):
        load_eval_config(str(config))


def test_cli_reports_a_malformed_question_file_before_ray(tmp_path):
    folder = write_pope_fixture(tmp_path)
    questions = folder / "questions" / "coco_pope_popular.json"
    questions.write_text(questions.read_text() + '{"question_id": 99, "image": "shapes_0.png"}\n')
    result = CliRunner().invoke(
        app,
        [
            "evaluate", "--config", str(REPO / "configs" / "eval_tiny.yaml"), "--model", "zoo:lvlm-llava",
            "--output", str(tmp_path / "out"), "--set", f"pope.question_dir={folder / 'questions'}",
            "--set", f"pope.image_dir={folder / 'images'}",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "coco_pope_popular.json:9: missing field(s) ['text', 'label']" in result.output
