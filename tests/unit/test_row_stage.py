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
    from synthalign_ray.base import injected_delay

    monkeypatch.setenv("SYNTHALIGN_INJECT_DELAYS", "doubler:r1=0.5,doubler:r2=0.2,other:r0=9")
    assert injected_delay("doubler", {"r0", "r1", "r2"}) == 0.5
    assert injected_delay("doubler", {"r0"}) == 0.0
    assert injected_delay("other", {"r0"}) == 9.0


class Attempt:
    """Stands in for a BatchAttempt: the number of this run of the batch, and whether it was finished."""

    def __init__(self, number):
        self.number, self.finished = number, False

    def finish(self):
        self.finished = True


def test_a_batch_whose_replica_died_too_often_is_failed_without_running(monkeypatch):
    stage = Doubler()
    stage.crash_retries = 2
    attempts = []

    def start(ids):
        attempts.append(Attempt(number=len(attempts) + 1))
        return attempts[-1]

    monkeypatch.setattr(stage, "_start_attempt", start)
    # Runs 1-3: the first try and crash_retries reruns (a replica that died never finishes its run).
    for _ in range(3):
        assert stage(table(2)).column("doubled").to_pylist() == [0, 2]
    assert stage.calls == 3 and all(a.finished for a in attempts)
    out = stage(table(2)).to_pylist()  # run 4: the replicas died 3 times on it
    assert stage.calls == 3 and not attempts[-1].finished
    assert [r["status"] for r in out] == ["failed", "failed"] and [r["failed_stage"] for r in out] == ["doubler"] * 2
    assert out[0]["error"].startswith("ReplicaDied: the doubler replica running this row's batch died 3 times")


def test_batches_are_counted_only_in_model_stages_of_a_run(monkeypatch):
    import synthalign_ray.stages.common as common

    monkeypatch.setattr(common, "batch_attempts", lambda: None)  # outside `generate`: no BatchAttempts actor
    stage = Doubler()
    stage.crash_retries = 0
    assert stage._start_attempt(["r0"]) is None
    assert Doubler()._start_attempt(["r0"]) is None  # a task stage (crash_retries None) asks no actor


def test_batch_attempts_forgets_finished_batches():
    from synthalign_ray.stages.common import BatchAttempts

    ledger = BatchAttempts()
    assert [ledger.start("s:a"), ledger.start("s:a"), ledger.start("s:b")] == [1, 2, 1]
    ledger.finish("s:a")
    assert ledger.started == {"s:b": 1} and ledger.start("s:a") == 1


def test_a_stage_called_in_process_does_not_start_ray():
    import ray

    from synthalign_ray.stages.common import batch_attempts

    assert not ray.is_initialized()
    stage = Doubler()
    stage.crash_retries = 2  # as a model stage: it looks for the run's BatchAttempts actor
    assert batch_attempts() is None and stage(table(2)).column("doubled").to_pylist() == [0, 2]
    assert not ray.is_initialized()  # ray.get_actor would have started one (and left it running)


def test_a_gpu_pool_where_torch_sees_no_cuda_fails_naming_the_field():
    """A replica given a GPU by its pool but running a torch that sees none (this machine's CPU torch)
    fails at start-up instead of running on the CPU, before any model is loaded."""
    import pytest
    import torch

    from synthalign_ray.stages.common import NoCudaDeviceError
    from synthalign_ray.stages.image_scores import ImageScorer, ImageScoresConfig
    from synthalign_ray.stages.images import ImageGenerator, ImagesConfig

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    with pytest.raises(NoCudaDeviceError, match=r"^images\.pool\.num_gpus is 1, but torch .* sees no CUDA device .* set images\.pool\.num_gpus: 0$"):
        ImageGenerator(ImagesConfig(model="zoo:diffusion", pool={"num_gpus": 1}))
    with pytest.raises(NoCudaDeviceError, match=r"^image_scores\.pool\.num_gpus is 0\.5, "):
        ImageScorer(ImageScoresConfig(model="zoo:image-reward", pool={"num_gpus": 0.5}))
    assert ImagesConfig(model="zoo:diffusion").pool.torch_device("images") == "cpu"
