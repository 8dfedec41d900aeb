"""The pipeline's input file: streamed into row groups of exactly `rows_per_block` rows."""

import pyarrow as pa
import pytest

from synthalign_ray import store


def numbers(start, stop):
    return pa.table({"n": pa.array(range(start, stop), pa.int64())})


@pytest.mark.parametrize("sizes", [[10], [3, 0, 4, 3], [1] * 10, [25], []])
def test_row_groups_are_exact_blocks_in_order(tmp_path, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    tables = [numbers(start, start + size) for start, size in zip(starts, sizes)]
    uri = str(tmp_path / "prompts.parquet")
    written = store.write_row_groups(uri, tables, pa.schema([("n", pa.int64())]), rows_per_group=4)
    groups = list(store.row_groups(uri))
    assert written == sum(sizes)
    assert [g.num_rows for g in groups] == [4] * (written // 4) + ([written % 4] if written % 4 else [])
    assert [n for g in groups for n in g["n"].to_pylist()] == list(range(written))
    source = store.RowGroupDatasource(uri)
    tasks = source.get_read_tasks(parallelism=1)
    assert [t.metadata.num_rows for t in tasks] == [g.num_rows for g in groups]
    assert [next(iter(t())).equals(g) for t, g in zip(tasks, groups)] == [True] * len(groups)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
