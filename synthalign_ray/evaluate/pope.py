"""POPE (Li et al. 2023): yes/no object-existence questions, answered by an LVLM as Ray Data batch
inference on vLLM, scored as LLaVA scores it: the answer stripped, then the official parser
(`metrics.pope_prediction`).

Input, in POPE's own format (AoiDragon/POPE output/coco/coco_pope_{random,popular,adversarial}.json,
JSON lines despite the extension), one file per split:

    {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard in the image?", "label": "yes"}

`image` is a file name under `pope.image_dir` (COCO val2014 for the official files; a folder or a
pyarrow URI such as s3://bucket/val2014). The question goes to the model with LLaVA-1.5's POPE prompt
suffix ("Answer the question using a single word or phrase.", LLaVA's llava_pope_test.jsonl), unless
the text already ends with it. Decoding is greedy.

Output per model: `pope.json` (every metric per split, the mean over splits and the pooled counts) and
`pope_predictions.parquet` (one row per question: split, question_id, image, label, answer, prediction,
finish_reason).
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray import store
from synthalign_ray.evaluate.common import BenchmarkFileError, check_record, image_location, read_text
from synthalign_ray.evaluate.metrics import pope_metrics, pope_prediction
from synthalign_ray.base import StrictModel

POPE_SPLITS = ("random", "popular", "adversarial")
LLAVA_POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
REQUIRED_FIELDS = ("question_id", "image", "text", "label")
# The metrics compared across models and averaged over splits (the counts stay per split).
HEADLINE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class PopeConfig(StrictModel):
    question_dir: str | None = Field(
        None, description="folder (or URI) holding *pope_<split>.json or .jsonl, e.g. POPE's output/coco/"
    )
    question_files: dict[str, str] = Field(
        default_factory=dict, description="split -> question file; overrides question_dir for that split"
    )
    image_dir: str = Field(description="folder or URI of the images named by the questions' `image` field")
    splits: list[str] = Field(default_factory=lambda: list(POPE_SPLITS), min_length=1)
    prompt_suffix: str = Field(LLAVA_POPE_SUFFIX, description="appended to each question (LLaVA-1.5's POPE prompt)")
    limit: int | None = Field(None, ge=1, description="first N questions per split (smoke tests)")

    @model_validator(mode="after")
    def _every_split_has_a_source(self):
        missing = [s for s in self.splits if s not in self.question_files and self.question_dir is None]
        if missing:
            raise ValueError(f"no question file for split(s) {missing}: set question_dir or question_files")
        return self

    def question_file(self, split: str) -> str:
        """The question file of a split: question_files[split], else the one file in question_dir whose
        name ends with pope_<split>.json or .jsonl."""
        if split in self.question_files:
            return self.question_files[split]
        fs, folder = store.filesystem(self.question_dir)
        from pyarrow import fs as pafs

        info = fs.get_file_info(folder)
        if info.type != pafs.FileType.Directory:
            raise BenchmarkFileError(f"pope.question_dir {self.question_dir}: not a folder")
        names = sorted(
            f.base_name for f in fs.get_file_info(pafs.FileSelector(folder))
            if f.base_name.endswith((f"pope_{split}.json", f"pope_{split}.jsonl"))
        )  # fmt: skip
        if len(names) != 1:
            found = "none" if not names else ", ".join(names)
            raise BenchmarkFileError(
                f"pope.question_dir {self.question_dir}: expected one file named *pope_{split}.json(l) for split {split!r}, found {found}"
            )
        return store.join(self.question_dir, names[0])


def read_questions(path: str, split: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The questions of one POPE file (JSON lines), checked: every line an object with question_id,
    image, text and label ("yes"/"no"), question ids unique. Errors name the file and line."""
    text = read_text(path, "POPE question file")
    questions, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        check_record(row, f"{path}:{number}", REQUIRED_FIELDS, "POPE rows")
        if row["label"] not in ("yes", "no"):
            raise BenchmarkFileError(f"{path}:{number}: label {row['label']!r} is not 'yes' or 'no'")
        if not isinstance(row["text"], str) or not row["text"].strip():
            raise BenchmarkFileError(f"{path}:{number}: empty question text")
        if not isinstance(row["image"], str) or not row["image"]:
            raise BenchmarkFileError(f"{path}:{number}: `image` must be a file name")
        key = str(row["question_id"])
        if key in seen:
            raise BenchmarkFileError(f"{path}:{number}: question_id {key} repeats line {seen[key]}")
        seen[key] = number
        questions.append(
            {"split": split, "question_id": key, "image_file": row["image"], "text": row["text"], "label": row["label"], "line": number}
        )
        if limit is not None and len(questions) == limit:
            break
    if not questions:
        raise BenchmarkFileError(f"{path}: no questions")
    return questions


def pope_prompt(text: str, suffix: str) -> str:
    """The question as the model sees it: LLaVA's suffix appended once."""
    return text if not suffix or text.rstrip().endswith(suffix.strip()) else text + suffix


def load_questions(cfg: PopeConfig, max_tokens: int) -> list[dict[str, Any]]:
    """Every split's questions as prompt rows (`common.answer_prompts`): image location checked, prompt
    with LLaVA's suffix, the answer's token budget."""
    rows = []
    for split in cfg.splits:
        path = cfg.question_file(split)
        for q in read_questions(path, split, cfg.limit):
            image = image_location(cfg.image_dir, q["image_file"], f"{path}:{q['line']}", "pope.image_dir")
            prompt = pope_prompt(q["text"], cfg.prompt_suffix)
            rows.append({**q, "id": f"pope/{split}/{q['question_id']}", "image_uri": image, "prompt": prompt, "max_tokens": max_tokens})
    return rows


def predictions(questions: list[dict[str, Any]], answers: dict[str, dict[str, str]]) -> pa.Table:
    """One row per question, in the question files' order: split, question_id, image_file, label,
    question, answer, finish_reason and the parsed prediction."""
    rows = []
    for q in questions:
        answer = answers[q["id"]]
        rows.append(
            {
                "split": q["split"], "question_id": q["question_id"], "image_file": q["image_file"], "label": q["label"],
                "question": q["text"], "answer": answer["answer"], "finish_reason": answer["finish_reason"],
                "prediction": pope_prediction(answer["answer"]),
            }
        )  # fmt: skip
    return pa.Table.from_pylist(rows)


def score(predictions: pa.Table, splits: list[str]) -> dict[str, Any]:
    """Metrics per split, their mean over splits (as papers report POPE), and the pooled counts."""
    rows = predictions.select(["split", "label", "prediction"]).to_pylist()
    per_split = {}
    for split in splits:
        mine = [row for row in rows if row["split"] == split]
        per_split[split] = pope_metrics([r["prediction"] for r in mine], [r["label"] for r in mine])
    mean = {}
    for name in HEADLINE_METRICS:
        values = [m[name] for m in per_split.values()]
        mean[name] = None if any(v is None for v in values) else sum(values) / len(values)
    return {
        "splits": per_split,
        "mean": mean,
        "pooled": pope_metrics([r["prediction"] for r in rows], [r["label"] for r in rows]),
    }
