"""Whole rows through a `ray.data.llm` processor, with their Arrow types intact.

A ray.data.llm processor carries every input column through its stages, so an LLM stage can run over
the pipeline's full rows (no join afterwards). But rows travel as Python dicts in there, which loses
Arrow types: float32 lists come back as float64, an all-null string column as type null, an image
struct with a null path as a struct of null, and so on. So:

    ds = record_input_schema(ds)     # each row carries its input schema (Arrow IPC bytes)
    ds = processor(ds)               # postprocess returns {**input_columns(row), <new columns>}
    ds = restore_input_types(ds, output_fields)   # input columns as recorded, then the new ones

Rows whose status is not ok never reach the engine: preprocess returns `{"__inference_error__":
SKIPPED}`, which every ray.data.llm stage passes through untouched, postprocess included; a map after
the processor restores them (see `stages/responses.py`, `stages/chat.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from synthalign_ray.engines.vllm_engine import SAMPLES, SAMPLING_PARAMS_LIST, block_task

# The marker of a row that is not ok: Ray's stages pass rows with a non-empty `__inference_error__`.
SKIPPED = "skipped: row status is not ok"
INFERENCE_ERROR = "__inference_error__"
SCHEMA_COLUMN = "__input_schema"
# Columns a processor writes into the row: an input column of the same name would be overwritten.
RESERVED = {
    SCHEMA_COLUMN,
    "__data",
    INFERENCE_ERROR,
    "messages",
    "multimodal_data",
    "sampling_params",
    "tokenization_kwargs",
    SAMPLING_PARAMS_LIST,
    SAMPLES,
    "prompt",
    "tokenized_prompt",
    "prompt_token_ids",
    "num_input_tokens",
    "generated_text",
    "generated_tokens",
    "num_generated_tokens",
    "__idx_in_batch",
}


def record_input_schema(ds, output_fields: Sequence[pa.Field]):
    """`ds` with each row's schema recorded; refuses input columns the processor or the stage would overwrite."""

    def record(batch: pa.Table) -> pa.Table:
        clash = clashing_columns(batch.column_names, output_fields)
        if clash:
            raise ValueError(f"input column(s) {clash} clash with columns the stage writes; rename them")
        serialized = batch.schema.serialize().to_pybytes()
        return batch.append_column(SCHEMA_COLUMN, pa.array([serialized] * batch.num_rows, pa.binary()))

    return ds.map_batches(**block_task(record))


def clashing_columns(names: Sequence[str], output_fields: Sequence[pa.Field]) -> list[str]:
    """Input column names that the processor or the stage's own output would overwrite."""
    return sorted((RESERVED | {field.name for field in output_fields}) & set(names))


def input_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The row's input columns (and the recorded schema), without anything the processor added."""
    names = _schema(row[SCHEMA_COLUMN]).names
    return {**{name: row[name] for name in names}, SCHEMA_COLUMN: row[SCHEMA_COLUMN]}


def restore_input_types(ds, output_fields: Sequence[pa.Field], defaults: Mapping[str, Any] | None = None):
    """`ds` with its input columns back in their recorded order and types, then `output_fields`
    (a null value becomes `defaults[name]` where given)."""

    def restore(batch: pa.Table) -> pa.Table:
        return restore_batch(batch, output_fields, defaults or {})

    return ds.map_batches(**block_task(restore))


def restore_batch(batch: pa.Table, output_fields: Sequence[pa.Field], defaults: Mapping[str, Any]) -> pa.Table:
    if batch.num_rows == 0:
        return batch.drop_columns([name for name in (SCHEMA_COLUMN, INFERENCE_ERROR) if name in batch.column_names])
    schemas = [_schema(s) for s in pc.unique(batch.column(SCHEMA_COLUMN)).to_pylist()]
    schema = schemas[0] if len(schemas) == 1 else pa.unify_schemas(schemas, promote_options="permissive")
    columns = [_cast(batch.column(field.name), field.type) for field in schema]
    for field in output_fields:
        default = defaults.get(field.name)
        values = batch.column(field.name).to_pylist()
        columns.append(pa.array([default if value is None else value for value in values], field.type))
    return pa.Table.from_arrays(columns, schema=pa.schema([*schema, *output_fields]))


@functools.lru_cache(maxsize=64)
def _schema(serialized: bytes) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(serialized))


def _cast(column: pa.ChunkedArray, type_: pa.DataType) -> pa.ChunkedArray:
    if column.type == type_:
        return column
    try:
        return column.cast(type_)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        # e.g. a list that came back as a Ray tensor column: rebuild from Python values.
        return pa.chunked_array([pa.array(column.to_pylist(), type_)], type_)
