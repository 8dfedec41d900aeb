"""The output lease: one live run per output, taken over from a run that is gone, never shared by two."""

import logging
import socket
import subprocess
import sys
import threading
import time

import pytest

from synthalign_ray import store
from synthalign_ray.store.lease import LEASE_FILE, OutputLeasedError, lease_uri, output_lease, read_holder

FAST = {"stale_seconds": 60, "settle_seconds": 0.05}


def write_holder(output, **fields):
    record = {"run_id": "other-run", "host": socket.gethostname(), "pid": 1, "started": time.time(), "heartbeat": time.time()}
    store.write_json(lease_uri(output), record | fields)


def ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_second_run_is_refused_naming_the_holder_and_the_lease_goes_with_the_run(tmp_path):
    output = str(tmp_path / "run")
    with output_lease(output, **FAST) as mine:
        holder = read_holder(output)
        assert holder["run_id"] == mine["run_id"] and holder["host"] == socket.gethostname()
        with pytest.raises(OutputLeasedError, match=rf"being written by run {mine['run_id']} on .* \(pid \d+\)"):
            with output_lease(output, **FAST):
                pass
    assert not (tmp_path / "run" / LEASE_FILE).exists()


def test_a_live_holder_elsewhere_is_refused_unless_forced(tmp_path, caplog):
    output = str(tmp_path / "run")
    write_holder(output, host="gpu-node-7", pid=4242)
    with pytest.raises(OutputLeasedError, match=r"run other-run on gpu-node-7 \(pid 4242\).*--force-unlock"):
        with output_lease(output, **FAST):
            pass
    with caplog.at_level(logging.WARNING), output_lease(output, force=True, **FAST):
        assert read_holder(output)["run_id"] != "other-run"
    assert "breaking the lease of run other-run" in caplog.text


@pytest.mark.parametrize(
    "holder", [{"host": "gpu-node-7", "heartbeat": time.time() - 3600}, {"pid": "ended"}], ids=["old heartbeat", "ended process here"]
)
def test_a_gone_holder_is_taken_over_with_a_warning(tmp_path, caplog, holder):
    output = str(tmp_path / "run")
    write_holder(output, **(holder | ({"pid": ended_pid()} if holder.get("pid") == "ended" else {})))
    with caplog.at_level(logging.WARNING), output_lease(output, **FAST) as mine:
        assert read_holder(output)["run_id"] == mine["run_id"]
    assert "taking over the stale lease of run other-run" in caplog.text


def test_of_two_runs_taking_it_together_only_the_last_writer_goes_on(tmp_path):
    output = str(tmp_path / "run")
    # Another run writes its record while this one waits to read its own back.
    rival = threading.Timer(0.1, write_holder, args=(output,), kwargs={"host": "gpu-node-7", "pid": 4242})
    rival.start()
    with pytest.raises(OutputLeasedError, match="taken at the same time by run other-run on gpu-node-7"):
        with output_lease(output, stale_seconds=60, settle_seconds=0.5):
            pass
    rival.join()
    assert read_holder(output)["run_id"] == "other-run"  # the loser leaves the winner's lease alone


def test_the_heartbeat_keeps_the_lease_fresh(tmp_path):
    output = str(tmp_path / "run")
    with output_lease(output, heartbeat_seconds=0.1, **FAST):
        first = read_holder(output)["heartbeat"]
        time.sleep(0.5)
        assert read_holder(output)["heartbeat"] > first


def test_a_failed_heartbeat_write_does_not_end_the_heartbeat(tmp_path, monkeypatch, caplog):
    output = str(tmp_path / "run")
    real_write = store.write_json
    failures = []

    def flaky_write(uri, data):
        if threading.current_thread().name == "output-lease-heartbeat" and not failures:
            failures.append(uri)
            raise OSError("503 Slow Down")
        real_write(uri, data)

    monkeypatch.setattr(store, "write_json", flaky_write)
    with caplog.at_level(logging.WARNING), output_lease(output, heartbeat_seconds=0.1, **FAST):
        first = read_holder(output)["heartbeat"]
        deadline = time.time() + 10
        while read_holder(output)["heartbeat"] == first and time.time() < deadline:
            time.sleep(0.05)
        assert failures and read_holder(output)["heartbeat"] > first
    assert "lease heartbeat failed (503 Slow Down)" in caplog.text


def test_sigterm_lets_the_lease_go(tmp_path):
    output = str(tmp_path / "run")
    holder = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time\n"
            "from synthalign_ray.store.lease import output_lease\n"
            f"with output_lease({output!r}, stale_seconds=60, settle_seconds=0.05):\n"
            "    print('held', flush=True)\n"
            "    time.sleep(60)\n"
        )],
        stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    assert read_holder(output) is not None
    holder.terminate()
    assert holder.wait(timeout=30) == 143
    assert read_holder(output) is None
