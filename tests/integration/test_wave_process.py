"""A wave's Ray Data execution is driven by a Ray worker process of its own (`runtime.run_in_wave_process`),
with the run's Ray Data settings, and that process is gone after the wave."""

import json
import os
import time

import pytest

from synthalign_ray.config import ResourcesConfig
from synthalign_ray.runtime import configure_data_context, run_in_wave_process


@pytest.fixture
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


def exits(pid: int, timeout: float = 30) -> bool:
    """Whether process `pid` is gone (or a zombie) within `timeout` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def test_each_wave_runs_in_a_new_process_with_the_runs_ray_data_settings(ray_local, tmp_path):
    import ray

    def build(cfg, wave, commits):  # called in the wave's process: records what it sees there
        import ray

        context = ray.data.DataContext.get_current()
        seen = {"pid": os.getpid(), "max_errored_blocks": context.max_errored_blocks}
        seen["object_store_memory"] = context.execution_options.resource_limits.object_store_memory
        (tmp_path / f"wave-{wave}.json").write_text(json.dumps(seen))
        # rows of no status the sink writes: the wave runs, and writes nothing
        return ray.data.from_items([{"id": f"r{i}", "status": "none"} for i in range(4)])

    context = ray.data.DataContext.get_current()
    configure_data_context(context, ResourcesConfig(max_lost_blocks=3, object_store_memory=64 * 2**20))
    results = [run_in_wave_process(None, wave, str(tmp_path / "out"), context, build, None) for wave in (1, 2)]

    seen = [json.loads((tmp_path / f"wave-{wave}.json").read_text()) for wave in (1, 2)]
    assert [s["max_errored_blocks"] for s in seen] == [3, 3]
    assert [s["object_store_memory"] for s in seen] == [64 * 2**20] * 2
    pids = [s["pid"] for s in seen]
    assert os.getpid() not in pids and pids[0] != pids[1]
    assert all(exits(pid) for pid in pids)
    assert all(result.counts == {"status": {}, "drop_reason": {}, "failed_stage": {}} for result in results)
    assert all(result.peak_rss_mib > 50 for result in results)  # a Ray worker with Ray Data imported
    assert [stage["rows_out"] for stage in results[0].stats["operators"]][-1] == 4
