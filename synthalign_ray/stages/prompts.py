"""Prompts: read text-to-image prompts from JSONL, CSV, Parquet or plain text into validated rows.

Every row gets a stable string `id`, a `category`, the `t2i_prompt` and its `seed` (a pure function of
the run seed and the id, so reruns and resumes render the same images). Bad rows (empty prompt,
duplicate id, malformed line) are reported with their line numbers; the config says whether the run
refuses them (`on_bad_rows: fail`) or skips them and records them in the manifest (`skip`).
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from synthalign_ray.stages.common import STATUS_OK, StrictModel

FORMATS = ("jsonl", "csv", "parquet", "txt")
DEFAULT_CATEGORY = "uncategorized"
SEED_MODULUS = 2**31  # torch.Generator accepts 64 bits; 31 keeps seeds portable to numpy and JSON readers


class PromptsConfig(StrictModel):
    path: str = Field(description="prompt file (local path or pyarrow filesystem URI)")
    format: Literal["auto", "jsonl", "csv", "parquet", "txt"] = "auto"
    id_field: str = "id"
    prompt_field: str = "prompt"
    category_field: str = "category"
    on_bad_rows: Literal["fail", "skip"] = "fail"
    limit: int | None = Field(None, ge=1, description="use only the first N valid prompts")

    @field_validator("path")
    @classmethod
    def _readable(cls, path: str) -> str:
        return check_input_file(path)

    def resolved_format(self) -> str:
        return file_format(self.path, self.format)


def check_input_file(path: str) -> str:
    if "://" not in path and not Path(path).expanduser().is_file():
        raise ValueError(f"input file {path!r} does not exist or is not a file")
    return path


def file_format(path: str, declared: str = "auto") -> str:
    """The declared format, else the one the file name's suffix says (plain text by default)."""
    if declared != "auto":
        return declared
    suffix = Path(path.split("?")[0]).suffix.lower().lstrip(".")
    return {"jsonl": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet", "txt": "txt"}.get(suffix, "txt")


@dataclass(frozen=True)
class BadRow:
    line: int  # 1-based line (row number for Parquet, header excluded for CSV: the line in the file)
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


class InputFileError(ValueError):
    """An input file (prompts, instructions) has bad rows and the config says to refuse them."""

    def __init__(self, path: str, bad: list[BadRow], hint: str = "", shown: int = 20):
        listed = "\n".join(f"  {b}" for b in bad[:shown])
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        hint = f" ({hint})" if hint else ""
        super().__init__(f"{path}: {len(bad)} bad row(s){hint}:\n{listed}{more}")
        self.bad = bad


def content_id(text: str) -> str:
    """Stable id of a prompt without one: a hash of its text (not its line, which edits shift)."""
    return "p-" + hashlib.sha1(text.encode()).hexdigest()[:16]


def prompt_seed(run_seed: int, prompt_id: str) -> int:
    digest = hashlib.sha256(f"{run_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def image_seed(row_seed: int, k: int) -> int:
    """Seed of candidate image k of a row: distinct per k, reproducible from the row alone."""
    return (row_seed + k) % SEED_MODULUS


def read_records(path: str, fmt: str, text_field: str):
    """Yield (line, record-or-None, parse-error) for each data line of a JSONL, CSV, Parquet or text
    file; a text file's lines become records {text_field: line}; CSV must have a `text_field` column."""
    from synthalign_ray.store import filesystem

    fs, fpath = filesystem(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        for i, rec in enumerate(pq.read_table(fpath, filesystem=fs).to_pylist(), start=1):
            yield i, rec, None
        return
    with fs.open_input_stream(fpath) as stream:
        text = stream.read().decode("utf-8-sig")
    lines = text.splitlines()
    if fmt == "jsonl":
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield i, None, f"malformed JSON ({e.msg} at column {e.colno})"
                continue
            if not isinstance(rec, dict):
                yield i, None, f"expected a JSON object, got {type(rec).__name__}"
                continue
            yield i, rec, None
    elif fmt == "csv":
        reader = csv.DictReader(lines)
        if reader.fieldnames is None or text_field not in reader.fieldnames:
            yield 1, None, f"CSV header has no {text_field!r} column (header: {reader.fieldnames})"
            return
        for rec in reader:
            line = reader.line_num
            if None in rec:
                yield line, None, f"malformed CSV row: {len(reader.fieldnames) + len(rec[None])} fields, header has {len(reader.fieldnames)}"
                continue
            yield line, rec, None
    else:  # txt: one prompt a line
        for i, line in enumerate(lines, start=1):
            if line.strip():
                yield i, {text_field: line.strip()}, None


def read_prompts(cfg: PromptsConfig, run_seed: int) -> tuple[list[dict], list[BadRow]]:
    """Validated prompt rows and the bad rows found. Raises InputFileError if bad rows must fail."""
    fmt = cfg.resolved_format()
    rows: list[dict] = []
    bad: list[BadRow] = []
    first_line_of: dict[str, int] = {}
    for line, rec, error in read_records(cfg.path, fmt, cfg.prompt_field):
        if error:
            bad.append(BadRow(line, error))
            continue
        prompt = rec.get(cfg.prompt_field)
        if not isinstance(prompt, str) or not prompt.strip():
            bad.append(BadRow(line, f"empty or missing {cfg.prompt_field!r}"))
            continue
        prompt = prompt.strip()
        raw_id = rec.get(cfg.id_field)
        prompt_id = content_id(prompt) if raw_id is None or str(raw_id).strip() == "" else str(raw_id).strip()
        if prompt_id in first_line_of:
            bad.append(BadRow(line, f"duplicate id {prompt_id!r} (first seen on line {first_line_of[prompt_id]})"))
            continue
        first_line_of[prompt_id] = line
        category = rec.get(cfg.category_field)
        rows.append(
            {
                "id": prompt_id,
                "category": str(category).strip() if category not in (None, "") else DEFAULT_CATEGORY,
                "t2i_prompt": prompt,
                "seed": prompt_seed(run_seed, prompt_id),
                "source_line": line,
            }
        )
        if cfg.limit is not None and len(rows) >= cfg.limit:
            break
    if bad and cfg.on_bad_rows == "fail":
        raise InputFileError(cfg.path, bad, "set prompts.on_bad_rows=skip to skip them")
    return rows, bad


def prompts_table(rows: list[dict]):
    """The pipeline's input table: prompt columns plus the status columns every stage maintains."""
    import pyarrow as pa

    n = len(rows)
    return pa.table(
        {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "category": pa.array([r["category"] for r in rows], pa.string()),
            "t2i_prompt": pa.array([r["t2i_prompt"] for r in rows], pa.string()),
            "seed": pa.array([r["seed"] for r in rows], pa.int64()),
            "source_line": pa.array([r["source_line"] for r in rows], pa.int64()),
            "status": pa.array([STATUS_OK] * n, pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "failed_stage": pa.array([None] * n, pa.string()),
            "drop_reason": pa.array([None] * n, pa.string()),
        }
    )
