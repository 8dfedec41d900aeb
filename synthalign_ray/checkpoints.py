"""Stage checkpoints: every model-backed stage commits what it adds to each row to the stage store
(`store/stage_store.py`), and a run takes from there what it would otherwise compute again.

    fingerprints   a stage's fingerprint: its settings and the fingerprints of the stages it reads from,
                   so an entry stays valid exactly while nothing upstream of it changed
    plan_todo      which committed stages each row to do can take from the store; the rows in groups
                   that restore the same stages, one prompt file each (`todo/<n>.arrow`)
    apply_stages   a group's graph: each committed stage either restored (a Ray task reading its
                   entries) or run and then committed; model-free stages always run

A killed run, a failed row or a changed config therefore costs only the stages whose entries are
missing or stale: a reward-model change reruns `response_scores` and what follows, never the images.
Restoring is per stage, not per prefix: an answerer added anywhere in `responses.models` runs alone,
since an answerer reads only the instruction and the image. `response_scores` reads every answer, so it
runs again when the answerers change.

Model-backed stages never drop rows; a row they fail is not committed, and runs again next time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic_core import to_jsonable_python

from synthalign_ray import store
from synthalign_ray.base import STATUS_OK, with_failures
from synthalign_ray.engines.vllm_engine import block_task, labelled
from synthalign_ray.ids import row_keys
from synthalign_ray.stages.graph import Stage
from synthalign_ray.store.stage_store import entry_index, key_array, key_bytes, read_entries, stage_folder, write_entries

log = logging.getLogger(__name__)

# A column of a todo prompt file: for each row, the shard of the stage store holding its entry of STAGE.
SHARD_COLUMN = "checkpoint:{stage}"
TODO_DIR = "todo"
RESTORE_UDF = "RestoreEntries"


def without_pools(data: Any) -> Any:
    """A config (as JSON data) without any `pool` section, however deep: replicas and devices never change rows."""
    if isinstance(data, dict):
        return {key: without_pools(value) for key, value in data.items() if key != "pool"}
    if isinstance(data, list):
        return [without_pools(item) for item in data]
    return data


def fingerprints(stages: list[Stage], run_seed: int) -> dict[str, str]:
    """Each stage's fingerprint: its settings (pools aside; a file it reads by its content,
    `graph.FileContent`), the run seed, and the fingerprints of the stages that wrote the columns it
    reads, in pipeline order."""
    found: dict[str, str] = {}
    writers: dict[str, list[str]] = {}
    for stage in stages:
        upstream = list(dict.fromkeys(name for column in stage.reads for name in writers.get(column, [])))
        upstream.sort(key=list(found).index)
        payload = {
            "stage": stage.name,
            "settings": without_pools(to_jsonable_python(stage.settings, fallback=lambda file: file.digest())),
            "seed": run_seed,
            "upstream": [found[name] for name in upstream],
        }
        found[stage.name] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
        for column in stage.writes:
            writers.setdefault(column, []).append(stage.name)
    return found


def keys_of(table: pa.Table) -> np.ndarray:
    return row_keys(table["id"].to_pylist(), table["category"].to_pylist(), table["t2i_prompt"].to_pylist())


@dataclass(frozen=True)
class StageCommits:
    """What a group's graph needs of the stage store: where it is, the fingerprints, which stages it
    restores, and their entries' schemas."""

    output: str
    fingerprints: dict[str, str]
    restored: tuple[str, ...] = ()
    schemas: dict[str, pa.Schema] = field(default_factory=dict)

    def folder(self, stage: str) -> str:
        return stage_folder(self.output, stage, self.fingerprints[stage])


def apply_stages(ds, stages: list[Stage], commits: StageCommits | None, run: Callable[[Any, Stage], Any] | None = None):
    """`ds` through `stages`: each committed stage restored from the store (`commits.restored`) or run by
    `run` (default: the stage itself) and committed; `commits` None: every stage run, nothing committed."""
    run = run or (lambda ds, stage: stage.apply(ds))
    for stage in stages:
        if commits is None or not stage.committed:
            ds = run(ds, stage)
        elif stage.name in commits.restored:
            restore = labelled(RestoreEntries, stage.name)(stage.name, stage.writes, stage.answerer, commits.folder(stage.name), commits.schemas[stage.name])
            ds = ds.map_batches(**block_task(restore))
        else:
            ds = run(ds, stage).map_batches(**block_task(CommitEntries(stage.writes, stage.answerer, commits.folder(stage.name))))
    return ds


def restore_operator(stage: str) -> str:
    """The name of the Ray Data operator restoring `stage` (for the stage table)."""
    return f"{RESTORE_UDF}[{stage}]"


def entries(table: pa.Table, writes: tuple[str, ...], answerer: str | None) -> pa.Table:
    """A stage's entries for the rows of `table` that are ok after it: `id`, `key` and its columns (an
    answerer's: its own answers)."""
    ok = table.filter(pc.equal(table["status"], STATUS_OK))
    columns = {"id": ok["id"], "key": key_array(keys_of(ok))}
    for name in writes:
        column = ok[name]
        if answerer is not None:
            answers = [[a for a in row if a["model"] == answerer] for row in column.to_pylist()]
            column = pa.array(answers, column.type)
        columns[name] = column
    return pa.table(columns)


class CommitEntries:
    """A Ray task after a stage: writes its entries for the block's ok rows, passes the block on."""

    def __init__(self, writes: tuple[str, ...], answerer: str | None, folder: str):
        self.writes, self.answerer, self.folder = writes, answerer, folder

    def __call__(self, table: pa.Table) -> pa.Table:
        kept = entries(table, self.writes, self.answerer)
        if kept.num_rows:
            try:
                write_entries(self.folder, kept)
            except OSError as error:  # the rows go on to the output; a later run computes them again
                log.warning("stage store: could not commit %d rows to %s (%s)", kept.num_rows, self.folder, store.denial_in([error]) or error)
        return table


class RestoreEntries:
    """A Ray task in place of a stage: adds its columns to the block's ok rows from their entries (the
    shard named in the row's `checkpoint:<stage>` column, which it removes). A row whose entry is gone
    fails, naming the stage, and runs again next time."""

    def __init__(self, stage: str, writes: tuple[str, ...], answerer: str | None, folder: str, schema: pa.Schema):
        self.stage, self.writes, self.answerer, self.folder, self.schema = stage, writes, answerer, folder, schema

    def __call__(self, table: pa.Table) -> pa.Table:
        column = SHARD_COLUMN.format(stage=self.stage)
        shards = table[column].to_pylist()
        table = table.drop_columns([column])
        status = table["status"].to_pylist()
        keys = key_bytes(keys_of(table))
        found: dict[int, dict[str, Any]] = {}
        for shard in sorted({s for s, st in zip(shards, status) if s is not None and st == STATUS_OK}):
            stored = read_entries(self.folder, shard, ["key", *self.writes]).to_pylist()
            by_key = {row["key"]: row for row in stored}
            for i, (s, st) in enumerate(zip(shards, status)):
                if s == shard and st == STATUS_OK and keys[i] in by_key:
                    found[i] = by_key[keys[i]]
        missing = [i for i, st in enumerate(status) if st == STATUS_OK and i not in found]
        for name in self.writes:
            type_ = self.schema.field(name).type
            values = [found[i][name] if i in found else None for i in range(table.num_rows)]
            at = table.schema.get_field_index(name)
            if self.answerer is not None:  # answers go after those of the answerers before it
                before = table[name].to_pylist() if at >= 0 else [[] for _ in values]
                values = [(b or []) + (v or []) for b, v in zip(before, values)]
            array = pa.array(values, type_)
            table = table.set_column(at, name, array) if at >= 0 else table.append_column(pa.field(name, type_), array)
        error = f"CheckpointMissing: the {self.stage} entry of this row is gone from {self.folder}; a rerun computes it"
        return with_failures(table, dict.fromkeys(missing, error), dict.fromkeys(missing, self.stage))


# --- planning a run ---------------------------------------------------------------------------------


@dataclass
class Group:
    """Rows that restore the same stages: their prompt file and count."""

    restored: tuple[str, ...]
    uri: str
    rows: int


@dataclass
class Plan:
    output: str
    fingerprints: dict[str, str]
    groups: list[Group]
    # Per committed stage: its fingerprint, and the rows to do that run it ("computed") or take it from
    # the store ("reused").
    stages: dict[str, dict[str, Any]]
    schemas: dict[str, pa.Schema]

    def commits(self, group: Group) -> StageCommits:
        return StageCommits(self.output, self.fingerprints, group.restored, {name: self.schemas[name] for name in group.restored})


@dataclass
class StageShards:
    """A committed stage's shard names (what `shard_of` numbers) and its entries' schema (None: none)."""

    names: list[str]
    schema: pa.Schema | None


def locate_entries(output: str, stages: list[Stage], fingerprints: dict[str, str], keys: np.ndarray) -> tuple[np.ndarray, list[StageShards]]:
    """For each row key and committed stage, the number of the shard holding its entry (-1: none), and
    each stage's shards. The stages' indexes are read one at a time, and only their names are kept."""
    committed = [stage for stage in stages if stage.committed]
    shard_of = np.full((len(keys), len(committed)), -1, np.int32)
    shards = []
    for j, stage in enumerate(committed):
        index = entry_index(stage_folder(output, stage.name, fingerprints[stage.name]))
        if len(keys):
            shard_of[:, j] = index.lookup(keys)
        shards.append(StageShards(index.shards, index.schema))
        del index
    return shard_of, shards


def todo_keys(tables: Iterable[pa.Table]) -> np.ndarray:
    """The row keys of the rows of `tables`, in order."""
    return np.concatenate([keys_of(table) for table in tables] or [np.empty(0, "S16")])


def reuse_counts(output: str, stages: list[Stage], fingerprints: dict[str, str], todo: Iterable[pa.Table]) -> dict[str, dict[str, Any]]:
    """`plan_todo`'s per-stage counts for the rows of `todo`, with nothing written (`generate --dry-run`)."""
    shard_of, _ = locate_entries(output, stages, fingerprints, todo_keys(todo))
    return stage_counts(stages, fingerprints, shard_of)


def stage_counts(stages: list[Stage], fingerprints: dict[str, str], shard_of: np.ndarray) -> dict[str, dict[str, Any]]:
    committed = [stage for stage in stages if stage.committed]
    reused = (shard_of >= 0).sum(axis=0) if len(shard_of) else np.zeros(len(committed), int)
    return {
        stage.name: {"fingerprint": fingerprints[stage.name], "computed": int(len(shard_of) - n), "reused": int(n)}
        for stage, n in zip(committed, reused)
    }


def plan_todo(
    output: str,
    stages: list[Stage],
    fingerprints: dict[str, str],
    todo_tables: Callable[[], Iterable[pa.Table]],
    schema: pa.Schema,
    rows_per_block: int,
) -> Plan:
    """Plans the rows of `todo_tables()` (called again for each pass, same rows in the same order): which
    committed stages each restores, and one prompt file per group of rows that restore the same ones,
    written to `todo/` in blocks of `rows_per_block`. The driver holds 16 bytes and a shard number per
    stage per row, never rows."""
    committed = [stage for stage in stages if stage.committed]
    folder = store.join(output, TODO_DIR)
    store.remove_folder(folder)
    if not any(store.list_shards(stage_folder(output, stage.name, fingerprints[stage.name])) for stage in committed):
        # Nothing to restore (a fresh run, or every stage changed): one group, planned without keys.
        uri = store.join(folder, "0.arrow")
        rows = store.write_blocks(uri, todo_tables(), schema, rows_per_block)
        counts = {stage.name: {"fingerprint": fingerprints[stage.name], "computed": rows, "reused": 0} for stage in committed}
        return Plan(output, fingerprints, [Group((), uri, rows)] if rows else [], counts, {})
    shard_of, shards = locate_entries(output, stages, fingerprints, todo_keys(todo_tables()))
    counts = stage_counts(stages, fingerprints, shard_of)
    if not len(shard_of):
        return Plan(output, fingerprints, [], counts, {})
    # Each row's restored stages as the bits of one integer: np.unique over them, not over rows of bools.
    masks, group_of = np.unique((shard_of >= 0) @ (1 << np.arange(len(committed), dtype=np.int64)), return_inverse=True)
    groups = []
    for number, mask in enumerate(masks):
        restored = [(j, stage) for j, stage in enumerate(committed) if mask >> j & 1]
        fields = [pa.field(SHARD_COLUMN.format(stage=stage.name), pa.string()) for _, stage in restored]
        uri = store.join(folder, f"{number}.arrow")
        tables = _group_tables(todo_tables(), group_of == number, shard_of, shards, restored, fields)
        rows = store.write_blocks(uri, tables, pa.schema([*schema, *fields]), rows_per_block)
        groups.append(Group(tuple(stage.name for _, stage in restored), uri, rows))
    return Plan(output, fingerprints, groups, counts, {stage.name: stage_shards.schema for stage, stage_shards in zip(committed, shards) if stage_shards.schema is not None})


def _group_tables(tables: Iterable[pa.Table], in_group: np.ndarray, shard_of, shards, restored, fields) -> Iterator[pa.Table]:
    start = 0
    for table in tables:
        stop = start + table.num_rows
        rows = np.flatnonzero(in_group[start:stop])
        part = table.take(pa.array(rows))
        for (j, _), column in zip(restored, fields):
            names = shards[j].names
            part = part.append_column(column, pa.array([names[n] for n in shard_of[start + rows, j]], pa.string()))
        start = stop
        if part.num_rows:
            yield part
