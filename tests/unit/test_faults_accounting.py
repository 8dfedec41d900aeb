"""Model-free parts of fault handling: idempotent shard names, rows of lost blocks, pool placement, and
the exactly-once accounting over an output folder."""

from pathlib import Path

import pyarrow as pa
import pytest

from synthalign_ray import store
from synthalign_ray.ids import IdSet, digests
from synthalign_ray.accounting import (
    LOST_STAGE,
    WRITE_STAGE,
    AccountingError,
    accounting,
    failed_fraction,
    failure_report,
    lost_rows,
)
from synthalign_ray.runtime import release_freed_memory
from synthalign_ray.stages.common import ActorPoolConfig
from synthalign_ray.stages.prompts import PromptCheck, prompts_table


def prompts(ids):
    return prompts_table([{"id": i, "category": "c", "t2i_prompt": "p", "seed": 0, "source_line": n} for n, i in enumerate(ids)])


def test_shard_name_is_a_function_of_the_rows_ids():
    # A write that Ray runs again (its node died after the move) lands on the same file, not a second one.
    assert store.shard_name(prompts(["a", "b"])) == store.shard_name(prompts(["a", "b"]))
    assert store.shard_name(prompts(["a", "b"])) != store.shard_name(prompts(["a", "c"]))
    assert store.shard_name(prompts(["a"])).startswith("part-") and store.shard_name(prompts(["a"])).endswith(".parquet")


def test_lost_rows_are_the_inputs_with_no_shard_recorded_failed():
    lost = lost_rows(prompts(["a", "b", "c", "d"]), written=IdSet.of(["a", "c", "z"]))
    assert lost.column("id").to_pylist() == ["b", "d"]
    assert set(lost.column("status").to_pylist()) == {"failed"}
    assert set(lost.column("failed_stage").to_pylist()) == {LOST_STAGE}
    assert all(e.startswith("LostBlock") for e in lost.column("error").to_pylist())
    assert lost.schema == prompts(["x"]).schema  # the same columns as any input row
    assert lost_rows(prompts(["a"]), written=IdSet.of(["a"])).num_rows == 0


def test_rows_whose_node_was_refused_the_write_are_failed_by_write_with_the_cause():
    denied = {"b": "ShardWriteDenied: the node at 10.0.0.7 ..."}
    lost = lost_rows(prompts(["a", "b", "c"]), written=IdSet.of(["a"]), denied=denied)
    assert lost.column("failed_stage").to_pylist() == [WRITE_STAGE, LOST_STAGE]
    assert lost.column("error").to_pylist()[0] == denied["b"] and lost.column("error").to_pylist()[1].startswith("LostBlock")


def test_only_a_refusal_counts_as_a_denied_write():
    # pyarrow's S3 and GCS errors as they read (an ACCESS_DENIED seen on moto's server with a key it does not know).
    assert store.write_denied(OSError("When testing for existence of bucket 'b': AWS Error ACCESS_DENIED during HeadBucket operation"))
    assert store.write_denied(OSError("google::cloud::Status(PERMISSION_DENIED: caller lacks storage.objects.create)"))
    assert store.write_denied(PermissionError(13, "Permission denied"))
    assert not store.write_denied(OSError("AWS Error NETWORK_CONNECTION during PutObject operation: curlCode: 7"))
    assert not store.write_denied(OSError("AWS Error SLOW_DOWN during PutObject operation"))  # Ray's retry may pass


def test_a_denial_is_found_in_errors_relayed_as_other_types():
    # As Ray Train hands back a worker's failure: its traceback text inside another exception.
    relayed = RuntimeError("Traceback (most recent call last):\n  ...\nOSError: When creating key 'dpo/' in bucket 'b': "
                           "AWS Error ACCESS_DENIED during PutObject operation: Access Denied\n")  # fmt: skip
    found = store.denial_in([ValueError("unrelated"), relayed])
    assert found == "OSError: When creating key 'dpo/' in bucket 'b': AWS Error ACCESS_DENIED during PutObject operation: Access Denied"
    assert store.denial_in([PermissionError(13, "Permission denied", "/mnt/runs/x")]) == "[Errno 13] Permission denied: '/mnt/runs/x'"
    assert store.denial_in([RuntimeError("CUDA out of memory"), OSError("AWS Error NETWORK_CONNECTION")]) is None


def test_pool_placement_reaches_ray_data():
    pool = ActorPoolConfig(num_gpus=1, accelerator_type="A100", resources={"diffusion_node": 1})
    kwargs = pool.map_batches_kwargs()
    assert kwargs["accelerator_type"] == "A100" and kwargs["resources"] == {"diffusion_node": 1}
    plain = ActorPoolConfig().map_batches_kwargs()
    assert "accelerator_type" not in plain and "resources" not in plain  # Ray's own defaults
    # Ray Data's own retry policy stays: a replica lost with its node is resubmitted without limit.
    assert "max_task_retries" not in plain and "max_restarts" not in plain


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from Linux's /proc")
def test_release_freed_memory_returns_the_freed_heap_to_the_os():
    def rss_mib() -> float:
        return next(int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS")) / 1024

    chunks = [bytes(4000) for _ in range(12_800)]  # 50 MB of malloc'd chunks (over pymalloc's 512 B)
    pinned = bytes(4000)  # above them on the heap (alive to the end): glibc keeps the chunks freed below
    del chunks
    held = rss_mib()
    release_freed_memory()
    assert held - rss_mib() > 30


def test_run_resources_reach_ray_data():
    from ray.data import DataContext

    from synthalign_ray.config import ResourcesConfig
    from synthalign_ray.runtime import configure_data_context

    context = DataContext()
    configure_data_context(context, ResourcesConfig(max_lost_blocks=3, object_store_memory=64 * 2**20))
    assert context.max_errored_blocks == 3
    assert context.execution_options.resource_limits.object_store_memory == 64 * 2**20
    default = DataContext()
    configure_data_context(default, ResourcesConfig())
    assert default.execution_options.resource_limits == DataContext().execution_options.resource_limits  # Ray's own
    assert default.max_errored_blocks == 10  # bounded by default: a run that keeps losing blocks stops


def outcome_rows(ids, status, drop_reason=None):
    n = len(ids)
    return pa.table({"id": ids, "status": [status] * n, "drop_reason": [drop_reason] * n, "failed_stage": [None] * n},
                    schema=pa.schema([(c, pa.string()) for c in ("id", "status", "drop_reason", "failed_stage")]))  # fmt: skip


def check_of(ids):
    return PromptCheck(bad=[], ids=IdSet.of(ids), duplicate_lines=set(), last_line=len(ids))


def write_outputs(run, shards):
    for number, (folder, table) in enumerate(shards):
        store.write_table(store.join(run, folder, f"part-{number}.parquet"), table)


def test_accounting_counts_every_input_id_once_and_names_what_breaks_it(tmp_path):
    run = str(tmp_path / "run")
    inputs = ["a", "b", "c", "d"]
    write_outputs(run, [("pairs", outcome_rows(["a", "b"], "ok")), ("dropped", outcome_rows(["c"], "dropped", "tie")),
                        ("failed", outcome_rows(["d"], "failed")), ("pairs", outcome_rows(["old"], "ok"))])  # fmt: skip
    check = check_of(inputs)
    outcomes = store.output_counts(run, check.ids)
    assert outcomes.times_written.tolist() == [1, 1, 1, 1] and outcomes.outside_input == IdSet.of(["old"])
    assert outcomes.contains(digests(["a", "old", "zz"])).tolist() == [True, True, False]
    counts = accounting(run, check, outcomes, this_run=store.empty_counts(), input_ids=inputs)
    assert (counts["rows"], counts["pairs"], counts["dropped"], counts["failed"]) == (4, 3, 1, 1)
    assert counts["dropped_by_reason"] == {"tie": 1} and counts["outside_input"] == 1  # an earlier run's row

    # an input id with no row is named
    more = check_of([*inputs, "e"])
    with pytest.raises(AccountingError, match=r"1 input rows have no outcome, e.g. \['e'\]"):
        accounting(run, more, store.output_counts(run, more.ids), this_run=store.empty_counts(), input_ids=[*inputs, "e"])
    # ids written twice are named, in the input or outside it
    write_outputs(run, [("failed", outcome_rows(["b", "old"], "failed"))])
    with pytest.raises(AccountingError, match=r"ids written more than once: \['b', 'old'\]"):
        accounting(run, check, store.output_counts(run, check.ids), this_run=store.empty_counts(), input_ids=inputs)
    # outcomes counted against other ids cannot be checked against this input
    with pytest.raises(ValueError, match="counted against the check's ids"):
        accounting(run, check, store.output_counts(run), this_run=store.empty_counts(), input_ids=inputs)


def failed_rows(ids, stage, errors):
    n = len(ids)
    return pa.table({"id": ids, "status": ["failed"] * n, "failed_stage": [stage] * n, "error": errors})


def test_a_run_with_too_many_failed_rows_reports_each_stage_and_its_commonest_errors(tmp_path):
    run = str(tmp_path / "run")
    oom = "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nTraceback (most recent call last): ..."
    write_outputs(run, [
        ("failed", failed_rows(["a", "b", "c"], "response_scores", [oom, oom, "ValueError: row has no instruction"])),
        ("failed", failed_rows(["d", "e", "f", "g", "h"], "images", ["E1", "E2", "E2", "E3", "E4"])),
        ("failed", failed_rows(["i"], None, [None])),
        ("pairs", outcome_rows(["x"], "ok")),
    ])  # fmt: skip
    summary = store.failure_summary(run)
    assert summary == {
        "images": {"rows": 5, "errors": [("E2", 2), ("E1", 1), ("E3", 1)]},  # three at most, commonest first
        "response_scores": {
            "rows": 3,
            "errors": [("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", 2),
                       ("ValueError: row has no instruction", 1)],
        },  # fmt: skip
        "unknown": {"rows": 1, "errors": [("no error message", 1)]},
    }
    counts = {"rows": 200, "failed": 9}
    assert failed_fraction(counts) == 0.045 and failed_fraction({"rows": 0, "failed": 0}) == 0.0
    lines = failure_report(counts, summary, max_fraction=0.01)
    assert lines[0].startswith("9 of 200 rows failed (4.5%), more than resources.max_failed_fraction (1.0%)")
    assert lines[1:4] == ["  images: 5 rows", "    2 x E2", "    1 x E1"]
    assert "  response_scores: 3 rows" in lines
    assert "    2 x OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" in lines
