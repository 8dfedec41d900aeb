"""Prompts: read text-to-image prompts from JSONL, CSV, Parquet or plain text into validated rows.

Every row gets a stable string `id`, a `category`, the `t2i_prompt` and its `seed` (a pure function of
the run seed and the id, so reruns and resumes render the same images). Bad rows (empty prompt,
duplicate id, malformed line) are reported with their line numbers; the config says whether the run
refuses them (`on_bad_rows: fail`) or skips them and records them in the manifest (`skip`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
from pydantic import Field, field_validator

from synthalign_ray.errors import UserError
from synthalign_ray.ids import IdSet, SeenIds, digests
from synthalign_ray.base import SEED_MODULUS, STATUS_OK, StrictModel

FORMATS = ("jsonl", "csv", "parquet", "txt")
DEFAULT_CATEGORY = "uncategorized"
# Rows of a prompt file the driver holds at once as Python objects (~1 KB each) while reading it.
CHUNK_ROWS = 4096
PROMPT_SCHEMA = pa.schema(
    [("id", pa.string()), ("category", pa.string()), ("t2i_prompt", pa.string()), ("seed", pa.int64()), ("source_line", pa.int64())]
)


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


class InputFileError(UserError, ValueError):
    """An input file (prompts, instructions) has bad rows and the config says to refuse them."""

    def __init__(self, path: str, bad: list[BadRow], hint: str = "", shown: int = 20):
        listed = "\n".join(f"  {b}" for b in bad[:shown])
        more = f"\n  ... and {len(bad) - shown} more" if len(bad) > shown else ""
        hint = f" ({hint})" if hint else ""
        super().__init__(f"{path}: {len(bad)} bad row(s){hint}:\n{listed}{more}")
        self.bad = bad


class NoPromptsError(InputFileError):
    """A prompt file with no valid prompt: a run of it would make nothing and look like a success."""

    def __init__(self, path: str, bad: list[BadRow]):
        ValueError.__init__(
            self,
            f"{path}: no prompt to generate from"
            + (f": all {len(bad)} row(s) are bad (first: {bad[0]})" if bad else " (the file has no rows)"),
        )
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
    file, streaming (a million prompts are never in memory at once); a text file's lines become
    records {text_field: line}; CSV must have a `text_field` column."""
    from synthalign_ray.store import filesystem

    fs, fpath = filesystem(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        line = 0
        with fs.open_input_file(fpath) as stream:
            for batch in pq.ParquetFile(stream).iter_batches(batch_size=CHUNK_ROWS):
                for rec in batch.to_pylist():
                    line += 1
                    yield line, rec, None
        return
    # newline="": lines end where the file's do (\n, \r\n or \r), and CSV keeps its quoted line breaks.
    with io.TextIOWrapper(fs.open_input_stream(fpath), encoding="utf-8-sig", newline="") as lines:
        if fmt == "csv":
            reader = csv.DictReader(lines)
            if reader.fieldnames is None or text_field not in reader.fieldnames:
                yield 1, None, f"CSV header has no {text_field!r} column (header: {reader.fieldnames})"
                return
            for rec in reader:
                if None in rec:
                    fields = len(reader.fieldnames) + len(rec[None])
                    yield reader.line_num, None, f"malformed CSV row: {fields} fields, header has {len(reader.fieldnames)}"
                    continue
                yield reader.line_num, rec, None
            return
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            if fmt != "jsonl":  # txt: one prompt a line
                yield i, {text_field: line.strip()}, None
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


def prompt_fields(cfg: PromptsConfig, rec: dict) -> dict | str:
    """A record's `id`, `category` and `t2i_prompt`, or why it is not a prompt."""
    prompt = rec.get(cfg.prompt_field)
    if not isinstance(prompt, str) or not prompt.strip():
        return f"empty or missing {cfg.prompt_field!r}"
    prompt = prompt.strip()
    raw_id = rec.get(cfg.id_field)
    category = rec.get(cfg.category_field)
    return {
        "id": content_id(prompt) if raw_id is None or str(raw_id).strip() == "" else str(raw_id).strip(),
        "category": str(category).strip() if category not in (None, "") else DEFAULT_CATEGORY,
        "t2i_prompt": prompt,
    }


@dataclass
class PromptCheck:
    """What a first pass over a prompt file found; `prompt_rows` reads the valid rows in a second.

    Only the ids' digests are held, never the rows: the driver's memory stays flat in the file's size."""

    bad: list[BadRow]
    ids: IdSet  # of the valid rows
    duplicate_lines: set[int]  # lines whose id an earlier line has (each is in `bad`)
    last_line: int  # the line of the last valid row taken (`limit`), 0 if none

    @property
    def rows(self) -> int:
        return len(self.ids)


def check_prompts(cfg: PromptsConfig, chunk_rows: int = CHUNK_ROWS) -> PromptCheck:
    """Validates a prompt file in one streaming pass. Raises InputFileError if bad rows must fail."""
    bad: list[BadRow] = []
    duplicates: dict[int, str] = {}  # line -> its id, which an earlier line has
    seen = SeenIds()
    valid, last_line = 0, 0
    records = read_records(cfg.path, cfg.resolved_format(), cfg.prompt_field)
    while cfg.limit is None or valid < cfg.limit:
        chunk = list(itertools.islice(records, chunk_rows))
        if not chunk:
            break
        fields = [error if error is not None else prompt_fields(cfg, rec) for _, rec, error in chunk]
        values = digests(f["id"] for f in fields if isinstance(f, dict))
        repeats = iter(seen.seen(values))
        taken = 0  # ids up to the limit
        for (line, _, _), f in zip(chunk, fields):
            if cfg.limit is not None and valid >= cfg.limit:
                break
            if isinstance(f, str):
                bad.append(BadRow(line, f))
                continue
            taken += 1
            if next(repeats):
                duplicates[line] = f["id"]
            else:
                valid, last_line = valid + 1, line
        seen.add(values[:taken])
    if duplicates:
        records = read_records(cfg.path, cfg.resolved_format(), cfg.prompt_field)
        ids = ((line, f["id"]) for line, rec, error in records if error is None and isinstance(f := prompt_fields(cfg, rec), dict))
        bad = sorted(bad + duplicate_rows(ids, duplicates), key=lambda b: b.line)
    if bad and cfg.on_bad_rows == "fail":
        raise InputFileError(cfg.path, bad, "set prompts.on_bad_rows=skip to skip them")
    if valid == 0:
        raise NoPromptsError(cfg.path, bad)
    return PromptCheck(bad=bad, ids=IdSet(seen.digests), duplicate_lines=set(duplicates), last_line=last_line)


def duplicate_rows(ids: Iterable[tuple[int, str]], duplicates: dict[int, str]) -> list[BadRow]:
    """The bad rows of `duplicates` (line -> id), each naming the line its id was first seen on, found in
    `ids` (line, id of every line with one, read again from the file; only the ids seen twice are held)."""
    first_line_of: dict[str, int] = {}
    wanted, last = set(duplicates.values()), max(duplicates)
    for line, row_id in ids:
        if line > last:
            break
        if row_id in wanted:
            first_line_of.setdefault(row_id, line)
    return [BadRow(line, f"duplicate id {row_id!r} (first seen on line {first_line_of[row_id]})") for line, row_id in duplicates.items()]


def prompt_rows(cfg: PromptsConfig, run_seed: int, check: PromptCheck, batch_rows: int = CHUNK_ROWS) -> Iterator:
    """The valid rows `check` found, read again from the file: Arrow tables of up to `batch_rows` rows
    with `id`, `category`, `t2i_prompt`, `seed` and `source_line`."""
    batch: list[dict] = []
    for line, rec, error in read_records(cfg.path, cfg.resolved_format(), cfg.prompt_field):
        if line > check.last_line:
            break
        if error is not None or line in check.duplicate_lines:
            continue
        fields = prompt_fields(cfg, rec)
        if isinstance(fields, str):
            continue
        batch.append({**fields, "seed": prompt_seed(run_seed, fields["id"]), "source_line": line})
        if len(batch) == batch_rows:
            yield pa.Table.from_pylist(batch, schema=PROMPT_SCHEMA)
            batch = []
    if batch:
        yield pa.Table.from_pylist(batch, schema=PROMPT_SCHEMA)


def valid_ids(cfg: PromptsConfig, check: PromptCheck) -> Iterator[str]:
    """The ids of the valid rows `check` found, in file order (read again from the file)."""
    for table in prompt_rows(cfg, 0, check):  # an id does not depend on the run seed
        yield from table["id"].to_pylist()


def read_prompts(cfg: PromptsConfig, run_seed: int) -> tuple[list[dict], list[BadRow]]:
    """Validated prompt rows and the bad rows found, for a file small enough to hold (the pipeline
    streams its prompts: `check_prompts`, `prompt_rows`). Raises InputFileError if bad rows must fail."""
    check = check_prompts(cfg)
    return [row for table in prompt_rows(cfg, run_seed, check) for row in table.to_pylist()], check.bad


def prompts_table(rows: list[dict]):
    """The pipeline's input table of prompt rows (dicts with the `PROMPT_SCHEMA` fields)."""
    return with_status_columns(pa.Table.from_pylist(rows, schema=PROMPT_SCHEMA))


def with_status_columns(prompts):
    """A table of prompt rows plus the status columns every stage maintains: the pipeline's input."""
    n = prompts.num_rows
    status = {"status": pa.array([STATUS_OK] * n, pa.string())}
    status |= {name: pa.nulls(n, pa.string()) for name in ("error", "failed_stage", "drop_reason")}
    for name, column in status.items():
        prompts = prompts.append_column(name, column)
    return prompts


INPUT_SCHEMA = with_status_columns(PROMPT_SCHEMA.empty_table()).schema
