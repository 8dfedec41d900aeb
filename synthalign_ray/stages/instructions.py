"""Instructions: the question the LVLMs answer about each row's kept image (paper section 3.2).

The paper has GPT-4o turn the text-to-image prompt into an instruction prompt; the official code reads
them from a supplied file. Three sources here:

- `file`: a JSONL, CSV or Parquet file of (`id`, `instruction`) joined to the rows by prompt id, never
  by line order. Bad lines (no id, empty instruction, duplicate id, malformed) are reported with their
  line numbers before anything starts. A row whose id has no instruction is dropped with reason
  `no_instruction` (or the run refuses to start, `on_missing: fail`).
- `template`: a Python format string over the row (`{t2i_prompt}`, `{category}`, `{id}`), e.g.
  "Describe this image in detail." or "Is this a faithful picture of: {t2i_prompt}?".
- `llm`: as the paper did, an LLM rewrites each text-to-image prompt into an instruction (`llm_prompt`,
  a format string over the same fields). `llm` is a vLLM model or any OpenAI-compatible endpoint
  (`stages/chat.py`); with `llm_sees_image` a VLM gets the kept image too. The reply's first
  non-empty line, without quotes or an "Instruction:" label, is the instruction; an empty reply fails
  the row (recorded with the reply, retried by a rerun).
"""

from __future__ import annotations

import functools
import itertools
import re
import string
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray.stages.chat import ChatModelConfig, ChatReply, ChatRequest, add_chat_stage, user_message
from synthalign_ray.engines.vllm_engine import block_task
from synthalign_ray.stages.common import RowStage
from synthalign_ray.base import StrictModel
from synthalign_ray.ids import IdSet, SeenIds, digests
from synthalign_ray.stages.prompts import CHUNK_ROWS, BadRow, InputFileError, check_input_file, duplicate_rows, file_format, read_records

TEMPLATE_FIELDS = {"t2i_prompt", "category", "id"}
DROP_NO_INSTRUCTION = "no_instruction"


DEFAULT_LLM_PROMPT = (
    'This text-to-image prompt was used to generate an image: "{t2i_prompt}". Write one instruction or question '
    "a user could ask an AI assistant about that image, answerable by looking at it. Reply with the instruction only."
)
INSTRUCTION_FIELDS = [pa.field("instruction", pa.string()), pa.field("instruction_source", pa.string())]


class InstructionsConfig(StrictModel):
    source: Literal["template", "file", "llm"] = "template"
    template: str = Field("Describe this image in detail.", description="with source=template: format string over the row")
    llm: ChatModelConfig | None = Field(None, description="with source=llm: the model that writes the instructions")
    llm_prompt: str = Field(DEFAULT_LLM_PROMPT, description="with source=llm: format string over the row")
    llm_sees_image: bool = Field(False, description="with source=llm: send the kept image too (the model must be a VLM)")
    path: str | None = Field(None, description="with source=file: JSONL/CSV/Parquet of id + instruction")
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"
    id_field: str = "id"
    instruction_field: str = "instruction"
    on_missing: Literal["drop", "fail"] = Field("drop", description="a prompt id the file has no instruction for")

    @model_validator(mode="after")
    def _source_settings(self):
        if self.source == "file":
            if not self.path:
                raise ValueError("source=file needs instructions.path")
            check_input_file(self.path)
        elif self.source == "llm":
            if self.llm is None:
                raise ValueError("source=llm needs instructions.llm (a vLLM model or an OpenAI-compatible endpoint)")
            check_template_fields(self.llm_prompt, "llm_prompt")
        else:
            check_template_fields(self.template, "template")
        return self


def check_template_fields(template: str, name: str) -> None:
    unknown = template_fields(template) - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"{name} uses unknown field(s) {sorted(unknown)}; known: {sorted(TEMPLATE_FIELDS)}")


def template_fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"template is not a valid format string: {e}") from None


def instruction_fields(cfg: InstructionsConfig, rec: dict) -> tuple[str, str] | str:
    """A record's (id, instruction), or why it has none."""
    raw_id, instruction = rec.get(cfg.id_field), rec.get(cfg.instruction_field)
    if raw_id is None or str(raw_id).strip() == "":
        return f"missing {cfg.id_field!r}"
    if not isinstance(instruction, str) or not instruction.strip():
        return f"empty or missing {cfg.instruction_field!r}"
    return str(raw_id).strip(), instruction.strip()


def instruction_lines(cfg: InstructionsConfig) -> Iterator[tuple[int, tuple[str, str] | str]]:
    """(line, (id, instruction) or why the line has none) for each data line of the file."""
    for line, rec, error in read_records(cfg.path, file_format(cfg.path, cfg.format), cfg.instruction_field):
        yield line, error if error is not None else instruction_fields(cfg, rec)


def refuse_bad_lines(cfg: InstructionsConfig, bad: list[BadRow], duplicates: dict[int, str]) -> None:
    """Raises InputFileError listing the bad lines, if any (duplicates: line -> its id seen before)."""
    if duplicates:
        ids = ((line, f[0]) for line, f in instruction_lines(cfg) if isinstance(f, tuple))
        bad = sorted(bad + duplicate_rows(ids, duplicates), key=lambda b: b.line)
    if bad:
        raise InputFileError(cfg.path, bad, "instructions are joined by id: each id once, non-empty")


def read_instruction_file(cfg: InstructionsConfig) -> dict[str, str]:
    """id -> instruction from the file; raises InputFileError listing every bad line."""
    mapping: dict[str, str] = {}
    bad: list[BadRow] = []
    duplicates: dict[int, str] = {}
    for line, fields in instruction_lines(cfg):
        if isinstance(fields, str):
            bad.append(BadRow(line, fields))
        elif fields[0] in mapping:
            duplicates[line] = fields[0]
        else:
            mapping[fields[0]] = fields[1]
    refuse_bad_lines(cfg, bad, duplicates)
    return mapping


def instruction_ids(cfg: InstructionsConfig) -> IdSet:
    """The ids of the instruction file, checked as `read_instruction_file` does in one streaming pass that
    holds only their digests (the driver's check of a file of millions of lines)."""
    bad: list[BadRow] = []
    duplicates: dict[int, str] = {}
    seen = SeenIds()
    lines = instruction_lines(cfg)
    while chunk := list(itertools.islice(lines, CHUNK_ROWS)):
        bad += [BadRow(line, fields) for line, fields in chunk if isinstance(fields, str)]
        ids = [(line, fields[0]) for line, fields in chunk if isinstance(fields, tuple)]
        values = digests(row_id for _, row_id in ids)
        duplicates |= {line: row_id for (line, row_id), repeat in zip(ids, seen.seen(values)) if repeat}
        seen.add(values)
    refuse_bad_lines(cfg, bad, duplicates)
    return IdSet(seen.digests)


def missing_instructions(cfg: InstructionsConfig, ids: Iterable[str]) -> list[str]:
    """Prompt ids the instruction file does not cover (empty for template instructions)."""
    if cfg.source != "file":
        return []
    known = instruction_ids(cfg)
    missing: list[str] = []
    ids = iter(ids)
    while chunk := list(itertools.islice(ids, CHUNK_ROWS)):
        missing += [row_id for row_id, found in zip(chunk, known.contains(digests(chunk))) if not found]
    return missing


def worker_instructions(cfg: InstructionsConfig) -> dict[str, str]:
    """The instruction file's mapping, read once per worker process (its tasks are fresh copies of the
    stage, so the stage cannot hold it). Not built in the driver: the mapping of a million-line file
    takes ~280 MB there and ~80 MB pickled into the stage. The driver checked the file
    (`missing_instructions`)."""
    return _read_once(cfg.path, cfg.format, cfg.id_field, cfg.instruction_field)


@functools.lru_cache(maxsize=1)
def _read_once(path: str, fmt: str, id_field: str, instruction_field: str) -> dict[str, str]:
    cfg = InstructionsConfig(source="file", path=path, format=fmt, id_field=id_field, instruction_field=instruction_field)
    return read_instruction_file(cfg)


class InstructionWriter(RowStage):
    """Adds `instruction` and `instruction_source` (pure: a file join or a template, no model)."""

    name = "instructions"
    output_fields = INSTRUCTION_FIELDS

    def __init__(self, cfg: InstructionsConfig):
        super().__init__(max_batch_retries=0)
        self.cfg = cfg

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.cfg.source != "file":
            return [{"instruction": fill_template(self.cfg.template, row), "instruction_source": "template"} for row in rows]
        mapping = worker_instructions(self.cfg)
        out = []
        for row in rows:
            instruction = mapping.get(row["id"])
            if instruction is None:
                out.append(self.drop(DROP_NO_INSTRUCTION, {"instruction": None, "instruction_source": None}))
            else:
                out.append({"instruction": instruction, "instruction_source": f"file:{self.cfg.path}"})
        return out


def fill_template(template: str, row: dict[str, Any]) -> str:
    return template.format(**{k: row[k] for k in TEMPLATE_FIELDS})


def clean_instruction(reply: str) -> str:
    """The instruction in an LLM's reply: its first non-empty line, without an "Instruction:" label or
    surrounding quotes. Raises ValueError on an empty reply."""
    for line in reply.splitlines():
        line = re.sub(r"^\s*(instruction|question)\s*:\s*", "", line.strip(), flags=re.IGNORECASE).strip()
        line = line.strip("\"'“”").strip()
        if line:
            return line
    raise ValueError(f"the LLM returned no instruction (reply: {reply[:200]!r})")


def add_instructions(ds, cfg: InstructionsConfig, *, run_seed: int):
    """`ds` with `instruction` and `instruction_source` on every ok row, from the configured source."""
    if cfg.source != "llm":
        return ds.map_batches(**block_task(InstructionWriter(cfg)))
    source = f"llm:{cfg.llm.model}"

    def request(row: dict[str, Any]) -> ChatRequest:
        text = fill_template(cfg.llm_prompt, row)
        image = row["image"] if cfg.llm_sees_image else None
        return ChatRequest([user_message(text, with_image=cfg.llm_sees_image)], image=image, seed=row.get("seed"))

    def output(row: dict[str, Any], reply: ChatReply) -> dict[str, Any]:
        return {"instruction": clean_instruction(reply.text), "instruction_source": source}

    return add_chat_stage(
        ds,
        cfg.llm,
        stage="instructions",
        request=request,
        output=output,
        output_fields=INSTRUCTION_FIELDS,
        run_seed=run_seed,
        images=cfg.llm_sees_image,
    )
