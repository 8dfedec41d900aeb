"""Instructions: the question the LVLMs answer about each row's kept image (paper section 3.2).

The paper has GPT-4o turn the text-to-image prompt into an instruction prompt; the official code reads
them from a supplied file. Two sources here:

- `file`: a JSONL, CSV or Parquet file of (`id`, `instruction`) joined to the rows by prompt id, never
  by line order. Bad lines (no id, empty instruction, duplicate id, malformed) are reported with their
  line numbers before anything starts. A row whose id has no instruction is dropped with reason
  `no_instruction` (or the run refuses to start, `on_missing: fail`).
- `template`: a Python format string over the row (`{t2i_prompt}`, `{category}`, `{id}`), e.g.
  "Describe this image in detail." or "Is this a faithful picture of: {t2i_prompt}?".
"""

from __future__ import annotations

import string
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray.stages.common import STATUS_DROPPED, RowStage, StrictModel
from synthalign_ray.stages.prompts import BadRow, InputFileError, check_input_file, file_format, read_records

TEMPLATE_FIELDS = {"t2i_prompt", "category", "id"}
DROP_NO_INSTRUCTION = "no_instruction"


class InstructionsConfig(StrictModel):
    source: Literal["template", "file"] = "template"
    template: str = Field("Describe this image in detail.", description="with source=template: format string over the row")
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
        else:
            unknown = template_fields(self.template) - TEMPLATE_FIELDS
            if unknown:
                raise ValueError(f"template uses unknown field(s) {sorted(unknown)}; known: {sorted(TEMPLATE_FIELDS)}")
        return self


def template_fields(template: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise ValueError(f"template is not a valid format string: {e}") from None


def read_instruction_file(cfg: InstructionsConfig) -> dict[str, str]:
    """id -> instruction from the file; raises InputFileError listing every bad line."""
    mapping: dict[str, str] = {}
    first_line_of: dict[str, int] = {}
    bad: list[BadRow] = []
    for line, rec, error in read_records(cfg.path, file_format(cfg.path, cfg.format), cfg.instruction_field):
        if error:
            bad.append(BadRow(line, error))
            continue
        raw_id, instruction = rec.get(cfg.id_field), rec.get(cfg.instruction_field)
        if raw_id is None or str(raw_id).strip() == "":
            bad.append(BadRow(line, f"missing {cfg.id_field!r}"))
        elif not isinstance(instruction, str) or not instruction.strip():
            bad.append(BadRow(line, f"empty or missing {cfg.instruction_field!r}"))
        elif str(raw_id).strip() in first_line_of:
            key = str(raw_id).strip()
            bad.append(BadRow(line, f"duplicate id {key!r} (first seen on line {first_line_of[key]})"))
        else:
            key = str(raw_id).strip()
            first_line_of[key] = line
            mapping[key] = instruction.strip()
    if bad:
        raise InputFileError(cfg.path, bad, "instructions are joined by id: each id once, non-empty")
    return mapping


def missing_instructions(cfg: InstructionsConfig, ids: list[str]) -> list[str]:
    """Prompt ids the instruction file does not cover (empty for template instructions)."""
    if cfg.source != "file":
        return []
    mapping = read_instruction_file(cfg)
    return [i for i in ids if i not in mapping]


class InstructionWriter(RowStage):
    """Adds `instruction` and `instruction_source` (pure: a file join or a template, no model)."""

    name = "instructions"
    output_fields = [pa.field("instruction", pa.string()), pa.field("instruction_source", pa.string())]

    def __init__(self, cfg: InstructionsConfig):
        super().__init__(max_batch_retries=0)
        self.cfg = cfg
        self.mapping = read_instruction_file(cfg) if cfg.source == "file" else None

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.mapping is None:
            return [
                {"instruction": self.cfg.template.format(**{k: row[k] for k in TEMPLATE_FIELDS}), "instruction_source": "template"}
                for row in rows
            ]
        out = []
        for row in rows:
            instruction = self.mapping.get(row["id"])
            if instruction is None:
                out.append(self.drop(DROP_NO_INSTRUCTION, {"instruction": None, "instruction_source": None}))
            else:
                out.append({"instruction": instruction, "instruction_source": f"file:{self.cfg.path}"})
        return out
