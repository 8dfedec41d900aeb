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
    assert source.waves(None) == [source]
    assert [next(iter(t())).equals(g) for t, g in zip(tasks, groups)] == [True] * len(groups)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_waves_split_the_row_groups_in_order(tmp_path):
    uri = str(tmp_path / "prompts.parquet")
    store.write_row_groups(uri, [numbers(0, 10)], pa.schema([("n", pa.int64())]), rows_per_group=2)
    source = store.RowGroupDatasource(uri)
    assert store.RowGroupDatasource(uri).waves(None)[0].groups == range(5)
    waves = source.waves(2)
    assert [list(w.groups) for w in waves] == [[0, 1], [2, 3], [4]]
    rows = [n for wave in waves for task in wave.get_read_tasks(1) for block in task() for n in block["n"].to_pylist()]
    assert rows == list(range(10))
    assert [w.estimate_inmemory_data_size() > 0 for w in waves] == [True] * 3
