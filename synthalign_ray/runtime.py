"""The Ray runtime of a run: joining or starting Ray with the run's environment, checks that need the
cluster, Ray Data's settings, and the worker process that drives each wave's Ray Data execution.

`generate` (pipeline.py), the LLM commands (`prompts`, `judge`), `evaluate` and `calibrate` start Ray here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from synthalign_ray import progress, ray_private, store
from synthalign_ray.config import ConfigError, ResourcesConfig, SynthAlignConfig
from synthalign_ray.stages.chat import ChatModelConfig
from synthalign_ray.engines.vllm_engine import LIGHT_STAGE_CPUS
from synthalign_ray.stages.common import on_driver_node

# Seconds between two progress reports (a line per stage) when the console is not a terminal.
PROGRESS_LOG_INTERVAL_S = 30


def init_ray(resources: ResourcesConfig, chat_models: Iterable[ChatModelConfig] = ()) -> None:
    """Join the configured (or the job's) Ray cluster, else start a local one; workers get the run's env."""
    import ray

    if ray.is_initialized():
        return
    resources.check_secret_environment()
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")} | resources.env
    if "SYNTHALIGN_ZOO" in os.environ:  # workers must find the same zoo as the driver
        env.setdefault("SYNTHALIGN_ZOO", os.environ["SYNTHALIGN_ZOO"])
    # Endpoint keys and resources.secret_env go from the driver's environment to the workers' (never into
    # the config or manifest).
    for name in [chat.api_key_env for chat in chat_models if chat.api_key_env is not None] + resources.secret_env:
        env.setdefault(name, os.environ[name])
    # Under `ray job submit`, the job's runtime env already reaches every worker of the job, and ray.init
    # refuses an env var the job's runtime env sets too (e.g. SYNTHALIGN_ZOO in --runtime-env-json):
    # those are left to the job.
    env = {key: value for key, value in env.items() if key not in ray_private.submitted_job_env_vars()}
    joining = resources.ray_address is not None or "RAY_ADDRESS" in os.environ  # e.g. under `ray job submit`
    # A set num_cpus asks for a local Ray of the run's own: ray.init(address=None) would join a cluster
    # that `ray start` left running on this machine instead, and refuse num_cpus there.
    local = not joining and resources.num_cpus is not None
    ray.init(
        address="local" if local else resources.ray_address,
        num_cpus=resources.num_cpus if local else None,  # a running cluster's CPUs are its own
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )


def configure_data_context(context, resources: ResourcesConfig) -> None:
    """Ray Data's settings for a run: how many lost blocks it may skip, its object store budget."""
    # A block whose actor task failed past its retries is skipped (and counted) instead of failing the
    # whole run; generate records its rows failed.
    context.max_errored_blocks = resources.max_lost_blocks
    # The wave's execution runs in a Ray worker, whose tqdm bars Ray relays to the driver's console. Without
    # a terminal there (CI, `ray job submit` logs, `> file`) every redraw became a line, tens of thousands per
    # tiny run; Ray Data's logging progress instead writes one line per stage every
    # PROGRESS_LOG_INTERVAL_S.
    if not sys.stdout.isatty():
        context.use_ray_tqdm = False
    if resources.object_store_memory is not None:
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(object_store_memory=resources.object_store_memory)


def check_chat_environment(chat_models: dict[str, ChatModelConfig]) -> None:
    """Every endpoint key variable is set, before anything starts."""
    for field, chat in chat_models.items():
        try:
            chat.check_environment(field)
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclass
class WaveResult:
    counts: dict[str, dict[str, int]]  # the wave's rows by status, drop reason, failed stage (the sink's)
    denied: dict[str, list[str]]  # rows whose node was refused the write: message -> ids (the sink's)
    stats: dict[str, Any]  # progress.run_stats of its execution
    peak_rss_mib: float  # of the process that drove it


def run_in_wave_process(cfg: SynthAlignConfig, wave: store.BlockFileDatasource, output: str, context, build, commits) -> WaveResult:
    """Runs one wave's Ray Data execution in a Ray worker process of its own, on the driver's node (the
    head under `ray job submit`, which no spot preemption takes), that exits when the wave is done
    (`max_calls=1`).

    Why not in the driver: an execution leaves memory behind in the process that drove it, which the
    next one does not reuse. Ray Data keeps per-block stats until the Dataset is gone (ray#66016), and
    what Ray core and glibc keep of it stays native. On `simulate` the driver grew 50 MiB over the
    4000 blocks of a million rows, whatever the wave size. The wave's process takes that along when it
    exits, so the driver stays flat however many waves a run has. No retries: a wave whose process dies
    fails the run, and a rerun resumes it."""
    import ray

    wave_task = ray.remote(num_cpus=0, max_calls=1, max_retries=0)(drive_wave).options(
        scheduling_strategy=on_driver_node(),
        runtime_env={"env_vars": {"RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": str(PROGRESS_LOG_INTERVAL_S)}},
    )
    ref = wave_task.remote(cfg, wave, output, context, build, commits)
    try:
        return ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)  # else the wave runs on until Ray notices the driver is gone
        raise


def drive_wave(cfg: SynthAlignConfig, wave: store.BlockFileDatasource, output: str, context, build, commits) -> WaveResult:
    """The body of `run_in_wave_process`: builds the wave's dataset (`build(cfg, wave, commits)`: which stages
    it restores and commits) with the driver's Ray Data settings and writes it to `output`."""
    ray_private.set_current_data_context(context)
    sink = store.StatusSplitDatasink(output)
    dataset = build(cfg, wave, commits)
    dataset.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_STAGE_CPUS})
    return WaveResult(
        counts=sink.counts, denied=sink.denied, stats=progress.run_stats(dataset), peak_rss_mib=round(peak_rss_mib(), 1)
    )


def peak_rss_mib() -> float:
    """This process's peak resident memory (getrusage counts KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def release_freed_memory() -> None:
    """Hands the memory this process has freed back to the OS: glibc keeps freed heap (above all in the
    arenas of threads, such as Arrow's) and RSS still counts it, for the rest of an hour-long stream. The
    passes over a million prompts left 75 MB of it in the driver, Ray's start and each Ray Data execution
    more. `malloc_trim` returns it; Arrow's pool keeps a little more. A no-op where libc has no
    `malloc_trim` (macOS, musl)."""
    import ctypes

    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)
