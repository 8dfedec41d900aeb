"""One run at a time per output: a lease object in the output names its holder and is kept fresh by a heartbeat.

Two `generate` runs on one output (a job resubmitted while the first still runs, two people, two schedulers)
would both write `todo/` and cut their blocks differently, so one id could land in two shards. The
lease prevents it. It is a JSON object (`.synthalign-lease.json`: run id, host, pid, start, heartbeat) written
through the output's pyarrow filesystem, so it works on s3:// and gs:// as on a local folder.

Taking it: no holder, or a holder that is gone (taken over with a warning): its heartbeat is older than
`stale_seconds`, or it ran on this host and its process has ended (a driver killed without cleaning up); or
`force` (`--force-unlock`). The taker writes its record, waits
`settle_seconds` and reads the record back. Of two runs that started together, both wrote, and only the last
write survives: the other sees a stranger's id and stops. This needs no conditional write, which pyarrow's
object-store filesystems do not offer, and holds as long as a write is visible to a read within the settle
time (S3 and GCS are read-after-write consistent).

Letting go: the lease is deleted when the run ends, also on SIGTERM (`ray job stop`, a scheduler's
preemption notice), which is turned into SystemExit while the lease is held so that cleanup runs. A
heartbeat write that fails (an object store's throttling, a network blip) is logged and tried again at the
next beat; one failure must not end the heartbeat, or a live run would look gone.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from synthalign_ray import store
from synthalign_ray.errors import UserError

log = logging.getLogger(__name__)

LEASE_FILE = ".synthalign-lease.json"
SETTLE_SECONDS = 1.0


class OutputLeasedError(UserError, RuntimeError):
    """Another live run holds the output."""


def lease_uri(output: str) -> str:
    return store.join(output, LEASE_FILE)


def read_holder(output: str) -> dict[str, Any] | None:
    try:
        return store.read_json(lease_uri(output))
    except FileNotFoundError:
        return None


def describe(holder: dict[str, Any], now: float) -> str:
    return (
        f"run {holder.get('run_id')} on {holder.get('host')} (pid {holder.get('pid')}), "
        f"last heartbeat {now - float(holder.get('heartbeat', 0)):.0f} s ago"
    )


def is_stale(holder: dict[str, Any], now: float, stale_seconds: float) -> bool:
    """The holder is gone: its heartbeat is too old, or it ran on this host and its process has ended."""
    if now - float(holder.get("heartbeat", 0)) > stale_seconds:
        return True
    return holder.get("host") == socket.gethostname() and not _process_alive(int(holder.get("pid", 0)))


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextmanager
def output_lease(
    output: str,
    *,
    stale_seconds: float,
    force: bool = False,
    heartbeat_seconds: float | None = None,
    settle_seconds: float = SETTLE_SECONDS,
) -> Iterator[dict[str, Any]]:
    """Hold the output's lease for the block's duration; OutputLeasedError if a live run holds it."""
    now = time.time()
    holder = read_holder(output)
    if holder is not None:
        if force:
            log.warning("%s: breaking the lease of %s (--force-unlock)", output, describe(holder, now))
        elif is_stale(holder, now, stale_seconds):
            log.warning("%s: taking over the stale lease of %s", output, describe(holder, now))
        else:
            raise OutputLeasedError(
                f"{output} is being written by {describe(holder, now)}. Wait for it to end; if it is gone, its "
                f"lease is taken over once its heartbeat is older than resources.lock_stale_seconds "
                f"({stale_seconds:.0f} s), or break it now with --force-unlock"
            )
    mine = {"run_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "started": now}
    store.write_json(lease_uri(output), {**mine, "heartbeat": time.time()})
    time.sleep(settle_seconds)
    winner = read_holder(output)
    if winner is None or winner.get("run_id") != mine["run_id"]:
        raise OutputLeasedError(
            f"{output} was taken at the same time by {describe(winner or {}, time.time())}; this run stops"
        )
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat,
        args=(output, mine, heartbeat_seconds or max(stale_seconds / 4, 1.0), stop),
        name="output-lease-heartbeat",
        daemon=True,
    )
    beat.start()
    restore_sigterm = _exit_on_sigterm()
    try:
        yield mine
    finally:
        restore_sigterm()
        stop.set()
        beat.join()
        current = read_holder(output)
        if current is not None and current.get("run_id") == mine["run_id"]:
            fs, path = store.filesystem(lease_uri(output))
            fs.delete_file(path)


def _heartbeat(output: str, mine: dict[str, Any], every: float, stop: threading.Event) -> None:
    while not stop.wait(every):
        try:
            current = read_holder(output)
            if current is None or current.get("run_id") != mine["run_id"]:
                log.error("%s: the output's lease was taken by %s; this run no longer holds it", output,
                          describe(current or {}, time.time()))
                return
            store.write_json(lease_uri(output), {**mine, "heartbeat": time.time()})
        except (OSError, ValueError) as error:
            log.warning("%s: the lease heartbeat failed (%s); trying again in %.0f s", output, error, every)


def _exit_on_sigterm():
    """Turn SIGTERM into SystemExit(143) so `finally` blocks run; returns what undoes it. Only the main
    thread can set a signal handler: elsewhere (a test runner's thread) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def exit_now(signum, frame):
        log.warning("SIGTERM: stopping; the output's lease is let go, the run resumes when started again")
        sys.exit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_now)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
