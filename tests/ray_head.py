"""A Ray head of the test's own on 127.0.0.1, stopped without touching anyone else's Ray.

`ray stop` (with or without --force) stops every Ray process on the machine, other people's runs
included. So the head gets a temp dir of its own, every process it starts carries that path in its
command line (GCS, raylet, dashboard, agents, monitor), and `local_ray_head` ends exactly those
processes and their descendants (workers, drivers of submitted jobs): SIGTERM, then SIGKILL after a
grace period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass(frozen=True)
class RayHead:
    address: str  # GCS address, for RAY_ADDRESS / ray.init
    dashboard: str | None  # job server URL, for `ray job submit --address`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(**extra: str) -> dict[str, str]:
    # A loopback-only test cluster: no token auth between the test's own head, CLI, drivers and jobs.
    return dict(os.environ, RAY_AUTH_MODE="disabled", **extra)


def processes_of_head(temp_dir: str) -> list[psutil.Process]:
    """The head's processes (their command lines name its temp dir) and everything they started."""
    found = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(temp_dir in arg for arg in process.info["cmdline"] or []):
            found[process.pid] = process
            try:
                found.update({child.pid: child for child in process.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
    return list(found.values())


def stop_head(temp_dir: str, grace_seconds: float = 5) -> None:
    processes = processes_of_head(temp_dir)
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_seconds)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=5)


@contextlib.contextmanager
def local_ray_head(num_cpus: int = 8, dashboard: bool = False) -> Iterator[RayHead]:
    """`ray start --head` on free loopback ports (with the dashboard and its job server if asked)."""
    # Short path under /tmp: Ray's unix sockets live in it and socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="sa-ray-", dir="/tmp")
    port, dashboard_port = free_port(), free_port()
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    command += ["--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}"] if dashboard else ["--include-dashboard=false"]
    try:
        subprocess.run(command, check=True, env=ray_env(), capture_output=True, timeout=180)
        assert processes_of_head(temp_dir), "no process names the head's temp dir: cannot stop it safely"
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None)
    finally:
        stop_head(temp_dir)
        assert not [p for p in processes_of_head(temp_dir) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp_dir, ignore_errors=True)
