"""`synthalign repair`: one row per id is kept (a pair over a drop over a failure, then shard order), shards
that lose rows are rewritten whole, and the manifest's counts are rebuilt from the shards."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

from synthalign_ray import store
from synthalign_ray.repair import repair


def rows(ids, status, **extra):
    n = len(ids)
    return pa.table({
        "id": ids,
        "status": [status] * n,
        "drop_reason": [extra.get("drop_reason")] * n,
        "failed_stage": [extra.get("failed_stage")] * n,
        "payload": [f"{status}:{i}" for i in ids],
    })


def write_shard(out, table):
    store.write_table(str(out / store.FOLDERS[table.column("status")[0].as_py()] / store.shard_name(table)), table)


def read_all(out):
    return sorted(
        (row["id"], row["payload"]) for folder in store.FOLDERS.values()
        for shard in sorted((out / folder).glob("*.parquet")) for row in pq.read_table(shard).to_pylist()
    )


def test_one_row_per_id_is_kept_furthest_first_and_the_counts_are_rebuilt(tmp_path):
    out = tmp_path / "run"
    # Two runs that cut their blocks differently (a+b+c+d against a+b, c+d), and a third that failed on e and d.
    write_shard(out, rows(["a", "b", "c", "d"], "ok"))
    write_shard(out, rows(["a", "b"], "ok"))
    write_shard(out, rows(["c", "d"], "ok"))
    write_shard(out, rows(["e"], "dropped", drop_reason="tie"))
    write_shard(out, rows(["e", "d"], "failed", failed_stage="responses"))
    write_shard(out, rows(["f"], "failed", failed_stage="images"))
    store.write_json(str(out / store.MANIFEST), {"config": {}, "counts": {"pairs": 8, "rows": 6}, "complete": True})

    result = repair(str(out))

    assert result.duplicate_ids == ["a", "b", "c", "d", "e"] and result.rows_dropped == 6
    assert read_all(out) == [("a", "ok:a"), ("b", "ok:b"), ("c", "ok:c"), ("d", "ok:d"), ("e", "dropped:e"), ("f", "failed:f")]
    assert store.output_counts(str(out)).duplicates == []
    manifest = json.loads((out / store.MANIFEST).read_text())
    assert manifest["counts"] == {
        "pairs": 4, "dropped": 1, "failed": 1, "rows": 6,
        "dropped_by_reason": {"tie": 1}, "failed_by_stage": {"images": 1},
    }
    assert manifest["repaired"] == {"duplicate_ids": 5, "rows_dropped": 6, "ids": ["a", "b", "c", "d", "e"]}
    again = repair(str(out))
    assert (again.duplicate_ids, again.rows_dropped, again.shards_rewritten) == ([], 0, 0)
    assert read_all(out) == [("a", "ok:a"), ("b", "ok:b"), ("c", "ok:c"), ("d", "ok:d"), ("e", "dropped:e"), ("f", "failed:f")]
