"""CHAIR and MMHal-Bench runners without a model: file layouts checked with the file named, prompt rows,
the official MMHal-Bench rating rule and scores, CHAIR scoring of captions, the comparison table and
the evaluate command's errors before Ray starts. Expected numbers are worked out by hand in comments."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from synthalign_ray.cli import app
from synthalign_ray.config import ConfigError
from synthalign_ray.evaluate import chair, mmhal
from synthalign_ray.evaluate.common import BenchmarkFileError
from synthalign_ray.evaluate.fixture import IMAGES, write_chair_fixture, write_mmhal_fixture, write_pope_fixture
from synthalign_ray.evaluate.runner import (
    EvalConfig,
    ModelUnderTest,
    benchmark_list,
    comparison_table,
    evaluate,
    headline,
    load_eval_config,
    summary_line,
)
from tests.conftest import REPO

# --- MMHal-Bench ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("The answer is grounded. Rating: 4, somewhat informative, no hallucination", (4, True)),
        ("rating: 2", (2, True)),
        ("RATING: 6", (6, True)),
        ("Rating: 3 at first, but on reflection Rating: 5", (0, False)),  # several ratings: 0, as the script
        ("Rating:5", (0, False)),  # no space: not found
        ("", (0, False)),
        ("Rating: 7", (0, False)),
        ("Rating: 10", (1, True)),  # the script's substring test finds "rating: 1" in it
    ],
)
def test_judge_rating_follows_the_official_rule(reply, expected):
    assert mmhal.judge_rating(reply) == expected


def test_mmhal_scores_by_hand():
    # all: 6, 2, 3, 0 -> score 11/4 = 2.75; below 3: 2 and 0 -> 2/4. The None (failed judge) is left out.
    # type a: 6, 2 -> 4.0, 1/2; type b: 3, 0 -> 1.5, 1/2.
    scores = mmhal.mmhal_scores([6, 2, None, 3, 0], ["a", "a", "b", "b", "b"])
    assert scores == {
        "n": 4,
        "score": 2.75,
        "hallucination_rate": 0.5,
        "judge_failures": 1,
        "question_types": {
            "a": {"n": 2, "score": 4.0, "hallucination_rate": 0.5},
            "b": {"n": 2, "score": 1.5, "hallucination_rate": 0.5},
        },
    }
    assert mmhal.mmhal_scores([None], ["a"])["score"] is None


def test_judge_prompt_is_the_official_template_filled_in():
    # sha256 of `template` in llava-rlhf/LLaVA-RLHF Eval/eval_gpt_mmhal.py (6,631 characters), compared
    # character by character with ours when it was last checked: a change to ours must be a change there
    assert hashlib.sha256(mmhal.JUDGE_TEMPLATE.encode()).hexdigest() == "2c73d8c50f1740d000fae62cfeed103c2f7a5bcfa904b27e6e09900e7ce600cc"
    assert mmhal.JUDGE_TEMPLATE.count("{}") == 4
    assert mmhal.JUDGE_TEMPLATE.startswith("Please act as an impartial and objective judge")
    question = {"image_content": ["Tree", "Panda"], "question": "What is it?", "gt_answer": "A panda."}
    prompt = mmhal.judge_prompt(question, "A bear.")
    assert prompt.endswith(
        "### Image Contents\nTree, Panda\n\n### Question\nWhat is it?\n\n### Standard Human-Generated Answer\nA panda.\n\n"
        "### LMM Response to Evaluate\nA bear.\n"
    )
    assert "- Rating: 0, not informative, with hallucination" in prompt


def test_image_file_is_the_last_part_of_image_src():
    assert mmhal.image_file("https://c1.staticflickr.com/9/8/1234_abcd_o.jpg") == "1234_abcd_o.jpg"
    assert mmhal.image_file("https://example.com/a/b.png?size=large") == "b.png"
    assert mmhal.image_file("images/c.jpg") == "c.jpg"


def test_mmhal_questions_from_the_fixture(tmp_path):
    response_file = write_mmhal_fixture(tmp_path)
    cfg = mmhal.MmhalConfig(response_file=str(response_file), image_dir=str(tmp_path / "images"), judge={"model": "zoo:chat-llm"}, max_tokens=9)
    rows = mmhal.load_questions(cfg)
    assert len(rows) == 2 * len(IMAGES)
    assert rows[0]["id"] == "mmhal/0" and rows[0]["image_file"] == "shapes_0.png" and rows[0]["max_tokens"] == 9
    assert rows[0]["prompt"] == "What color is the ball in the image?" and rows[0]["image_content"] == ["Ball"]
    assert [r["question_type"] for r in rows[:2]] == ["attribute", "counting"]
    assert len(mmhal.load_questions(cfg.model_copy(update={"limit": 3}))) == 3
    (tmp_path / "images" / "shapes_2.png").unlink()
    with pytest.raises(BenchmarkFileError, match=r"response_template.json: record 4: image 'shapes_2.png' not found in mmhal.image_dir"):
        mmhal.load_questions(cfg)


GOOD_RECORD = {"question_type": "counting", "image_src": "https://x/a.jpg", "image_content": ["Cat"], "question": "How many?", "gt_answer": "Two."}


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ({"not": "a list"}, r"r.json: expected a non-empty JSON list"),
        ([GOOD_RECORD, {k: v for k, v in GOOD_RECORD.items() if k != "gt_answer"}], r"r.json: record 1: missing field\(s\) \['gt_answer'\]"),
        ([{**GOOD_RECORD, "image_content": "Cat"}], r"r.json: record 0: image_content must be a list of strings"),
        ([{**GOOD_RECORD, "question": " "}], r"r.json: record 0: empty question"),
        ([{**GOOD_RECORD, "image_src": "https://x/"}], r"r.json: record 0: image_src 'https://x/' names no file"),
        ([GOOD_RECORD, 3], r"r.json: record 1: expected a JSON object, got int"),
    ],
)
def test_malformed_mmhal_files_name_file_and_record(tmp_path, records, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    with pytest.raises(BenchmarkFileError, match=message):
        mmhal.read_questions(str(path))


def test_mmhal_bad_json_and_missing_file(tmp_path):
    (tmp_path / "r.json").write_text('[{"a": 1},\n oops]')
    with pytest.raises(BenchmarkFileError, match=r"r.json:2: MMHal-Bench response file is not valid JSON"):
        mmhal.read_questions(str(tmp_path / "r.json"))
    with pytest.raises(BenchmarkFileError, match=r"nope.json: cannot read MMHal-Bench response file"):
        mmhal.read_questions(str(tmp_path / "nope.json"))


def test_mmhal_score_table():
    questions = [
        {"id": f"mmhal/{i}", "index": i, "question_type": t, "image_file": "a.jpg", "question": "q", "gt_answer": "g"}
        for i, t in enumerate(["attribute", "attribute", "counting"])
    ]
    answers = {q["id"]: {"answer": f"answer {q['index']}", "finish_reason": "stop"} for q in questions}
    replies = {
        "mmhal/0": {"judge_text": "Fine. Rating: 5, very informative", "judge_finish_reason": "stop", "judge_error": None},
        "mmhal/1": {"judge_text": "no verdict", "judge_finish_reason": "length", "judge_error": None},  # unparsed: 0
        "mmhal/2": {"judge_text": None, "judge_finish_reason": None, "judge_error": "APIConnectionError: refused"},
    }
    table, scores = mmhal.score(questions, answers, replies)
    assert table.column("rating").to_pylist() == [5, 0, None]
    assert table.column("rating_parsed").to_pylist() == [True, False, False]
    assert table.column("answer").to_pylist() == ["answer 0", "answer 1", "answer 2"]
    # judged: 5 and 0 -> score 2.5, 0 is below 3 -> rate 1/2; the failed one is counted apart.
    assert (scores["n"], scores["score"], scores["hallucination_rate"]) == (2, 2.5, 0.5)
    assert scores["judge_failures"] == 1 and scores["ratings_unparsed"] == 1
    assert list(scores["question_types"]) == ["attribute"]


# --- CHAIR ---------------------------------------------------------------------------------------------


def test_chair_config_needs_one_annotation_layout():
    with pytest.raises(ValueError, match="exactly one of objects_file or coco_instances"):
        chair.ChairConfig(image_dir="x")
    with pytest.raises(ValueError, match="exactly one of objects_file or coco_instances"):
        chair.ChairConfig(image_dir="x", objects_file="o.json", coco_instances="i.json")
    with pytest.raises(ValueError, match="coco_captions goes with coco_instances"):
        chair.ChairConfig(image_dir="x", objects_file="o.json", coco_captions="c.json")


def test_chair_images_from_the_fixture_and_sampling(tmp_path):
    objects_file = write_chair_fixture(tmp_path)
    cfg = chair.ChairConfig(image_dir=str(tmp_path / "images"), objects_file=str(objects_file), max_tokens=7)
    vocabulary = chair.vocabulary(cfg)
    rows, objects = chair.load_images(cfg, vocabulary)
    assert [r["image_file"] for r in rows] == sorted(IMAGES)
    assert rows[0]["id"] == "chair/shapes_0.png" and rows[0]["prompt"] == chair.CAPTION_PROMPT and rows[0]["max_tokens"] == 7
    assert objects["shapes_0.png"] == {"sports ball"}  # "ball" is a synonym of the COCO category
    sampled = [r["image_file"] for r in chair.load_images(cfg.model_copy(update={"sample": 2}), vocabulary)[0]]
    assert len(sampled) == 2 and sampled == [r["image_file"] for r in chair.load_images(cfg.model_copy(update={"sample": 2}), vocabulary)[0]]
    (tmp_path / "images" / "shapes_3.png").unlink()
    with pytest.raises(BenchmarkFileError, match=r"chair_objects.json: image 'shapes_3.png' not found in chair.image_dir"):
        chair.load_images(cfg, vocabulary)


def test_chair_objects_file_errors(tmp_path):
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"a.jpg": "dog"}))
    with pytest.raises(BenchmarkFileError, match=r"objects.json: objects of 'a.jpg' must be a list of strings"):
        chair.read_objects_file(str(path))
    path.write_text("[]")
    with pytest.raises(BenchmarkFileError, match=r"objects.json: expected a non-empty JSON object"):
        chair.read_objects_file(str(path))


def test_chair_coco_layout(tmp_path):
    instances = {
        "images": [{"id": 7, "file_name": "COCO_7.jpg"}, {"id": 8, "file_name": "COCO_8.jpg"}],
        "categories": [{"id": 1, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [{"image_id": 7, "category_id": 1}, {"image_id": 7, "category_id": 1}],
    }
    captions = {"annotations": [{"image_id": 8, "caption": "Two cars parked by a man."}]}
    (tmp_path / "instances.json").write_text(json.dumps(instances))
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    vocabulary = chair.vocabulary(chair.ChairConfig(image_dir="x", objects_file="o.json"))
    objects = chair.coco_objects(str(tmp_path / "instances.json"), str(tmp_path / "captions.json"), vocabulary)
    assert objects == {"COCO_7.jpg": {"dog"}, "COCO_8.jpg": {"car", "person"}}
    (tmp_path / "instances.json").write_text(json.dumps({"images": []}))
    with pytest.raises(BenchmarkFileError, match=r"instances.json: not a COCO instances file \(no annotations, categories\)"):
        chair.coco_objects(str(tmp_path / "instances.json"), None, vocabulary)


def test_chair_synonym_file(tmp_path):
    (tmp_path / "synonyms.txt").write_text("dog, hound\ncat, feline\n")
    vocabulary = chair.vocabulary(chair.ChairConfig(image_dir="x", objects_file="o.json", synonyms=str(tmp_path / "synonyms.txt")))
    assert vocabulary.synonym_to_object == {"dog": "dog", "hound": "dog", "cat": "cat", "feline": "cat"}
    (tmp_path / "synonyms.txt").write_text("\n")
    with pytest.raises(BenchmarkFileError, match=r"synonyms.txt: empty CHAIR synonym table"):
        chair.vocabulary(chair.ChairConfig(image_dir="x", objects_file="o.json", synonyms=str(tmp_path / "synonyms.txt")))


def test_chair_score_by_hand():
    vocabulary = chair.vocabulary(chair.ChairConfig(image_dir="x", objects_file="o.json"))
    rows = [{"id": "chair/a.jpg", "image_file": "a.jpg"}, {"id": "chair/b.jpg", "image_file": "b.jpg"}]
    objects = {"a.jpg": {"dog", "person"}, "b.jpg": {"car"}}
    answers = {
        "chair/a.jpg": {"answer": "A man walks his puppy past a bench.", "finish_reason": "stop"},  # person, dog, bench (hallucinated)
        "chair/b.jpg": {"answer": "A red car.", "finish_reason": "length"},  # car
    }
    table, metrics = chair.score(rows, answers, objects, vocabulary)
    # CHAIRs: 1 of 2 captions hallucinates; CHAIRi: 1 of 4 mentions; recall: 3 of 3 annotated objects.
    assert metrics == {"n": 2, "chair_s": 0.5, "chair_i": 0.25, "recall": 1.0, "mentions": 4}
    assert table.column("hallucinated").to_pylist() == [["bench"], []]
    assert table.column("mentioned").to_pylist() == [["person", "dog", "bench"], ["car"]]
    assert table.column("objects").to_pylist() == [["dog", "person"], ["car"]]
    assert table.column("finish_reason").to_pylist() == ["stop", "length"]


# --- the runner ----------------------------------------------------------------------------------------


def test_benchmark_list_knows_chair_and_mmhal():
    assert benchmark_list("pope, chair,mmhal") == ["pope", "chair", "mmhal"]
    assert benchmark_list("mmhal,pope,mmhal") == ["mmhal", "pope"]
    with pytest.raises(ConfigError, match="runnable benchmarks are pope, chair, mmhal, amber"):
        benchmark_list("halbench")


def _results(chair_s, score):
    return {
        "chair": {"n": 4, "chair_s": chair_s, "chair_i": 0.25, "recall": None, "mentions": 8},
        "mmhal": {
            "n": 2, "score": score, "hallucination_rate": 0.5, "judge_failures": 0, "ratings_unparsed": 0,
            "question_types": {"counting": {"n": 2, "score": score, "hallucination_rate": 0.5}},
        },
    }  # fmt: skip


def test_comparison_table_and_summary_with_chair_and_mmhal():
    models = [ModelUnderTest("base", "llava"), ModelUnderTest("trained", "llava", "runs/dpo/adapter")]
    table = comparison_table({"base": _results(0.5, 2.75), "trained": _results(0.25, 3.0)}, models, judge="Qwen/Qwen2.5-72B-Instruct")
    assert "MMHal-Bench judged by Qwen/Qwen2.5-72B-Instruct: not comparable with GPT-4-judged scores." in table
    assert "| chair | all | chair_s | 50.0 | 25.0 | -25.0 |" in table
    assert "| chair | all | recall | n/a | n/a | n/a |" in table
    assert "| mmhal | all | score (0-6) | 2.75 | 3.00 | +0.25 |" in table
    assert "| mmhal | all | hallucination_rate | 50.0 | 50.0 | +0.0 |" in table
    assert "| mmhal | type counting | score (0-6) | 2.75 | 3.00 | +0.25 |" in table
    summary = {"results": {"base": {b: headline(b, r) for b, r in _results(0.5, 2.75).items()}}}
    assert summary_line(summary) == "base chair CHAIRs 50.0 CHAIRi 25.0 recall n/a; base mmhal score 2.75 hallucination 50.0"


def test_eval_config_chair_and_mmhal_paths_relative_to_the_config(tmp_path):
    write_chair_fixture(tmp_path / "bench")
    write_mmhal_fixture(tmp_path / "bench")
    config = tmp_path / "eval.yaml"
    config.write_text(
        "chair: {objects_file: bench/chair_objects.json, image_dir: bench/images}\n"
        "mmhal: {response_file: bench/mmhal/response_template.json, image_dir: bench/images, judge: {model: 'zoo:chat-llm'}}\n"
    )
    cfg = load_eval_config(str(config))
    assert cfg.chair.objects_file == str(tmp_path / "bench" / "chair_objects.json")
    assert cfg.mmhal.response_file == str(tmp_path / "bench" / "mmhal" / "response_template.json")
    assert cfg.mmhal.image_dir == str(tmp_path / "bench" / "images") and cfg.chair.synonyms is None


def test_missing_section_and_judge_key_fail_before_ray(tmp_path, monkeypatch):
    folder = write_pope_fixture(tmp_path)
    cfg = EvalConfig(pope={"question_dir": str(folder / "questions"), "image_dir": str(folder / "images")})
    with pytest.raises(ConfigError, match=r"config: chair: benchmark chair needs a `chair` section"):
        evaluate(cfg, model="zoo:lvlm-llava", output=str(tmp_path / "out"), benchmarks=["pope", "chair"])
    monkeypatch.delenv("JUDGE_KEY", raising=False)
    cfg.mmhal = mmhal.MmhalConfig(
        response_file=str(write_mmhal_fixture(folder)), image_dir=str(folder / "images"),
        judge={"backend": "openai", "model": "gpt-4-0314", "base_url": "http://127.0.0.1:9/v1", "api_key_env": "JUDGE_KEY"},
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"mmhal.judge.api_key_env: environment variable JUDGE_KEY is not set"):
        evaluate(cfg, model="zoo:lvlm-llava", output=str(tmp_path / "out"), benchmarks=["mmhal"])
    assert not (tmp_path / "out").exists()


def evaluate_cli(tmp_path, benchmark: str, **sets: str):
    """`synthalign evaluate` of the tiny config on one benchmark, its section's fields set (a file error must
    stop it before Ray starts: exit 2, no output folder)."""
    overrides = [arg for name, value in sets.items() for arg in ("--set", f"{benchmark}.{name}={value}")]
    result = CliRunner().invoke(
        app,
        [
            "evaluate", "--config", str(REPO / "configs" / "eval_tiny.yaml"), "--model", "zoo:lvlm-llava",
            "--benchmarks", benchmark, "--output", str(tmp_path / "out"), *overrides,
        ],
    )  # fmt: skip
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    return result


def test_cli_reports_a_malformed_mmhal_file_before_ray(tmp_path):
    response_file = write_mmhal_fixture(tmp_path)
    records = json.loads(response_file.read_text())
    del records[5]["question"]
    response_file.write_text(json.dumps(records))
    result = evaluate_cli(tmp_path, "mmhal", response_file=str(response_file), image_dir=str(tmp_path / "images"))
    assert "response_template.json: record 5: missing field(s) ['question']" in result.output
