"""What every benchmark runner shares: file errors that name the file, image locations, and the one
inference path (Ray Data batch inference on a vLLM pool, `ray.data.llm`) that answers every prompt of
every benchmark about its image.

A benchmark turns its files into prompt rows `{"id", "image_uri", "prompt", "max_tokens"}` (ids unique
across benchmarks, e.g. "pope/random/17", "chair/COCO_val2014_000000000042.jpg"); `answer_prompts`
answers all of them with one engine pool per model, so running POPE, CHAIR and MMHal-Bench together
starts each model once. The benchmark then joins the answers back to its own rows by id.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from synthalign_ray import store
from synthalign_ray.engines.vllm_engine import (
    LIGHT_STAGE_CPUS,
    VLLMPoolConfig,
    build_engine_processor,
    finish_reason,
    image_chat_request,
)
from synthalign_ray.errors import UserError


class BenchmarkFileError(UserError, ValueError):
    """A benchmark file that is missing or malformed; the message names the file (and line)."""


def read_text(path: str, what: str) -> str:
    """A benchmark file's text (any pyarrow filesystem); a missing file names itself and what it is."""
    fs, local = store.filesystem(path)
    try:
        with fs.open_input_stream(local) as stream:
            return stream.read().decode("utf-8")
    except (FileNotFoundError, OSError) as error:
        raise BenchmarkFileError(f"{path}: cannot read {what} ({error})") from None


def read_json(path: str, what: str) -> Any:
    return _parse_json(read_text(path, what), path, what)


def _parse_json(text: str, path: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise BenchmarkFileError(f"{path}:{error.lineno}: {what} is not valid JSON ({error.msg})") from None


def check_record(record: Any, where: str, fields: tuple[str, ...], kind: str) -> dict[str, Any]:
    """A benchmark file's record, checked to be a JSON object with `fields`; errors start with `where`
    (file:line or file: record N) and say what `kind` of record has which fields ("POPE rows")."""
    if not isinstance(record, dict):
        raise BenchmarkFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [name for name in fields if name not in record]
    if missing:
        raise BenchmarkFileError(f"{where}: missing field(s) {missing} ({kind} have {list(fields)})")
    return record


def read_string_lists(path: str, what: str, shape: str) -> dict[str, list[str]]:
    """A JSON object of string lists ({key: ["word", ...]}), non-empty and checked; `shape` describes it in
    the errors, e.g. "image file name: [object names]"."""
    data = read_json(path, what)
    if not isinstance(data, dict) or not data:
        raise BenchmarkFileError(f"{path}: expected a non-empty JSON object {{{shape}}}")
    for key, words in data.items():
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise BenchmarkFileError(f"{path}: {what} of {key!r} must be a list of strings")
    return data


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def read_json_list(path: str, what: str) -> list[tuple[int, Any]]:
    """A JSON file holding a list: each element with the line it starts on, for errors that name
    file:line (a pretty-printed benchmark file has one record over several lines)."""
    text = read_text(path, what)
    data = _parse_json(text, path, what)
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path}: expected a JSON list of {what} records, got {type(data).__name__}")
    decoder = json.JSONDecoder()
    items, line, counted = [], 1, 0
    position = _JSON_SPACE.match(text).end() + 1  # past "["
    for _ in data:
        position = _JSON_SPACE.match(text, position).end()
        line += text.count("\n", counted, position)
        counted = position
        value, position = decoder.raw_decode(text, position)
        items.append((line, value))
        position = _JSON_SPACE.match(text, position).end() + 1  # past "," or the closing "]"
    return items


def image_location(image_dir: str, name: str, where: str, field: str) -> str:
    """The image `name` under `image_dir`; a local one must exist (URIs are read by the workers, where a
    missing one fails with its path). `where` (file:line) and `field` (the config field) go into the error."""
    image = store.join(image_dir, name)
    if "://" not in image and not Path(image).expanduser().is_file():
        raise BenchmarkFileError(f"{where}: image {name!r} not found in {field} {image_dir}")
    return image


def read_image(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data row function: the image file's bytes as an HF Image struct (any pyarrow filesystem)."""
    fs, path = store.filesystem(row["image_uri"])
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as error:
        raise BenchmarkFileError(f"image {row['image_uri']}: cannot read ({error})") from None
    return {**row, "image": {"bytes": data, "path": row["image_uri"]}}


def answer_prompts(
    rows: list[dict[str, Any]],
    model: str,
    *,
    pool: VLLMPoolConfig,
    engine_kwargs: dict[str, Any],
    chat_template: str | None = None,
) -> dict[str, dict[str, str]]:
    """Greedy answers of `model` to prompt rows ({"id", "image_uri", "prompt", "max_tokens"}), as Ray Data
    batch inference over one vLLM pool: id -> {"answer", "finish_reason"}. `chat_template` (Jinja) renders
    the prompts instead of the model's own template."""
    import ray

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        sampling_params = {"max_tokens": row["max_tokens"], "temperature": 0.0, "top_p": 1.0}
        return {"id": row["id"], "max_tokens": row["max_tokens"], **image_chat_request(row["prompt"], row["image"]), "sampling_params": sampling_params}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "answer": row["generated_text"],
            "finish_reason": finish_reason(row["num_generated_tokens"], row["max_tokens"]),
        }

    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids repeat")
    requests = [{name: row[name] for name in ("id", "image_uri", "prompt", "max_tokens")} for row in rows]
    processor = build_engine_processor(
        model, preprocess=preprocess, postprocess=postprocess, pool=pool, engine_kwargs=engine_kwargs, chat_template=chat_template
    )
    blocks = math.ceil(len(requests) / pool.batch_size)
    ds = ray.data.from_items(requests, override_num_blocks=max(1, min(blocks, 64))).map(read_image, num_cpus=LIGHT_STAGE_CPUS)
    answers = {row["id"]: {"answer": row["answer"], "finish_reason": row["finish_reason"]} for row in processor(ds).iter_rows()}
    if set(answers) != set(ids):
        raise RuntimeError(f"{model}: {len(answers)} answers for {len(ids)} prompts")
    return answers
