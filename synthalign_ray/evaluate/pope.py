"""POPE (Li et al. 2023): yes/no object-existence questions, answered by an LVLM as Ray Data batch
inference on vLLM, scored with the official parser (`metrics.pope_answer`).

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
import math
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray import store
from synthalign_ray.engines.vllm_engine import (
    LIGHT_STAGE_CPUS,
    VLLMPoolConfig,
    build_engine_processor,
    finish_reason,
    image_chat_request,
)
from synthalign_ray.evaluate.metrics import pope_answer, pope_metrics
from synthalign_ray.stages.common import StrictModel

POPE_SPLITS = ("random", "popular", "adversarial")
LLAVA_POPE_SUFFIX = "\nAnswer the question using a single word or phrase."
REQUIRED_FIELDS = ("question_id", "image", "text", "label")
# The metrics compared across models and averaged over splits (the counts stay per split).
HEADLINE_METRICS = ("accuracy", "precision", "recall", "f1", "yes_ratio")


class BenchmarkFileError(ValueError):
    """A benchmark file that is missing or malformed; the message names the file (and line)."""


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
    fs, local = store.filesystem(path)
    try:
        with fs.open_input_stream(local) as stream:
            text = stream.read().decode("utf-8")
    except (FileNotFoundError, OSError) as error:
        raise BenchmarkFileError(f"{path}: cannot read POPE question file ({error})") from None
    questions, seen = [], {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise BenchmarkFileError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise BenchmarkFileError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        missing = [name for name in REQUIRED_FIELDS if name not in row]
        if missing:
            raise BenchmarkFileError(f"{path}:{number}: missing field(s) {missing} (POPE rows have {list(REQUIRED_FIELDS)})")
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


def load_questions(cfg: PopeConfig) -> list[dict[str, Any]]:
    """Every split's questions with the image location and prompt; local images are checked to exist
    (URIs are read by the workers, where a missing one fails with its path)."""
    rows = []
    for split in cfg.splits:
        path = cfg.question_file(split)
        for q in read_questions(path, split, cfg.limit):
            image = store.join(cfg.image_dir, q["image_file"])
            if "://" not in image and not Path(image).expanduser().is_file():
                raise BenchmarkFileError(f"{path}:{q['line']}: image {q['image_file']!r} not found in pope.image_dir {cfg.image_dir}")
            rows.append({**q, "id": f"{split}/{q['question_id']}", "image_uri": image, "prompt": pope_prompt(q["text"], cfg.prompt_suffix)})
    return rows


def read_image(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data row function: the image file's bytes as an HF Image struct (any pyarrow filesystem)."""
    fs, path = store.filesystem(row["image_uri"])
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as error:
        raise BenchmarkFileError(f"image {row['image_uri']}: cannot read ({error})") from None
    return {**row, "image": {"bytes": data, "path": row["image_uri"]}}


PREDICTION_COLUMNS = ("id", "split", "question_id", "image_file", "label", "text")


def answer_questions(rows: list[dict[str, Any]], model: str, *, max_tokens: int, pool: VLLMPoolConfig, engine_kwargs: dict[str, Any]) -> pa.Table:
    """The model's greedy answers as a table (PREDICTION_COLUMNS + answer, finish_reason, prediction),
    computed as Ray Data batch inference over a vLLM pool (`ray.data.llm`)."""
    import ray

    sampling_params = {"max_tokens": max_tokens, "temperature": 0.0, "top_p": 1.0}

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {**{name: row[name] for name in PREDICTION_COLUMNS}, **image_chat_request(row["prompt"], row["image"]), "sampling_params": sampling_params}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        answer = row["generated_text"]
        return {
            **{name: row[name] for name in PREDICTION_COLUMNS},
            "answer": answer,
            "finish_reason": finish_reason(row["num_generated_tokens"], max_tokens),
            "prediction": pope_answer(answer),
        }

    processor = build_engine_processor(model, preprocess=preprocess, postprocess=postprocess, pool=pool, engine_kwargs=engine_kwargs)
    blocks = math.ceil(len(rows) / pool.batch_size)
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(blocks, 64))).map(read_image, num_cpus=LIGHT_STAGE_CPUS)
    answered = processor(ds).materialize()
    table = pa.concat_tables([ray.get(ref) for ref in answered.to_arrow_refs()]) if answered.count() else None
    if table is None or table.num_rows != len(rows):
        raise RuntimeError(f"POPE: {0 if table is None else table.num_rows} answers for {len(rows)} questions")
    order = {row["id"]: i for i, row in enumerate(rows)}  # the question files' order, whatever order blocks finished in
    ids = table.column("id").to_pylist()
    table = table.take(sorted(range(table.num_rows), key=lambda i: order[ids[i]]))
    return table.rename_columns(["question" if name == "text" else name for name in table.column_names]).drop_columns(["id"])


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
