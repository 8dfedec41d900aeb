"""The stage store of a run folder: what each model-backed stage added to each row, kept across runs and
configs, so that no row's stage is computed twice while its inputs stay the same.

    stages/<stage>/<fingerprint>/part-<uuid>.parquet    `id`, `key`, the stage's columns; rows ok after it

One folder per stage and fingerprint. A stage's fingerprint covers its own settings and the
fingerprints of the stages it reads from (`checkpoints.fingerprints`), so the entries of a folder are
valid exactly while nothing upstream of that stage changed; a row's `key` (`ids.row_keys`) also covers
its prompt. A shard is moved into place whole (`write_table`) under a name of its own. A row computed
twice (a retried block, two runs racing) leaves two entries, and `EntryIndex` keeps the first.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from synthalign_ray.ids import DIGEST, locate
from synthalign_ray.store import filesystem, join, list_shards, write_table

STAGES_DIR = "stages"
KEY_FIELD = pa.field("key", pa.binary(16))


def stage_folder(output: str, stage: str, fingerprint: str) -> str:
    """Where the entries of `stage` computed under `fingerprint` live. The stage's name made safe in a URI
    (`responses[llava-1.5]` -> `responses.llava-1.5`: pyarrow parses no brackets in s3:// paths); the
    fingerprint, which covers the name, keeps two stages apart."""
    safe = re.sub(r"[^\w.\-]", "_", stage.replace("[", ".").replace("]", ""))
    return join(output, STAGES_DIR, safe, fingerprint)


def key_array(keys: np.ndarray) -> pa.Array:
    """Row keys (16-byte digests) as Arrow values, byte for byte (numpy's bytes items drop trailing zero bytes)."""
    return pa.FixedSizeBinaryArray.from_buffers(KEY_FIELD.type, len(keys), [None, pa.py_buffer(np.ascontiguousarray(keys).tobytes())])


def key_bytes(keys: np.ndarray) -> list[bytes]:
    """Row keys as Python bytes of 16 each, as Arrow gives them back (`key_array(keys).to_pylist()`)."""
    raw = np.ascontiguousarray(keys).tobytes()
    return [raw[i : i + 16] for i in range(0, len(raw), 16)]


def write_entries(folder: str, entries: pa.Table) -> None:
    write_table(join(folder, f"part-{uuid.uuid4().hex}.parquet"), entries)


def read_entries(folder: str, shard: str, columns: list[str]) -> pa.Table:
    fs, path = filesystem(join(folder, shard))
    return pq.read_table(path, columns=columns, filesystem=fs)


@dataclass
class EntryIndex:
    """The entries of one stage folder: each key's shard (by number), and the shards' names and schema."""

    keys: np.ndarray  # sorted, each once
    shard: np.ndarray  # per key: its first entry's shard, an index into `shards`
    shards: list[str]  # file names in the folder
    schema: pa.Schema | None  # of the entries (None: no entries)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """For each key, the number of the shard holding its entry, -1 where there is none."""
        at, found = locate(self.keys, keys)
        return np.where(found, self.shard[at] if len(self.keys) else -1, -1).astype(np.int32)


def entry_index(folder: str) -> EntryIndex:
    """Reads the `key` column of every shard in a stage folder (16 bytes and an int per entry)."""
    fs, _ = filesystem(folder)
    paths = list_shards(folder)
    keys = [_digests(pq.read_table(path, columns=["key"], filesystem=fs).column("key")) for path in paths]
    if not keys:
        return EntryIndex(np.empty(0, DIGEST), np.empty(0, np.int32), [], None)
    every = np.concatenate(keys)
    shard = np.repeat(np.arange(len(paths), dtype=np.int32), [len(k) for k in keys])
    order = np.argsort(every, kind="stable")  # the first shard's entry of a key comes first
    every, shard = every[order], shard[order]
    first = np.concatenate([[True], every[1:] != every[:-1]]) if len(every) else np.empty(0, bool)
    schema = pq.read_schema(paths[0], filesystem=fs)
    return EntryIndex(every[first], shard[first], [path.rsplit("/", 1)[-1] for path in paths], schema)


def _digests(column: pa.ChunkedArray) -> np.ndarray:
    """A `key` column as digests, straight from its bytes."""
    column = column.combine_chunks()
    return np.frombuffer(column.buffers()[1], DIGEST, count=len(column), offset=column.offset * 16).copy()
