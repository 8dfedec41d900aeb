"""How many replicas each GPU stage gets on N GPUs, from measured (or estimated) per-stage throughput.

Every row passes every stage (images, image scores, each LVLM of `responses`, the reward model, and
the judge or LLM instruction writer when they are vLLM pools), so the pipeline's steady-state rate is
that of its slowest stage: with n_s replicas of stage s, each holding g_s GPUs and moving r_s rows/s
(= batch_size / seconds_per_batch of the profile), the pipeline moves at most

    bound = min_s n_s * r_s   rows/s                                          (`split_bound`)

`best_split` picks integers n_s >= 1 with sum_s n_s * g_s <= N that maximize this bound, exactly: the
optimum is n * r_s for some stage s and count n (the stage that sets the minimum), and reaching a
rate T costs sum_s g_s * max(1, ceil(T / r_s)) GPUs, which grows with T; a binary search over the
sorted candidates n * r_s (n = 1 .. N / g_s) finds the largest T that fits. Of the splits reaching it,
the one with the fewest GPUs is returned (every stage gets the least replicas that reach T); GPUs left
over cannot raise the bound and are reported as idle. `equal_split` is the naive comparison: the N GPUs
shared equally among the GPU stages.

A profile (`Profile`, a YAML file) holds the per-stage measurements plus the GPU's price; `plan_config`
checks it against a config's GPU stages and writes the config with each pool's replicas (min_actors =
max_actors = n_s: a fixed split, so Ray Data's pool autoscaling cannot hand the GPUs to the wrong
stage first), its measured num_gpus and batch_size (a vLLM replica of several GPUs gets
tensor_parallel_size = its GPUs), and the reasons as comments.

Only GPU stages are planned: the model-free stages (image selection, file/template instructions,
pairs, the shard writes) run as CPU tasks and are assumed never to be the bottleneck.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator

from synthalign_ray.errors import UserError
from synthalign_ray.base import StrictModel

# A candidate rate T = n * r_s divided by r_s is n up to float error: without a tolerance, ceil would
# make it n + 1 and the optimum would look infeasible.
_RELATIVE_TOLERANCE = 1e-9


class PlanError(UserError, ValueError):
    """A profile or plan that cannot work (bad field, missing stage, too few GPUs), with a clear message."""


# --- the profile ----------------------------------------------------------------------------------


class StageProfile(StrictModel):
    """One GPU stage's replica: how long it takes per batch of rows, on how many GPUs."""

    name: str = Field(description="the config's stage: images, image_scores, response_scores, judge, "
                      "instructions, or the `name` of a model in `responses`")
    seconds_per_batch: float = Field(gt=0, description="wall seconds one replica takes per batch (steady state)")
    batch_size: int = Field(ge=1, description="rows (prompts) per batch that seconds_per_batch was measured with")
    num_gpus: float = Field(gt=0, description="GPUs one replica holds")
    note: str | None = Field(None, description="where the number comes from")

    @field_validator("num_gpus")
    @classmethod
    def _ray_gpu_amount(cls, gpus: float) -> float:
        if gpus > 1 and gpus != int(gpus):
            raise ValueError(f"{gpus}: Ray accepts a fraction of one GPU or a whole number of GPUs")
        return gpus

    @property
    def rows_per_s(self) -> float:
        """Rows per second of one replica."""
        return self.batch_size / self.seconds_per_batch


class GpuPrice(StrictModel):
    on_demand: float = Field(ge=0, description="USD per GPU-hour, on demand")
    spot: float = Field(ge=0, description="USD per GPU-hour, spot / preemptible")


class ProfileSource(StrictModel):
    kind: Literal["estimate", "measured"]
    how: str = Field(min_length=1, description="how the numbers were obtained")


class Profile(StrictModel):
    """Per-stage throughput of one replica on one GPU type, and that GPU's price."""

    gpu: str = Field(min_length=1, description="GPU type the numbers hold for, e.g. A100-80GB")
    gpu_hour_usd: GpuPrice
    source: ProfileSource
    stages: list[StageProfile] = Field(min_length=1)

    @field_validator("stages")
    @classmethod
    def _unique(cls, stages: list[StageProfile]) -> list[StageProfile]:
        names = [s.name for s in stages]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"stage(s) {twice} named more than once")
        return stages

    def stage(self, name: str) -> StageProfile:
        return next(s for s in self.stages if s.name == name)


def load_profile(path: str | Path) -> Profile:
    """A profile YAML, validated; errors name the file and the field."""
    from synthalign_ray.config import _format_errors, yaml_problem

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise PlanError(f"cannot read profile {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path}: not valid YAML, {yaml_problem(e)}") from None
    try:
        return Profile.model_validate(data if data is not None else {})
    except ValidationError as e:
        raise PlanError(_format_errors(str(path), e)) from None


def write_profile(profile: Profile, path: str | Path, header: str = "") -> None:
    comments = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    Path(path).write_text(comments + yaml.safe_dump(profile.model_dump(mode="json", exclude_none=True), sort_keys=False))


# --- the split (pure) -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageRate:
    """What the split needs of a stage: GPUs per replica and rows/s per replica."""

    name: str
    gpus: float
    rows_per_s: float


def split_bound(stages: list[StageRate], replicas: dict[str, int]) -> float:
    """Analytic upper bound of the pipeline's rows/s with these replicas: its slowest stage's rate."""
    return min(replicas[s.name] * s.rows_per_s for s in stages)


def split_gpus(stages: list[StageRate], replicas: dict[str, int]) -> float:
    return sum(replicas[s.name] * s.gpus for s in stages)


def _replicas_for(stages: list[StageRate], rate: float) -> dict[str, int]:
    """The fewest replicas of each stage (at least one) that reach `rate` rows/s."""
    return {
        s.name: max(1, math.ceil(rate / s.rows_per_s * (1 - _RELATIVE_TOLERANCE))) for s in stages
    }


def _check_fits(stages: list[StageRate], gpus: float) -> None:
    if not stages:
        raise PlanError("no GPU stages to plan")
    for s in stages:
        if s.gpus <= 0 or s.rows_per_s <= 0:
            raise PlanError(f"stage {s.name!r}: GPUs per replica and rows/s must be > 0 (got {s.gpus}, {s.rows_per_s})")
    need = 0.0
    for s in stages:
        need += s.gpus
        if need > gpus + 1e-9:
            one_each = ", ".join(f"{t.name} {t.gpus:g}" for t in stages)
            raise PlanError(
                f"{gpus:g} GPUs cannot hold one replica of each GPU stage: none left for stage {s.name!r} "
                f"(one replica of each takes {sum(t.gpus for t in stages):g} GPUs: {one_each})"
            )


def best_split(stages: list[StageRate], gpus: float) -> dict[str, int]:
    """Replicas per stage (>= 1 each, sum of replicas * GPUs <= `gpus`) maximizing min_s n_s * r_s.

    Exact: the candidates n * r_s, sorted, are binary-searched for the largest one whose cheapest split
    fits. Of the optimal splits, the one using the fewest GPUs."""
    _check_fits(stages, gpus)
    candidates = sorted({n * s.rows_per_s for s in stages for n in range(1, int(gpus // s.gpus) + 1)})

    def fits(rate: float) -> bool:
        return split_gpus(stages, _replicas_for(stages, rate)) <= gpus + 1e-9

    # fits() is monotone (True then False) over the sorted candidates; the smallest one always fits.
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(candidates[mid]):
            lo = mid
        else:
            hi = mid - 1
    return _replicas_for(stages, candidates[lo])


def equal_split(stages: list[StageRate], gpus: float) -> dict[str, int]:
    """The naive split: each GPU stage gets an equal share of the GPUs (whole GPUs; the remainder goes one
    each to the first stages, in config order), and as many replicas as its share holds."""
    _check_fits(stages, gpus)
    share, extra = divmod(int(gpus), len(stages))
    replicas = {}
    for i, s in enumerate(stages):
        budget = share + (1 if i < extra else 0)
        replicas[s.name] = int(budget // s.gpus + 1e-9)
        if replicas[s.name] < 1:
            raise PlanError(
                f"equal split of {gpus:g} GPUs over {len(stages)} stages gives stage {s.name!r} {budget} GPU(s), "
                f"less than one replica ({s.gpus:g})"
            )
    return replicas


# --- what a cluster file can hold -----------------------------------------------------------------


@dataclass(frozen=True)
class ClusterNodes:
    """The GPU worker nodes of the largest cluster a Ray launcher YAML lets the autoscaler start: each
    node type up to its max_workers, the file's max_workers in all, the types with most GPUs first."""

    source: str
    nodes: list[tuple[str, float]]  # (node type, its GPUs), largest first

    @property
    def gpus(self) -> float:
        return sum(gpus for _, gpus in self.nodes)

    def describe(self) -> str:
        counts = Counter(self.nodes)
        kinds = ", ".join(f"{n} x {name} ({gpus:g} GPU{'s' if gpus != 1 else ''})" for (name, gpus), n in counts.items())
        return f"{self.source} holds at most {self.gpus:g} GPUs on {len(self.nodes)} GPU nodes: {kinds}"


def launcher_nodes(path: str | Path) -> ClusterNodes:
    """The GPU nodes a `ray up` launcher YAML allows at most (its available_node_types' resources.GPU)."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PlanError(f"--cluster {path}: {e}") from None
    types = config.get("available_node_types") if isinstance(config, dict) else None
    if not isinstance(types, dict):
        raise PlanError(f"--cluster {path}: no available_node_types; a Ray cluster launcher YAML is expected")
    limit = int(config.get("max_workers", sum(int(t.get("max_workers", 0)) for t in types.values())))
    gpu_types = sorted(
        (
            (float((spec.get("resources") or {}).get("GPU", 0)), name, int(spec.get("max_workers", limit)))
            for name, spec in types.items()
            if name != config.get("head_node_type")
        ),
        reverse=True,
    )
    nodes: list[tuple[str, float]] = []
    for gpus, name, count in gpu_types:
        if gpus > 0:
            nodes += [(name, gpus)] * max(0, min(count, limit - len(nodes)))
    if not nodes:
        raise PlanError(f"--cluster {path}: no worker node type with resources.GPU and max_workers above 0")
    return ClusterNodes(str(path), nodes)


def unplaced_stage(stages: list[StageRate], replicas: dict[str, int], nodes: list[float]) -> str | None:
    """The stage of the first replica that finds no node with room when the replicas, largest first, go
    each to the first node with room (a replica's GPUs are on one node); None when all are placed."""
    free = sorted(nodes, reverse=True)
    for stage in sorted(stages, key=lambda s: -s.gpus):
        for _ in range(replicas[stage.name]):
            node = next((i for i, room in enumerate(free) if room >= stage.gpus - 1e-9), None)
            if node is None:
                return stage.name
            free[node] -= stage.gpus
    return None


def split_for_cluster(stages: list[StageRate], cluster: ClusterNodes, gpus: float | None) -> tuple[float, dict[str, int]]:
    """The best split of `gpus` (default: all the cluster can hold) whose replicas fit the cluster's nodes:
    where whole replicas leave GPUs of a node unusable, one GPU fewer is planned until they fit."""
    largest = max(g for _, g in cluster.nodes)
    for stage in stages:
        if stage.gpus > largest + 1e-9:
            raise PlanError(
                f"stage {stage.name!r} takes {stage.gpus:g} GPUs per replica, more than the largest node of "
                f"{cluster.source} has ({largest:g})"
            )
    budget = cluster.gpus if gpus is None else gpus
    if budget > cluster.gpus + 1e-9:
        raise PlanError(f"--gpus {gpus:g}: {cluster.describe()}. Plan for at most that, or raise its max_workers")
    node_gpus = [g for _, g in cluster.nodes]
    while True:
        replicas = best_split(stages, budget)  # fails, naming a stage, once one replica of each is too many
        if unplaced_stage(stages, replicas, node_gpus) is None:
            return budget, replicas
        budget = math.ceil(budget) - 1


# --- a config's GPU stages ------------------------------------------------------------------------


@dataclass(frozen=True)
class PoolRef:
    """A GPU stage of a config: its profile name, its dotted config path, and its pool."""

    name: str
    path: str  # e.g. "responses.models.1" (the pool is at PATH.pool)
    pool: Any  # ActorPoolConfig or VLLMPoolConfig


def gpu_pools(cfg) -> list[PoolRef]:
    """The config's model stages that a GPU cluster runs on GPUs, in pipeline order.

    Every model stage is one: images, image_scores, each responses model, response_scores, and the
    judge / LLM instruction writer when served by vLLM (an OpenAI-compatible endpoint needs no GPU of
    ours). A pool's num_gpus in the config does not decide it (the tiny configs run them on CPU): the
    profile says how many GPUs a replica takes."""
    from synthalign_ray.stages import graph

    return [PoolRef(stage.profile_name, stage.pool_path, stage.pool) for stage in graph.build(cfg) if stage.profile_name]


def stage_rates(cfg, profile: Profile) -> list[StageRate]:
    """The profile's numbers for each GPU stage of the config, in pipeline order; a stage the profile
    lacks is an error naming it."""
    names = [p.name for p in profile.stages]
    rates = []
    for ref in gpu_pools(cfg):
        if ref.name not in names:
            raise PlanError(
                f"profile has no stage {ref.name!r} (config: {ref.path}); its stages: {', '.join(names)}"
            )
        stage = profile.stage(ref.name)
        rates.append(StageRate(ref.name, stage.num_gpus, stage.rows_per_s))
    return rates


def unused_profile_stages(cfg, profile: Profile) -> list[str]:
    planned = {ref.name for ref in gpu_pools(cfg)}
    return [s.name for s in profile.stages if s.name not in planned]


# --- a plan: the split, its table, and the config written with it ---------------------------------


@dataclass
class Plan:
    gpus: float
    stages: list[StageRate]
    replicas: dict[str, int]
    equal: dict[str, int] | None  # the equal split, when N holds one replica per stage in it

    @property
    def bound(self) -> float:
        return split_bound(self.stages, self.replicas)

    @property
    def equal_bound(self) -> float | None:
        return None if self.equal is None else split_bound(self.stages, self.equal)

    @property
    def used_gpus(self) -> float:
        return split_gpus(self.stages, self.replicas)

    def table(self) -> str:
        """Why each stage gets its replicas: per-replica rate, pool rate, its share of the bound."""
        lines = [
            f"{'stage':26s} {'GPU/rep':>7s} {'rows/s/rep':>10s} {'replicas':>8s} {'GPUs':>6s} {'rows/s':>9s} "
            f"{'equal':>6s} {'eq rows/s':>9s}"
        ]
        for s in self.stages:
            n = self.replicas[s.name]
            eq = "-" if self.equal is None else str(self.equal[s.name])
            eq_rate = "-" if self.equal is None else f"{self.equal[s.name] * s.rows_per_s:9.3f}"
            mark = " <- bottleneck" if math.isclose(n * s.rows_per_s, self.bound, rel_tol=1e-9) else ""
            lines.append(
                f"{s.name:26s} {s.gpus:7g} {s.rows_per_s:10.4f} {n:8d} {n * s.gpus:6g} {n * s.rows_per_s:9.3f} "
                f"{eq:>6s} {eq_rate:>9s}{mark}"
            )
        lines.append(
            f"GPUs: {self.used_gpus:g} of {self.gpus:g} used ({self.gpus - self.used_gpus:g} idle: "
            "no stage can take them and raise the slowest stage's rate)"
        )
        lines.append(f"bound (slowest stage): {self.bound:.4f} rows/s = {3600 * self.bound:.0f} rows/h")
        if self.equal_bound is not None:
            lines.append(
                f"equal split's bound: {self.equal_bound:.4f} rows/s; plan / equal: {self.bound / self.equal_bound:.2f}"
            )
        else:
            lines.append("equal split: not possible (a stage's equal share is less than one replica)")
        return "\n".join(lines)


def make_plan(cfg, profile: Profile, gpus: float | None, cluster: ClusterNodes | None = None) -> Plan:
    """The plan for `gpus`, or for the cluster's nodes when a cluster is given (all it holds by default)."""
    stages = stage_rates(cfg, profile)
    if cluster is not None:
        gpus, replicas = split_for_cluster(stages, cluster, gpus)
    elif gpus is None:
        raise PlanError("give --gpus, --cluster, or both")
    else:
        replicas = best_split(stages, gpus)
    try:
        equal = equal_split(stages, gpus)
    except PlanError:
        equal = None
    return Plan(gpus, stages, replicas, equal)


def replicas_for_split(cfg, profile: Profile, gpus: float, split: str) -> dict[str, int]:
    """Replicas per GPU stage for a named split: plan (best_split), equal, or config (each pool's
    max_actors as the config has it)."""
    stages = stage_rates(cfg, profile)
    if split == "plan":
        return best_split(stages, gpus)
    if split == "equal":
        return equal_split(stages, gpus)
    if split == "config":
        replicas = {ref.name: ref.pool.max_actors for ref in gpu_pools(cfg)}
        need = split_gpus(stages, replicas)
        if need > gpus + 1e-9:
            raise PlanError(f"the config's max_actors take {need:g} GPUs, more than {gpus:g}")
        return replicas
    raise PlanError(f"unknown split {split!r}: plan, equal or config")


def planned_config_data(
    config_path: str | Path, overrides: list[str], cfg, profile: Profile, replicas: dict[str, int], output_path: str | Path
) -> dict:
    """The config file's data (with its --set overrides) with each GPU pool set to its replicas (min =
    max) and the profile's num_gpus and batch_size; input paths that load_config found beside the config
    file are rewritten relative to `output_path`, so they still resolve from there."""
    from synthalign_ray.config import apply_overrides

    data = apply_overrides(yaml.safe_load(Path(config_path).read_text()) or {}, overrides)
    for ref in gpu_pools(cfg):
        node: Any = data
        for part in ref.path.split("."):
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        stage = profile.stage(ref.name)
        planned = {
            "min_actors": replicas[ref.name],
            "max_actors": replicas[ref.name],
            "num_gpus": int(stage.num_gpus) if stage.num_gpus == int(stage.num_gpus) else stage.num_gpus,
            "batch_size": stage.batch_size,
        }
        if hasattr(ref.pool, "tensor_parallel_size") and stage.num_gpus > 1:
            # A vLLM worker holds at most one GPU: a replica of several GPUs is split across that many.
            planned["tensor_parallel_size"] = int(stage.num_gpus)
        node["pool"] = {**planned, **{k: v for k, v in (node.get("pool") or {}).items() if k not in planned}}
    for section in ("prompts", "instructions"):
        settings, resolved = data.get(section), getattr(getattr(cfg, section), "path", None)
        if isinstance(settings, dict) and resolved is not None and settings.get("path") != resolved:
            settings["path"] = os.path.relpath(Path(resolved).resolve(), Path(output_path).resolve().parent)
    return data


def write_planned_config(
    config_path: str | Path, cfg, profile: Profile, profile_path: str, plan: Plan, output_path: str | Path,
    overrides: list[str] | None = None,
) -> None:
    data = planned_config_data(config_path, overrides or [], cfg, profile, plan.replicas, output_path)
    header = [
        f"Planned by `synthalign plan --config {config_path} --gpus {plan.gpus:g} --profile {profile_path}`.",
        f"Profile: {profile.gpu}, {profile.source.kind}: {profile.source.how.strip()[:160]}",
        "Each GPU pool runs a fixed number of replicas (min_actors = max_actors) chosen so that the slowest",
        "stage is as fast as possible on these GPUs (every row passes every stage, so the slowest stage sets",
        "the pipeline's rate); num_gpus and batch_size are the profile's, which its rates were measured with.",
        "",
        *plan.table().splitlines(),
    ]
    text = "".join(f"# {line}\n" if line else "#\n" for line in header)
    Path(output_path).write_text(text + yaml.safe_dump(data, sort_keys=False))
