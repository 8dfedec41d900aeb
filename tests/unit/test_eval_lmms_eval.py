"""Re-scoring lmms-eval's logged POPE samples with the official parser, on hand-made logs in lmms-eval's
--log_samples formats (before 0.7: doc without the image, target, nested resps, the pope_* records; 0.7:
no doc, string filtered_resps, the split only in the file's task name), and the local POPE task folder
(`write_pope_task`) lmms-eval reads through --include_path."""

from __future__ import annotations

import json

import pytest

from synthalign_ray.evaluate.fixture import write_pope_fixture
from synthalign_ray.evaluate.lmms_eval import (
    lmms_eval_results,
    log_errors,
    main,
    rescore_pope_samples,
    sample_answer,
    task_split,
    write_pope_task,
)
from synthalign_ray.evaluate.pope import BenchmarkFileError


def _sample(doc_id, category, answer, label, *, nested=False):
    record = {"question_id": str(doc_id), "score": float(answer.lower().strip() == label), "prediction": answer.lower().strip(), "ground_truth": label}
    return {
        "doc_id": doc_id,
        "doc": {"id": str(doc_id), "question_id": str(doc_id), "question": "Is there a dog in the image?", "answer": label, "category": category, "image_source": "COCO_val2014_000000001.jpg"},
        "target": label,
        "arguments": ["Is there a dog in the image?\nAnswer the question using a single word or phrase.", {"max_new_tokens": 128}],
        "resps": [[answer]],
        "filtered_resps": [[answer]] if nested else [answer],
        **{name: record for name in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")},
    }


def test_rescore_pope_samples_by_hand(tmp_path):
    samples = [
        _sample(0, "random", "Yes.", "yes"),  # official yes (right); exact match: "yes." != "yes"
        _sample(1, "random", "No, there is not.", "no"),  # official no (right); exact match wrong
        _sample(2, "random", "There is a dog.", "no"),  # official yes (wrong)
        _sample(3, "random", "no", "yes", nested=True),  # official no (wrong); exact match wrong too
        _sample(4, "adversarial", "yes", "yes"),
        _sample(5, "adversarial", "I cannot tell", "no"),  # official yes (wrong)
    ]
    log = tmp_path / "samples_pope.jsonl"
    log.write_text("".join(json.dumps(s) + "\n" for s in samples) + "\n")
    result = rescore_pope_samples(str(log))
    random_split = result["splits"]["random"]
    # predictions yes, no, yes, no vs labels yes, no, no, yes: TP 1, TN 1, FP 1, FN 1
    assert (random_split["tp"], random_split["tn"], random_split["fp"], random_split["fn"]) == (1, 1, 1, 1)
    assert random_split["accuracy"] == 0.5 and random_split["yes_ratio"] == 0.5
    assert random_split["lmms_eval_exact_match_accuracy"] == 0.0
    adversarial = result["splits"]["adversarial"]
    assert (adversarial["tp"], adversarial["fp"]) == (1, 1) and adversarial["yes_ratio"] == 1.0  # labels' would be 0.5
    assert adversarial["lmms_eval_exact_match_accuracy"] == 0.5
    assert result["mean"]["accuracy"] == pytest.approx((0.5 + 0.5) / 2)


def test_answer_sources():
    assert sample_answer({"filtered_resps": [["No"]]}) == "No"
    assert sample_answer({"resps": [["Yes."]]}) == "Yes."
    assert sample_answer({"pope_accuracy": {"prediction": "no"}}) == "no"


def test_bad_lines_are_named(tmp_path):
    log = tmp_path / "samples_pope.jsonl"
    log.write_text(json.dumps(_sample(0, "random", "Yes", "yes")) + "\n" + json.dumps({"doc_id": 1, "target": "yes"}) + "\n")
    with pytest.raises(BenchmarkFileError, match=r"samples_pope.jsonl:2: not an lmms-eval POPE sample: no answer"):
        rescore_pope_samples(str(log))
    log.write_text(json.dumps({**_sample(0, "random", "Yes", "maybe"), "pope_accuracy": {}}) + "\n")
    with pytest.raises(BenchmarkFileError, match=r":1: .*no yes/no label"):
        rescore_pope_samples(str(log))
    with pytest.raises(BenchmarkFileError, match=r"missing.jsonl: cannot read"):
        rescore_pope_samples(str(tmp_path / "missing.jsonl"))


def _sample_v07(doc_id, answer, label):
    """A line as lmms-eval 0.7 logs it: no doc, no arguments (their first item is `input`), filtered_resps a
    string (resps kept only when they differ), the pope_* records written as Python reprs."""
    record = str({"question_id": str(doc_id), "score": 0.0, "prediction": answer.lower().strip(), "ground_truth": label})
    return {
        "doc_id": doc_id, "target": label, "resps": " " + answer, "filtered_resps": answer,
        "token_counts": [{"input_tokens": 52, "output_tokens": 3, "reasoning_tokens": 0}], "doc_hash": "0" * 64,
        "input_media": ["shapes_0.png"], **{name: record for name in ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")},
        "input": "Is there a ball in the image?\nAnswer the question using a single word or phrase.",
    }  # fmt: skip


def _write(path, samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def test_split_from_the_task_in_the_file_name():
    assert task_split("20261122_130552_samples_pope_adv.jsonl") == "adversarial"
    assert task_split("20261122_130552_samples_pope_pop.jsonl") == "popular"
    assert task_split("samples_pope_random.jsonl") == "random"
    assert task_split("20261122_130552_samples_synthalign_pope_popular.jsonl") == "popular"
    assert task_split("20261122_130552_samples_pope.jsonl") is None  # lmms-lab's mixed test split
    assert task_split("20261122_130552_samples_mme_random.jsonl") is None
    assert task_split("results.json") is None


def test_a_folder_of_v07_logs_is_rescored_per_split_newest_log_per_task(tmp_path):
    _write(tmp_path / "20261122_100000_samples_pope_adv.jsonl", [_sample_v07(0, "Yes", "no")])  # older run: ignored
    _write(tmp_path / "20261122_120000_samples_pope_adv.jsonl", [_sample_v07(0, "No, there is not.", "no"), _sample_v07(1, "Yes.", "yes")])
    _write(tmp_path / "20261122_120000_samples_pope_random.jsonl", [_sample_v07(0, "There is a ball.", "no")])
    _write(tmp_path / "20261122_120000_samples_mme.jsonl", [{"doc_id": 0}])  # not POPE: not read
    (tmp_path / "20261122_120000_results.json").write_text("{}")
    result = rescore_pope_samples(str(tmp_path))
    assert sorted(result["source"]) == [str(tmp_path / f"20261122_120000_samples_pope_{t}.jsonl") for t in ("adv", "random")]
    adversarial, random_split = result["splits"]["adversarial"], result["splits"]["random"]
    assert (adversarial["n"], adversarial["tp"], adversarial["tn"], adversarial["accuracy"]) == (2, 1, 1, 1.0)
    assert adversarial["lmms_eval_exact_match_accuracy"] == 0.0  # "no, there is not." / "yes." are not "no" / "yes"
    assert (random_split["n"], random_split["fp"], random_split["yes_ratio"]) == (1, 1, 1.0)
    assert result["mean"]["accuracy"] == pytest.approx(0.5)
    # One file: its split still comes from its name; no split in the name (lmms-eval's `pope`) -> "all".
    assert set(rescore_pope_samples(str(tmp_path / "20261122_120000_samples_pope_random.jsonl"))["splits"]) == {"random"}
    (tmp_path / "mixed").mkdir()
    mixed = _write(tmp_path / "mixed" / "20261122_120000_samples_pope.jsonl", [_sample_v07(0, "no", "no")])
    assert set(rescore_pope_samples(str(mixed))["splits"]) == {"all"}
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchmarkFileError, match=r"empty: no lmms-eval POPE sample log"):
        rescore_pope_samples(str(tmp_path / "empty"))


def test_write_pope_task_is_lmms_lab_pope_on_local_parquet(tmp_path):
    import pyarrow.parquet as pq

    fixture = write_pope_fixture(tmp_path / "fixture")
    paths = write_pope_task(str(fixture / "questions"), str(fixture / "images"), tmp_path / "tasks", limit=3)
    assert [p.name for p in paths] == ["synthalign_pope_random.yaml", "synthalign_pope_popular.yaml", "synthalign_pope_adversarial.yaml"]
    text = paths[1].read_text()
    assert "task: synthalign_pope_popular\ntag: synthalign_pope\ndataset_path: parquet\n" in text
    assert f'    test: "{(tmp_path / "tasks" / "pope_popular.parquet").resolve()}"\n' in text
    assert "process_results: !function utils.pope_process_results\n" in text
    assert "aggregation: !function utils.pope_aggregate_yes_ratio\n" in text
    assert '    post_prompt: "\\nAnswer the question using a single word or phrase."\n' in text
    assert "from lmms_eval.tasks.pope.utils import *" in (tmp_path / "tasks" / "utils.py").read_text()
    table = pq.read_table(tmp_path / "tasks" / "pope_popular.parquet")
    assert table.column_names == ["id", "question_id", "question", "answer", "image_source", "image", "category"]
    features = json.loads(table.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["answer"] == {"dtype": "string", "_type": "Value"}
    rows = table.to_pylist()
    questions = [json.loads(line) for line in (fixture / "questions" / "coco_pope_popular.json").read_text().splitlines()][:3]
    assert [(r["question_id"], r["question"], r["answer"], r["image_source"], r["category"]) for r in rows] == [
        (str(q["question_id"]), q["text"], q["label"], q["image"], "popular") for q in questions
    ]
    assert rows[0]["image"] == {"bytes": (fixture / "images" / questions[0]["image"]).read_bytes(), "path": questions[0]["image"]}


def test_write_pope_task_errors_name_the_file(tmp_path):
    fixture = write_pope_fixture(tmp_path / "fixture")
    (fixture / "images" / "shapes_1.png").unlink()
    with pytest.raises(BenchmarkFileError, match=r"coco_pope_random.json:3: image 'shapes_1.png' not found"):
        write_pope_task(str(fixture / "questions"), str(fixture / "images"), tmp_path / "tasks")
    assert main(["pope-task", "--question-dir", str(fixture / "questions"), "--image-dir", str(fixture / "images"), "--output", str(tmp_path / "t")]) == 2
    assert not (tmp_path / "t").exists()


# lmms-eval 0.7.3's console output when an evaluation fails: loguru lines coloured on a pipe, the traceback
# on stderr, exit code 0 and no results file (as with filelock 4.3).
FAILED_RUN_LOG = (
    "\x1b[32m2026-12-06 09:14:02\x1b[0m | \x1b[1mINFO    \x1b[0m | \x1b[36mlmms_eval.__main__\x1b[0m:\x1b[36mcli_evaluate\x1b[0m:\x1b[36m516\x1b[0m - \x1b[1mVerbosity set to INFO\x1b[0m\n"
    "Traceback (most recent call last):\n"
    "ModuleNotFoundError: No module named 'filelock._api'\n"
    "\x1b[32m2026-12-06 09:14:09\x1b[0m | \x1b[31m\x1b[1mERROR   \x1b[0m | \x1b[36mlmms_eval.__main__\x1b[0m:\x1b[36mcli_evaluate\x1b[0m:\x1b[36m614\x1b[0m - "
    "\x1b[31m\x1b[1mError during evaluation: No module named 'filelock._api'. Please set `--verbosity=DEBUG` to get more information.\x1b[0m\n"
)


def test_a_run_that_wrote_no_results_is_an_error_with_lmms_evals_own_message(tmp_path):
    assert log_errors(FAILED_RUN_LOG) == [
        "Error during evaluation: No module named 'filelock._api'. Please set `--verbosity=DEBUG` to get more information."
    ]
    model_dir = tmp_path / "trained"
    model_dir.mkdir()
    with pytest.raises(BenchmarkFileError, match=r"trained: lmms-eval wrote no results \(\*_results.json\); its log says: Error during evaluation: No module named 'filelock._api'"):
        lmms_eval_results(str(model_dir), FAILED_RUN_LOG)
    with pytest.raises(BenchmarkFileError, match=r"no results \(\*_results.json\); its log has no ERROR line$"):
        lmms_eval_results(str(model_dir), "INFO only\n")
    with pytest.raises(BenchmarkFileError, match=r"missing: lmms-eval wrote no results"):
        lmms_eval_results(str(tmp_path / "missing"))
    # The newest results file (lmms-eval's date prefix) is the run's.
    (model_dir / "20261206_091400_results.json").write_text(json.dumps({"results": {"pope": {"old": 1}}}))
    (model_dir / "20261206_101400_results.json").write_text(json.dumps({"results": {"pope": {"new": 1}}}))
    assert lmms_eval_results(str(model_dir), FAILED_RUN_LOG) == {"pope": {"new": 1}}
    (model_dir / "20261206_111400_results.json").write_text("{}")
    with pytest.raises(BenchmarkFileError, match=r"20261206_111400_results.json: not an lmms-eval results file"):
        lmms_eval_results(str(model_dir))
