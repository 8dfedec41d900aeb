"""Typed run configuration: YAML file + `--set a.b=c` overrides, validated whole before anything starts.

Sections are named after the stages (`prompts`, `images`, `image_scores`, `instructions`, `responses`,
`response_scores`, the optional `judge`, `pairs`) plus `resources`; each stage module defines its own section model. Unknown keys, bad values, missing model paths and unreadable
inputs raise `ConfigError`, whose message names the file and the dotted field, e.g.
``configs/tiny.yaml: images.guidance_scales: guidance scales must be > 1 ...``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from synthalign_ray.stages.chat import ChatModelConfig
from synthalign_ray.errors import UserError
from synthalign_ray.base import StrictModel
from synthalign_ray.stages.image_scores import ImageScoresConfig
from synthalign_ray.stages.images import ImagesConfig
from synthalign_ray.stages.instructions import InstructionsConfig
from synthalign_ray.stages.judge import JudgeConfig
from synthalign_ray.stages.pairs import PairsConfig
from synthalign_ray.stages.prompts import PromptsConfig
from synthalign_ray.stages.response_scores import ResponseScoresConfig
from synthalign_ray.stages.responses import ResponsesConfig


M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError, ValueError):
    """A user error in a config file or override: printed without a traceback by the CLI."""


# Environment variable names whose values must not be written down (resources.env is, in the manifest).
SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)


class WorkerEnvironment(StrictModel):
    """A section's `env` (written down with the run's records, so no secrets) and `secret_env` (names only:
    the values travel from the driver's environment to the workers)."""

    SECTION: ClassVar[str]
    WRITTEN_TO: ClassVar[str]

    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment of every worker; the values are written down with the run (manifest, dataset "
        "card, training run record), so a name that looks secret (*TOKEN*, *KEY*, *SECRET*, *PASSWORD*) is "
        "refused: use secret_env",
    )
    secret_env: list[str] = Field(
        default_factory=list,
        description="names of variables forwarded from the driver's (or the submitted job's) environment to "
        "every worker, e.g. HF_TOKEN for a gated hub model; only the names are ever written anywhere",
    )

    @field_validator("env")
    @classmethod
    def _no_secret_values(cls, env: dict[str, str]) -> dict[str, str]:
        secret = sorted(name for name in env if SECRET_NAME.search(name))
        if secret:
            raise ValueError(
                f"{', '.join(secret)} {'looks like a secret' if len(secret) == 1 else 'look like secrets'}: values "
                f"in {cls.SECTION}.env are written to {cls.WRITTEN_TO}; set the variable in the driver's environment "
                f"and list its name in {cls.SECTION}.secret_env instead"
            )
        return env

    def secret_values(self) -> dict[str, str]:
        """The driver's values of the secret_env variables; ConfigError naming those not set."""
        missing = [name for name in self.secret_env if not os.environ.get(name)]
        if missing:
            raise ConfigError(f"{self.SECTION}.secret_env: {', '.join(missing)} not set in the driver's environment")
        return {name: os.environ[name] for name in self.secret_env}


class ResourcesConfig(WorkerEnvironment):
    SECTION: ClassVar[str] = "resources"
    WRITTEN_TO: ClassVar[str] = "the manifest and the dataset card"

    ray_address: str | None = Field(
        None,
        description="None: join RAY_ADDRESS's cluster (as under `ray job submit`), else a cluster `ray start` "
        "runs on this machine unless num_cpus is set, else start a local Ray",
    )
    num_cpus: int | None = Field(
        None,
        ge=1,
        description="CPUs of a local Ray of the run's own, started even if a `ray start` cluster runs on this "
        "machine; ignored when joining a cluster (ray_address or RAY_ADDRESS set)",
    )
    shared_filesystem: bool = Field(
        False,
        description="a local --output path is one that every node of the cluster mounts at the same place (NFS, "
        "EFS, Filestore). Shards are written on whichever node ran their block, so on a cluster of more than one "
        "node a local output is refused unless this says it is shared; s3:// and gs:// outputs need nothing",
    )
    rows_per_block: int = Field(
        16,
        ge=1,
        description="prompts per Ray Data block: the unit that streams through the stages and is committed "
        "to the output at once (a row with its K images is megabytes at real resolutions)",
    )
    max_lost_blocks: int = Field(
        10,
        ge=-1,
        description="blocks Ray Data may give up on (a task failed past Ray's own retries, e.g. an object lost "
        "with its node that could not be rebuilt) before the run aborts; their rows are recorded failed "
        "(failed_stage `ray`) and tried again by a rerun. -1: no limit, 0: the first lost block aborts the run",
    )
    lock_stale_seconds: float = Field(
        300,
        gt=0,
        description="a run holds its output's lease, refreshed every quarter of this; another run on the same "
        "output is refused while the lease's heartbeat is younger than this, and takes it over (with a "
        "warning) once it is older: the holder was killed without releasing it",
    )
    max_failed_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="share of the run's rows that may end failed: above it `generate` exits 1 with a summary per "
        "stage (its rows and most common errors), after writing everything; a rerun retries the failed rows. "
        "1: never",
    )
    blocks_per_wave: int | None = Field(
        None,
        ge=1,
        description="blocks per Ray Data execution: a run of more blocks goes in waves of this many, one "
        "after the other, each driven by a process of its own. That process keeps tens of KB per block of "
        "its execution (per-block stats, object ownership), so this bounds its memory at millions of rows; "
        "each wave starts its pools afresh (models load again) and drains before the next. None: one execution",
    )
    object_store_memory: int | None = Field(
        None,
        ge=1,
        description="bytes of object store the run's blocks in flight may take (Ray Data's "
        "execution_options.resource_limits): stages upstream of a slow one wait instead of queueing more "
        "blocks. None: Ray Data's default, a share of the cluster's object store",
    )

    def check_secret_environment(self) -> None:
        """Every secret_env variable is set in this (the driver's) environment, before anything starts."""
        self.secret_values()


class ReportSettings(StrictModel):
    """`synthalign report` at the end of `generate` (the same options as the command)."""

    license: str = Field("unknown", description="license id for the dataset card, e.g. cc-by-4.0")
    name: str | None = Field(None, description="the card's pretty_name and title")
    sample_size: int = Field(200, ge=0, description="pairs shown in index.html")
    near_miss_margin: float | None = Field(None, description="default: the margins' lower quartile")


class SynthAlignConfig(StrictModel):
    seed: int = Field(0, ge=0, description="run seed: every image seed derives from it and the prompt id")
    prompts: PromptsConfig
    images: ImagesConfig
    image_scores: ImageScoresConfig
    instructions: InstructionsConfig = Field(default_factory=InstructionsConfig)
    responses: ResponsesConfig
    response_scores: ResponseScoresConfig
    judge: JudgeConfig | None = Field(None, description="optional image-aware judge of the answers (beyond the paper)")
    pairs: PairsConfig = Field(default_factory=PairsConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    report: ReportSettings | None = Field(None, description="write the dataset card and report (RUN/report) at the end")

    @model_validator(mode="after")
    def _ranking_has_its_scores(self):
        if self.pairs.rank_by != "reward" and self.judge is None:
            raise ValueError(f"pairs.rank_by={self.pairs.rank_by} needs a `judge` section (the judge's scores)")
        return self

    def chat_models(self) -> dict[str, ChatModelConfig]:
        """The LLM stages' models by config field (instruction writer, judge), where configured."""
        models = {}
        if self.instructions.source == "llm":
            models["instructions.llm"] = self.instructions.llm
        if self.judge is not None:
            models["judge.model"] = self.judge.model
        return models


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error in one line, with the line and column it points at (its own message spans several
    lines and repeats the source)."""
    mark = getattr(error, "problem_mark", None)
    problem = " ".join(filter(None, [getattr(error, "context", None), getattr(error, "problem", None)])) or str(error)
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def parse_override(text: str) -> tuple[list[str], Any]:
    """`images.guidance_scales=[5,7]` -> (["images", "guidance_scales"], [5, 7]); values are YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. images.steps=4")
    path = key.strip().split(".")
    if any(not part for part in path):
        raise ConfigError(f"--set {text!r}: empty part in key {key!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {yaml_problem(e)}") from None
    return path, parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(path[: i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        message = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"] == "missing":
            message = "required, but missing"
        lines.append(f"{source}: {field}: {message}")
    return "\n".join(lines)


def load_config(path: str | Path, overrides: list[str] | None = None, schema: type[M] = SynthAlignConfig) -> M:
    """The config in a YAML file with `--set` overrides applied, validated as `schema` (the generation
    config by default; other commands pass theirs)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML, {yaml_problem(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    data = apply_overrides(data, overrides or [])
    # Relative input paths are relative to the config file's folder when they exist there: a config
    # and its input files travel together (e.g. `ray job submit --working-dir`).
    for section in ("prompts", "instructions"):
        settings = data.get(section)
        if isinstance(settings, dict) and isinstance(settings.get("path"), str):
            relative = settings["path"]
            candidate = path.parent / relative
            if "://" not in relative and not Path(relative).is_absolute() and candidate.is_file():
                settings["path"] = str(candidate)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None
