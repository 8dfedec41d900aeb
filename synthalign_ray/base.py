"""The shared base every layer stands on: row status, the strict pydantic base, model references and
their resolution (the one place outside the CLI that reaches the zoo), the replica settings of a model
pool, seeds, and the fault-injection switches.

Import-light on purpose: config validation imports this before any model library is needed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from synthalign_ray import zoo
from synthalign_ray.zoo import ZOO_PREFIX

# A row's status, in every stage's output and in the store's shard folders.
STATUS_OK = "ok"  # still in the running: later stages process it
STATUS_DROPPED = "dropped"  # filtered out on purpose, with a `drop_reason` (no instruction, tie, ...)
STATUS_FAILED = "failed"  # a stage raised on it, even after retries: `error` and `failed_stage` say why
SEED_MODULUS = 2**31  # torch.Generator accepts 64 bits; 31 keeps seeds portable to numpy and JSON readers


def with_cells(table, cells: Mapping[str, Mapping[int, str]]):
    """A pyarrow table with string columns (`status`, `failed_stage`, `error`, `drop_reason`) set at some
    rows: column -> {row number: value}."""
    import pyarrow as pa

    for name, rows in cells.items():
        if rows:
            values = table[name].to_pylist()
            for i, value in rows.items():
                values[i] = value
            table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return table


def with_failures(table, errors: Mapping[int, str], stages: Mapping[int, str]):
    """A pyarrow table with the rows in `errors` failed: that error, at the stage in `stages`."""
    return with_cells(table, {"status": dict.fromkeys(errors, STATUS_FAILED), "error": errors, "failed_stage": stages})


# Chaos testing of the real retry and isolation paths (like Ray's own RAY_testing_* variables):
# "images:art-0001,response_scores:x" makes stage `images` raise on row art-0001, and so on.
FAULTS_ENV = "SYNTHALIGN_INJECT_FAULTS"
DELAYS_ENV = "SYNTHALIGN_INJECT_DELAYS"
# "image_scores:art-0001" makes the process running stage `image_scores` on a batch holding row art-0001
# exit at once, as a preempted node or an OOM kill would: Ray's actor restarts and task retries are what
# is tested, not our row isolation.
CRASHES_ENV = "SYNTHALIGN_INJECT_CRASHES"


class InjectedFault(RuntimeError):
    """Raised by a stage on a row named in SYNTHALIGN_INJECT_FAULTS."""


def injected_faults(stage: str, variable: str = FAULTS_ENV) -> set[str]:
    pairs = (item.split(":", 1) for item in os.environ.get(variable, "").split(",") if ":" in item)
    return {row_id for name, row_id in pairs if name == stage}


def injected_delay(stage: str, row_ids: set[str]) -> float:
    """Seconds a stage waits before a batch holding one of the rows named in SYNTHALIGN_INJECT_DELAYS
    ("pairs:weather-0001=30,..."): holds one block back, e.g. so a test can kill a run between shards."""
    delays = [item.rsplit("=", 1) for item in injected_faults(stage, DELAYS_ENV) if "=" in item]
    return max((float(seconds) for row_id, seconds in delays if row_id in row_ids), default=0.0)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# A branch, tag or commit sha after `@`: git ref-name characters, `/`-separated parts (`refs/pr/1`).
_REVISION = re.compile(r"^[\w.+=-]+(/[\w.+=-]+)*$")
_PATH_PREFIXES = ("/", "./", "../", "~")
REVISION_SEPARATOR = "@"


class StrictModel(BaseModel):
    """Unknown keys are errors: a typo in a config must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_model_ref(ref: str) -> str:
    """A model reference is `zoo:NAME`, a local folder, or a hub id (`org/name`, or `org/name@REVISION`
    pinned to a branch, tag or commit sha)."""
    if ref.startswith(ZOO_PREFIX):
        name = ref[len(ZOO_PREFIX) :]
        if REVISION_SEPARATOR in name:
            raise ValueError(f"zoo model {ref!r}: a zoo model takes no @REVISION (only a hub id does: org/name@REVISION)")
        if name not in zoo.BUILDERS:
            raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(sorted(zoo.BUILDERS))}")
        return ref
    if Path(ref).expanduser().exists():
        return ref
    repo_id, revision = split_revision(ref)
    if REVISION_SEPARATOR in ref and (ref.startswith(_PATH_PREFIXES) or Path(repo_id).expanduser().exists()):
        raise ValueError(f"model path {ref!r} does not exist (a local folder takes no @REVISION: only a hub id does, org/name@REVISION)")
    if revision is not None and _HUB_ID.match(repo_id) and not _REVISION.match(revision):
        what = "nothing after @" if not revision else f"{revision!r} is not a revision"
        raise ValueError(f"hub model {ref!r}: {what} (name a branch, tag or commit sha: org/name@REVISION)")
    if not is_hub_id(ref):
        raise ValueError(f"model path {ref!r} does not exist")
    if hub_offline(os.environ) and not _in_hub_cache(repo_id, revision):
        what = f"hub model {repo_id!r}" + (f" at revision {revision!r}" if revision else "")
        raise ValueError(f"{what} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    return ref


def split_revision(ref: str) -> tuple[str, str | None]:
    """A hub reference's repo id and revision: `org/name@REV` -> ("org/name", "REV"), `org/name` ->
    ("org/name", None). The revision is everything after the first `@` (a repo id holds none; a revision
    may hold `/`, as `refs/pr/1` does), and "" for a reference ending in `@`. `zoo:NAME`, a path (`/`, `./`,
    `../`, `~`) and a folder that exists are returned whole, with no revision: only hub ids take one."""
    if ref.startswith((ZOO_PREFIX, *_PATH_PREFIXES)) or REVISION_SEPARATOR not in ref or Path(ref).expanduser().exists():
        return ref, None
    repo_id, revision = ref.split(REVISION_SEPARATOR, 1)
    return repo_id, revision


def is_hub_id(ref: str) -> bool:
    """A reference that names a hub model (`org/name`, `org/name@REVISION`): neither `zoo:NAME` nor a path."""
    if ref.startswith((ZOO_PREFIX, *_PATH_PREFIXES)) or Path(ref).expanduser().exists():
        return False
    repo_id, revision = split_revision(ref)
    if revision is not None and Path(repo_id).expanduser().exists():
        return False  # a local folder with an @REVISION, which check_model_ref refuses
    return bool(_HUB_ID.match(repo_id)) and (revision is None or bool(_REVISION.match(revision)))


def hub_offline(environ) -> bool:
    """HF_HUB_OFFLINE is set in `environ`: nothing may ask the hub."""
    return environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")


def _in_hub_cache(repo_id: str, revision: str | None = None) -> bool:
    """The model is in the local HF cache; with a revision, that revision is: a branch or tag recorded in
    the cache's refs, or a commit sha of a cached snapshot (what an offline download can resolve)."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = [repo for repo in scan_cache_dir().repos if repo.repo_id == repo_id and repo.repo_type == "model"]
    except Exception:  # no cache folder at all
        return False
    if revision is None:
        return bool(repos)
    return any(revision in repo.refs or any(r.commit_hash == revision for r in repo.revisions) for repo in repos)


ModelRef = Annotated[str, AfterValidator(check_model_ref)]


def model_source(ref: str) -> str:
    """What a model library loads for a reference: a zoo model's folder (built on first use), else the
    reference as is (a local folder, or a hub id that the library fetches on the node that loads it; a
    pinned one keeps its `@REVISION`: `pretrained_source` and `split_revision` take it apart)."""
    return zoo.resolve(ref)


def pretrained_source(ref: str) -> tuple[str, dict[str, str]]:
    """(what `from_pretrained` loads, its keyword arguments) for a reference: a zoo model's folder (built
    on first use) or a local folder, with none; a hub repo id, with `revision` where the reference pins
    one. `from_pretrained` then fetches only the files it reads, at that revision, into this node's cache."""
    repo_id, revision = split_revision(model_source(ref))
    return repo_id, ({"revision": revision} if revision else {})


def adapter_base(adapter_config: dict) -> str | None:
    """The base model a PEFT adapter_config.json names: its base_model_name_or_path, pinned at its
    `revision` (which training records for a pinned hub model) as `org/name@REV`."""
    base, revision = adapter_config.get("base_model_name_or_path"), adapter_config.get("revision")
    return f"{base}{REVISION_SEPARATOR}{revision}" if base and revision and is_hub_id(base) else base


def local_model_folder(ref: str) -> Path | None:
    """The folder of a model already on this machine's disk without building or downloading anything: a
    built zoo model or a local folder. None for a hub id and a zoo model not built yet."""
    if ref.startswith(ZOO_PREFIX):
        name = ref[len(ZOO_PREFIX) :]
        return zoo.model_dir(name) if zoo.is_built(name) else None
    local = Path(ref).expanduser()
    return local if local.exists() else None


# Weight files of a hub repository, left out of a download that needs only a model's configs and
# tokenizer/processor files (`resolve_model_path(ref, weights=False)`).
WEIGHT_FILES = ["*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.msgpack", "*.onnx"]


def resolve_model_path(ref: str, *, weights: bool = True) -> str:
    """The local folder behind a model reference (builds zoo models, fetches hub ids into the HF cache of
    this node: the whole repository, or with `weights=False` all but its weight files, at the reference's
    revision, else at its default branch)."""
    local = Path(model_source(ref)).expanduser()
    if local.exists():
        return str(local)
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(ref)
    return snapshot_download(repo_id, revision=revision, ignore_patterns=None if weights else WEIGHT_FILES)


class ReplicasConfig(StrictModel):
    """How many replicas of a model an autoscaling Ray Data pool runs, and rows per batch."""

    min_actors: int = Field(1, ge=1, description="replicas kept alive")
    max_actors: int = Field(1, ge=1, description="replicas Ray Data may scale up to")
    batch_size: int = Field(4, ge=1, description="rows (prompts) per batch handed to one replica")
    accelerator_type: str | None = Field(
        None,
        description="Ray accelerator type every replica needs, e.g. A100 or L4 (the node resource "
        "`accelerator_type:A100`), so that each stage lands on the GPU kind it was sized for",
    )

    @model_validator(mode="after")
    def _min_le_max(self):
        if self.min_actors > self.max_actors:
            raise ValueError(f"min_actors ({self.min_actors}) > max_actors ({self.max_actors})")
        return self
