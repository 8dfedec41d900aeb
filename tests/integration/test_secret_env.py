"""`resources.secret_env` on a cluster whose workers do not inherit the driver's environment: a `ray start`
head of the test's own, started without the secret, and a driver that has it, joining through
RAY_ADDRESS as under `ray job submit`. The named variable reaches a worker through `init_ray`; another
variable of the driver's that is not named does not (so the first one did not arrive by inheritance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ray_head import local_ray_head, ray_env

pytestmark = pytest.mark.slow

DRIVER = """
import json, os, sys
import ray
from synthalign_ray.config import ResourcesConfig
from synthalign_ray.runtime import init_ray

init_ray(ResourcesConfig(secret_env=["SYNTHALIGN_TEST_SECRET"]))
seen = ray.get(ray.remote(lambda: {n: os.environ.get(n) for n in ("SYNTHALIGN_TEST_SECRET", "SYNTHALIGN_TEST_UNNAMED")}).remote())
print(json.dumps(seen))
"""


def test_secret_env_reaches_workers_that_do_not_inherit_the_drivers_environment():
    assert "SYNTHALIGN_TEST_SECRET" not in os.environ  # the head must start without it
    with local_ray_head(num_cpus=1) as head:
        env = ray_env(RAY_ADDRESS=head.address, SYNTHALIGN_TEST_SECRET="s3cr3t-value", SYNTHALIGN_TEST_UNNAMED="driver-only")
        run = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert run.returncode == 0, run.stderr[-4000:]
        seen = json.loads(run.stdout.strip().splitlines()[-1])
        assert seen == {"SYNTHALIGN_TEST_SECRET": "s3cr3t-value", "SYNTHALIGN_TEST_UNNAMED": None}

        # A named variable the driver lacks: one clear line, before Ray is joined.
        env.pop("SYNTHALIGN_TEST_SECRET")
        run = subprocess.run([sys.executable, "-c", DRIVER], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert run.returncode != 0 and "resources.secret_env: SYNTHALIGN_TEST_SECRET not set in the driver's environment" in run.stderr
