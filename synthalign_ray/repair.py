"""`synthalign repair OUTPUT`: make a run folder whose shards hold an id more than once consistent again.

Exactly-once is what `generate` guarantees, and its accounting refuses to go on when it finds an id written
twice (an `AccountingError` on every later run of that output). That cannot happen under the output's lease,
but a folder written before leases existed, or by two runs whose holder was broken with --force-unlock, can
hold such rows. Repair keeps one row per id and drops the others:

- the row kept is the furthest one: a pair over a drop over a failure (a failure is retried by the next run
  anyway), then the first in shard path order, so repairing twice changes nothing;
- a shard that loses rows is written again under the name of the rows it keeps (`store.shard_name`) and only
  then is the old one deleted, so a repair killed halfway leaves duplicates (repair again), never a lost row;
- the manifest's counts are rebuilt from the shards, and the ids dropped are recorded in it.

It holds the output's lease while it works, as a run does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from synthalign_ray import store
from synthalign_ray.errors import UserError
from synthalign_ray.store.lease import output_lease
from synthalign_ray.base import STATUS_DROPPED, STATUS_FAILED, STATUS_OK

# Which copy of an id is kept: the one that got furthest.
KEEP_ORDER = (STATUS_OK, STATUS_DROPPED, STATUS_FAILED)
RECORDED_IDS = 100  # duplicate ids named in the manifest


class RepairError(UserError, ValueError):
    """The folder is not a run folder repair can rebuild."""


@dataclass(frozen=True)
class RepairResult:
    shards: int  # shards scanned
    duplicate_ids: list[str]  # ids that were written more than once
    rows_dropped: int
    shards_rewritten: int
    counts: dict[str, Any]  # the manifest's counts after the repair


def repair(output: str, *, force_unlock: bool = False) -> RepairResult:
    manifest_uri = store.join(output, store.MANIFEST)
    try:
        manifest = store.read_json(manifest_uri)
    except FileNotFoundError:
        raise RepairError(f"{output}: no {store.MANIFEST}, so not a run folder of `synthalign generate`") from None
    stale_seconds = manifest.get("config", {}).get("resources", {}).get("lock_stale_seconds", 300)
    with output_lease(output, stale_seconds=stale_seconds, force=force_unlock):
        folders = [store.join(output, store.FOLDERS[status]) for status in KEEP_ORDER]
        shards = [(folder, shard) for folder in folders for shard in store.list_shards(folder)]
        duplicates = store.output_counts(output).duplicates
        rows_dropped, rewritten = drop_duplicate_rows(output, shards, set(duplicates))
        outcomes = store.output_counts(output)
        status = outcomes.counts["status"]
        counts = {
            **manifest.get("counts", {}),
            "pairs": status.get(STATUS_OK, 0),
            "dropped": status.get(STATUS_DROPPED, 0),
            "failed": status.get(STATUS_FAILED, 0),
            "dropped_by_reason": outcomes.counts["drop_reason"],
            "failed_by_stage": outcomes.counts["failed_stage"],
        }
        manifest.update(counts=counts)
        if duplicates:
            manifest["repaired"] = {
                "duplicate_ids": len(duplicates),
                "rows_dropped": rows_dropped,
                "ids": duplicates[:RECORDED_IDS],
            }
        store.write_json(manifest_uri, manifest)
    return RepairResult(len(shards), duplicates, rows_dropped, rewritten, counts)


def drop_duplicate_rows(output: str, shards: list[tuple[str, str]], duplicates: set[str]) -> tuple[int, int]:
    """Keep the first row of each duplicate id over `shards` ((folder URI, shard path), in keep order);
    returns (rows dropped, shards rewritten)."""
    if not duplicates:
        return 0, 0
    fs, _ = store.filesystem(output)
    kept: set[str] = set()
    keep_masks: dict[tuple[str, str], list[bool]] = {}
    for folder, shard in shards:
        mask = []
        for row_id in pq.read_table(shard, columns=["id"], filesystem=fs).column("id").to_pylist():
            mask.append(row_id not in kept)
            if row_id in duplicates:
                kept.add(row_id)
        if not all(mask):
            keep_masks[folder, shard] = mask
    dropped = 0
    # Shards left with no row go first: each of their rows is kept in another shard. The kept part of a
    # shard may be named like one of them (its rows were written again as a block of their own), and must
    # not be deleted with it.
    for (folder, shard), mask in sorted(keep_masks.items(), key=lambda item: any(item[1])):
        table = pq.read_table(shard, filesystem=fs)
        rest = table.filter(pa.array(mask))
        dropped += table.num_rows - rest.num_rows
        if rest.num_rows:  # written before the old shard goes: a repair killed here loses no row
            store.write_table(store.join(folder, store.shard_name(rest)), rest)
        fs.delete_file(shard)
    return dropped, len(keep_masks)
