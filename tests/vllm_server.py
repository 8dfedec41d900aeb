"""`vllm serve` of a model on 127.0.0.1 for the tests that need an OpenAI-compatible endpoint."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.ray_head import free_port


@contextlib.contextmanager
def vllm_server(model: str, served_name: str, api_key: str, log: Path) -> Iterator[str]:
    """Serves `model` (a local folder) as `served_name`, requiring `api_key`; yields the base URL (…/v1)."""
    port = free_port()
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--served-model-name",
             served_name, "--host", "127.0.0.1", "--port", str(port), "--api-key", api_key, "--enforce-eager",
             "--max-model-len", "512"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(f"vllm serve did not come up:\n{log.read_text()[-4000:]}") from None
                time.sleep(1)
        yield f"{url}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
