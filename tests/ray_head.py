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
import secrets
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
    env: dict[str, str]  # the environment of a process that talks to this head (its auth mode and token)
    temp_dir: str  # named by every process of the head and of the nodes that join it (stop_head ends them)

    def add_node(self, num_cpus: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`ray start --address` of a worker node on this machine, as a cluster's worker nodes join
        (env: that node's environment, the head's by default)."""
        command = [
            RAY, "start", f"--address={self.address}", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}",
            "--disable-usage-stats", f"--temp-dir={self.temp_dir}",
            # Each node's dashboard agent listens on the machine's IP, as the head's: a port of its own.
            f"--dashboard-agent-listen-port={free_port()}",
        ]  # fmt: skip
        return subprocess.run(command, env=env or self.env, capture_output=True, text=True, timeout=180)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_env(auth_token_path: str | None = None, **extra: str) -> dict[str, str]:
    """The environment of a process of (or talking to) a test cluster. A loopback-only test cluster runs
    without token auth, unless AUTH_TOKEN_PATH names the token file of a head that has it on: then the
    process has RAY_AUTH_MODE=token, as every client of such a cluster needs (the `ray` CLI sends the token
    only then), and reads the token from that file instead of ~/.ray/auth_token (which would turn token
    auth on for every other local Ray the tests start)."""
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": auth_token_path} if auth_token_path else {"RAY_AUTH_MODE": "disabled"}
    return dict(os.environ, **auth, **extra)


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
def local_ray_head(num_cpus: int = 8, dashboard: bool = False, token_auth: bool = False) -> Iterator[RayHead]:
    """`ray start --head` on free loopback ports (with the dashboard and its job server if asked; with
    Ray's token auth on and a fresh token of its own if asked)."""
    # Short path under /tmp: Ray's unix sockets live in it and socket paths are limited to 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="sa-ray-", dir="/tmp")
    token_path = None
    if token_auth:
        token_path = os.path.join(temp_dir, "auth_token")
        Path(token_path).write_text(secrets.token_hex(32))  # as `ray get-auth-token --generate` makes one
    env = ray_env(token_path)
    port, dashboard_port = free_port(), free_port()
    command = [
        RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={num_cpus}",
        "--disable-usage-stats", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    # The job server submits through the head's dashboard agent, which listens on the machine's IP at 52365
    # unless told otherwise: any other Ray of this machine (a test's local ray.init) may hold that port.
    dashboard_args = [f"--dashboard-port={dashboard_port}", f"--dashboard-agent-listen-port={free_port()}"]
    command += ["--dashboard-host=127.0.0.1", *dashboard_args] if dashboard else ["--include-dashboard=false"]
    try:
        subprocess.run(command, check=True, env=env, capture_output=True, timeout=180)
        assert processes_of_head(temp_dir), "no process names the head's temp dir: cannot stop it safely"
        yield RayHead(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard_port}" if dashboard else None, env, temp_dir)
    finally:
        stop_head(temp_dir)
        assert not [p for p in processes_of_head(temp_dir) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(temp_dir, ignore_errors=True)
