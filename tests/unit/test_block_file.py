"""The pipeline's input file: streamed into blocks of exactly `rows_per_block` rows."""

import pyarrow as pa
import pytest

from synthalign_ray import store


def numbers(start, stop):
    return pa.table({"n": pa.array(range(start, stop), pa.int64())})


@pytest.mark.parametrize("sizes", [[10], [3, 0, 4, 3], [1] * 10, [25], []])
def test_blocks_are_exact_and_in_order(tmp_path, sizes):
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    tables = [numbers(start, start + size) for start, size in zip(starts, sizes)]
    uri = str(tmp_path / "prompts.arrow")
    written = store.write_blocks(uri, tables, pa.schema([("n", pa.int64())]), rows_per_block=4)
    blocks = list(store.read_blocks(uri))
    assert written == sum(sizes)
    assert [b.num_rows for b in blocks] == [4] * (written // 4) + ([written % 4] if written % 4 else [])
    assert [n for b in blocks for n in b["n"].to_pylist()] == list(range(written))
    source = store.BlockFileDatasource(uri)
    tasks = source.get_read_tasks(parallelism=1)
    assert [t.metadata.num_rows for t in tasks] == [b.num_rows for b in blocks]
    assert source.waves(None) == [source]
    assert [next(iter(t())).equals(b) for t, b in zip(tasks, blocks)] == [True] * len(blocks)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_waves_split_the_blocks_in_order(tmp_path):
    uri = str(tmp_path / "prompts.arrow")
    store.write_blocks(uri, [numbers(0, 10)], pa.schema([("n", pa.int64())]), rows_per_block=2)
    source = store.BlockFileDatasource(uri)
    assert source.waves(None)[0].blocks == range(5)
    waves = source.waves(2)
    assert [list(w.blocks) for w in waves] == [[0, 1], [2, 3], [4]]
    assert [[rows for rows, _ in w.sizes] for w in waves] == [[2, 2], [2, 2], [2]]
    rows = [n for wave in waves for task in wave.get_read_tasks(1) for block in task() for n in block["n"].to_pylist()]
    assert rows == list(range(10))
    assert [w.estimate_inmemory_data_size() > 0 for w in waves] == [True] * 3
    assert source.blocks == range(5)  # the parts are copies
