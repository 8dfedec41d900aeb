"""What every model-backed stage shares: actor-pool settings and row-level failure
isolation (a row whose stage raises is retried, then recorded as failed; the run goes on).

Import-light on purpose: config validation imports this before any model library is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from typing import Any

import pyarrow as pa
from pydantic import Field

from synthalign_ray.base import (
    CRASHES_ENV,
    STATUS_DROPPED,
    STATUS_OK,
    InjectedFault,
    ReplicasConfig,
    injected_delay,
    injected_faults,
    with_cells,
    with_failures,
)

log = logging.getLogger(__name__)

_DROP_REASON = "__drop_reason__"
_FAILURE = "__failure__"
class BatchAttempts:
    """A Ray actor of the run that counts how many times each batch of a model stage was started and not
    finished. Ray restarts a replica that died (node lost, OOM kill, a crash) and resubmits its batch
    without limit (Ray Data's default, right for preempted nodes); a batch whose replica died on it more
    than `crash_retries` times is then recorded failed instead of run again (`RowStage`), so one row that
    kills its model server cannot stall the run forever. Finished batches are forgotten: the actor holds
    only batches in flight or crashed."""

    def __init__(self):
        self.started: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.started[key] = self.started.get(key, 0) + 1
        return self.started[key]

    def finish(self, key: str) -> None:
        self.started.pop(key, None)


BATCH_ATTEMPTS_ACTOR = "synthalign-batch-attempts"


def on_driver_node():
    """A Ray scheduling strategy: the driver's node (the head under `ray job submit`), where a lost worker
    node cannot take the task or actor along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def start_batch_attempts():
    """The driver's BatchAttempts actor, `on_driver_node`; the stages' replicas find it by name within the job."""
    import ray

    actor = ray.remote(BatchAttempts).options(name=BATCH_ATTEMPTS_ACTOR, num_cpus=0, get_if_exists=True, scheduling_strategy=on_driver_node())
    return actor.remote()


def batch_attempts():
    """The run's BatchAttempts actor, or None outside `generate` (a stage run on its own, maybe where Ray
    is not even installed: a process that never imported ray is no Ray worker)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():  # a stage called in-process; ray.get_actor would start a Ray
        return None
    try:
        return ray.get_actor(BATCH_ATTEMPTS_ACTOR)
    except ValueError:
        return None


class BatchAttempt:
    """One run of one batch, counted in the BatchAttempts actor."""

    def __init__(self, ledger, key: str, number: int):
        self.ledger, self.key, self.number = ledger, key, number

    @classmethod
    def start(cls, ledger, key: str) -> BatchAttempt:
        import ray

        return cls(ledger, key, ray.get(ledger.start.remote(key)))

    def finish(self) -> None:
        self.ledger.finish.remote(self.key)


class NoCudaDeviceError(RuntimeError):
    """A stage's pool asks for GPUs, and its replica's torch sees none."""


class ActorPoolConfig(ReplicasConfig):
    """One autoscaling actor pool of a model-backed stage (Ray Data `map_batches` with an actor pool)."""

    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    max_batch_retries: int = Field(1, ge=0, description="retries of a failing batch before rows are tried alone")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per replica, e.g. {diffusion_node: 1}"
    )
    crash_retries: int = Field(
        2,
        ge=0,
        description="times a batch is run again after its replica died running it (node lost, OOM kill, a "
        "crash; Ray restarts the replica and resubmits the batch) before its rows are recorded failed",
    )

    def torch_device(self, stage: str) -> str:
        """Where a replica of `stage` puts its model: on its GPU when the pool gives it one. A pool given
        GPUs where torch sees no CUDA device (a CPU build of torch, a node without its driver) fails here,
        naming the field: falling back to the CPU would run the stage about 100x slower, silently."""
        import torch

        if self.num_gpus == 0:
            return "cpu"
        if not torch.cuda.is_available():
            raise NoCudaDeviceError(
                f"{stage}.pool.num_gpus is {self.num_gpus:g}, but torch {torch.__version__} sees no CUDA device on "
                f"{socket.gethostname()} (built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): install the GPU stack there, or set {stage}.pool.num_gpus: 0"
            )
        return "cuda"

    def map_batches_kwargs(self) -> dict[str, Any]:
        from ray.data import ActorPoolStrategy

        placement = {"accelerator_type": self.accelerator_type} if self.accelerator_type else {}
        if self.resources:
            placement["resources"] = self.resources
        return dict(
            compute=ActorPoolStrategy(min_size=self.min_actors, max_size=self.max_actors),
            num_gpus=self.num_gpus,
            num_cpus=self.num_cpus,
            batch_size=self.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
            **placement,
        )


class RowStage:
    """Base of every stage's callable class: adds columns to the rows that are still `ok`.

    Subclasses set `output_fields` (the columns they add, with types) and implement `process(rows)`,
    which gets the ok rows as dicts and returns one dict of new values per row (`self.drop(reason,
    values)` for a row to drop: status `dropped` with its reason; `self.fail(error, values)` for a row
    whose failure the stage already knows, e.g. an endpoint that refused it after its own retries). A batch that raises is
    retried `max_batch_retries` times, then its rows are run one by one so that one bad row cannot take
    its neighbours down; a row that still raises gets status `failed`, its error and the stage's name,
    and travels on untouched (later stages skip it). Rows that failed earlier get nulls here.
    """

    name: str = "stage"
    output_fields: list[pa.Field] = []

    def __init__(self, max_batch_retries: int = 1, crash_retries: int | None = None):
        self.max_batch_retries = max_batch_retries
        self.crash_retries = crash_retries  # None: a task stage, not counted (see BatchAttempts)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        raise NotImplementedError

    @staticmethod
    def drop(reason: str, values: dict[str, Any]) -> dict[str, Any]:
        """The result of a row that this stage filters out: its values plus the drop reason."""
        return {**values, _DROP_REASON: reason}

    @staticmethod
    def fail(error: str, values: dict[str, Any]) -> dict[str, Any]:
        """The result of a row that failed in this stage, without failing its neighbours."""
        return {**values, _FAILURE: error}

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = table.to_pylist()
        ok_index = [i for i, row in enumerate(rows) if row["status"] == STATUS_OK]
        results: dict[int, dict[str, Any]] = {}
        errors: dict[int, str] = {}
        attempt = self._start_attempt([rows[i]["id"] for i in ok_index])
        if attempt is not None and attempt.number > self.crash_retries + 1:
            died = attempt.number - 1
            log.error("%s: the replicas running a batch died %d times; failing its %d rows", self.name, died, len(ok_index))
            error = f"ReplicaDied: the {self.name} replica running this row's batch died {died} times (node lost, OOM kill or a crash; see the Ray logs)"
            return self._assemble(table, {}, dict.fromkeys(ok_index, error))
        try:
            outputs = self._with_retries([rows[i] for i in ok_index])
            results.update(zip(ok_index, outputs))
        except Exception as batch_error:  # isolate the bad rows
            log.warning("%s: batch of %d failed (%s); retrying rows one by one", self.name, len(ok_index), batch_error)
            for i in ok_index:
                try:
                    results[i] = self._checked([rows[i]])[0]
                except Exception as row_error:
                    errors[i] = f"{type(row_error).__name__}: {row_error}"
        if attempt is not None:
            attempt.finish()
        return self._assemble(table, results, errors)

    def _start_attempt(self, ids: list[str]) -> BatchAttempt | None:
        """This run of a batch, counted in the run's BatchAttempts (None: not counted)."""
        if self.crash_retries is None or not ids:
            return None
        ledger = batch_attempts()
        return None if ledger is None else BatchAttempt.start(ledger, f"{self.name}:{'|'.join(ids)}")

    def _checked(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        ids = {row["id"] for row in rows}
        if injected_faults(self.name, CRASHES_ENV) & ids:
            log.error("%s: injected crash on %s: exiting the process", self.name, sorted(ids))
            os._exit(1)
        delay = injected_delay(self.name, ids)
        if delay:
            log.warning("%s: injected delay on %s: %g s", self.name, sorted(ids), delay)
            time.sleep(delay)
        faulty = injected_faults(self.name) & ids
        if faulty:
            raise InjectedFault(f"injected fault in {self.name} for {sorted(faulty)}")
        outputs = self.process(rows)
        if len(outputs) != len(rows):
            raise RuntimeError(f"{self.name} returned {len(outputs)} results for {len(rows)} rows")
        return outputs

    def _with_retries(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not rows:
            return []
        for attempt in range(self.max_batch_retries):
            try:
                return self._checked(rows)
            except Exception as error:
                log.warning("%s: batch attempt %d failed (%s); retrying", self.name, attempt + 1, error)
        return self._checked(rows)

    def _assemble(self, table: pa.Table, results: dict[int, dict], errors: dict[int, str]) -> pa.Table:
        n = table.num_rows
        for field in self.output_fields:
            values = [results[i][field.name] if i in results else None for i in range(n)]
            table = table.append_column(field, pa.array(values, type=field.type))
        drops = {i: result[_DROP_REASON] for i, result in results.items() if _DROP_REASON in result}
        errors = {**errors, **{i: result[_FAILURE] for i, result in results.items() if _FAILURE in result}}
        table = with_failures(table, errors, dict.fromkeys(errors, self.name))
        return with_cells(table, {"status": dict.fromkeys(drops, STATUS_DROPPED), "drop_reason": drops})
