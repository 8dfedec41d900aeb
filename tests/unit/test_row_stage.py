"""Row-level failure isolation of RowStage: a failing row is retried, then recorded; its neighbours go on."""

import pyarrow as pa

from synthalign_ray.stages.common import RowStage
from synthalign_ray.stages.prompts import prompts_table


class Doubler(RowStage):
    name = "doubler"
    output_fields = [pa.field("doubled", pa.int64())]

    def __init__(self, bad_ids=(), flaky_calls=0, max_batch_retries=1):
        super().__init__(max_batch_retries)
        self.bad_ids = set(bad_ids)
        self.flaky_calls = flaky_calls
        self.calls = 0

    def process(self, rows):
        self.calls += 1
        if self.calls <= self.flaky_calls:
            raise ConnectionError("transient")
        for row in rows:
            if row["id"] in self.bad_ids:
                raise ValueError(f"cannot process {row['id']}")
        return [{"doubled": 2 * row["seed"]} for row in rows]


def table(n=4):
    return prompts_table([{"id": f"r{i}", "category": "c", "t2i_prompt": "p", "seed": i, "source_line": i} for i in range(n)])


def test_all_rows_ok():
    out = Doubler()(table())
    assert out.column("doubled").to_pylist() == [0, 2, 4, 6]
    assert set(out.column("status").to_pylist()) == {"ok"}


def test_transient_batch_error_is_retried():
    stage = Doubler(flaky_calls=1)
    out = stage(table())
    assert out.column("doubled").to_pylist() == [0, 2, 4, 6] and stage.calls == 2


def test_bad_row_is_recorded_and_neighbours_survive():
    out = Doubler(bad_ids={"r2"})(table()).to_pylist()
    assert [r["doubled"] for r in out] == [0, 2, None, 6]
    assert [r["status"] for r in out] == ["ok", "ok", "failed", "ok"]
    assert out[2]["error"] == "ValueError: cannot process r2" and out[2]["failed_stage"] == "doubler"


def test_failed_rows_are_skipped_by_later_stages():
    first = Doubler(bad_ids={"r1"})(table())

    class Later(Doubler):
        name = "later"
        output_fields = [pa.field("later", pa.int64())]

        def process(self, rows):
            assert all(row["status"] == "ok" for row in rows)
            return [{"later": 1} for _ in rows]

    out = Later()(first).to_pylist()
    assert [r["later"] for r in out] == [1, None, 1, 1]
    assert out[1]["failed_stage"] == "doubler"


def test_wrong_result_count_fails_the_rows():
    class Short(Doubler):
        def process(self, rows):
            return []

    out = Short(max_batch_retries=0)(table(2)).to_pylist()
    assert [r["status"] for r in out] == ["failed", "failed"]
    assert out[0]["error"] == "RuntimeError: doubler returned 0 results for 1 rows"


def test_dropped_rows_get_status_and_reason_and_are_skipped_later():
    class DropOdd(Doubler):
        name = "drop_odd"

        def process(self, rows):
            return [self.drop("odd", {"doubled": None}) if row["seed"] % 2 else {"doubled": 2 * row["seed"]} for row in rows]

    out = DropOdd()(table())
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "dropped", "ok", "dropped"]
    assert [r["drop_reason"] for r in rows] == [None, "odd", None, "odd"]
    assert [r["doubled"] for r in rows] == [0, None, 4, None]
    seen = []

    class Later(Doubler):
        name = "later"
        output_fields = [pa.field("later", pa.int64())]

        def process(self, rows):
            seen.extend(row["id"] for row in rows)
            return [{"later": 1} for _ in rows]

    Later()(out)
    assert seen == ["r0", "r2"]


def test_injected_faults_fail_only_the_named_rows(monkeypatch):
    monkeypatch.setenv("SYNTHALIGN_INJECT_FAULTS", "doubler:r1,other:r2")
    out = Doubler()(table()).to_pylist()
    assert [r["status"] for r in out] == ["ok", "failed", "ok", "ok"]
    assert out[1]["error"] == "InjectedFault: injected fault in doubler for ['r1']"


def test_a_row_the_stage_fails_itself_is_recorded_without_a_batch_retry():
    class RefuseSeedTwo(Doubler):
        name = "refuse"

        def process(self, rows):
            self.calls += 1
            return [self.fail("endpoint said 400", {"doubled": None}) if row["seed"] == 2 else {"doubled": 1} for row in rows]

    stage = RefuseSeedTwo()
    rows = stage(table()).to_pylist()
    assert stage.calls == 1
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "ok"]
    assert (rows[2]["error"], rows[2]["failed_stage"], rows[2]["doubled"]) == ("endpoint said 400", "refuse", None)


def test_injected_delay_holds_back_only_batches_with_the_named_rows(monkeypatch):
    from synthalign_ray.stages.common import injected_delay

    monkeypatch.setenv("SYNTHALIGN_INJECT_DELAYS", "doubler:r1=0.5,doubler:r2=0.2,other:r0=9")
    assert injected_delay("doubler", {"r0", "r1", "r2"}) == 0.5
    assert injected_delay("doubler", {"r0"}) == 0.0
    assert injected_delay("other", {"r0"}) == 9.0
