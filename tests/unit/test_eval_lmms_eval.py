"""Re-scoring lmms-eval's logged POPE samples with the official parser, on a hand-made log in lmms-eval's
--log_samples format (doc without the image, target, resps, filtered_resps, the pope_* records)."""

from __future__ import annotations

import json

import pytest

from synthalign_ray.evaluate.lmms_eval import rescore_pope_samples, sample_answer
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
