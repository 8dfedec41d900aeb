"""Simulation mode, for capacity questions only: a big GPU cluster's Ray Data scheduling, on this machine.

    synthalign simulate --config configs/paper.yaml --profile configs/profiles/paper_a100.yaml \
        --gpus 64 --split plan --rows 20000 --output runs/sim64 --time-scale 0.05

Never the default, never used by a functional test. It runs the real driver path of
`pipeline.generate` (prompt reading, resume, the manifest, `StatusSplitDatasink`, the accounting check)
on `rows` generated prompts, on a local Ray started with `gpus` fake GPUs (`ray.init(num_gpus=N)`: Ray
only counts them; no GPU is touched), with every model stage replaced by a simulated stage: a Ray Data
actor pool whose replicas sleep the profile's `seconds_per_batch` (times `time_scale`) per batch and
hold the profile's GPUs each. The model-free stages (image selection, file/template instructions, pairs)
and the shard writes are the real ones.

What the simulation assumes (and so what it cannot tell):
- A replica's time per batch is constant (the profile's), whatever the batch's content; a partial batch
  (the end of a block) costs a whole batch, as it does on a GPU. No model loading or engine start-up.
- Each replica does one batch at a time. A real vLLM replica overlaps several batches (continuous
  batching); the profile's seconds_per_batch must be its steady-state time per batch at that overlap
  (which is what `synthalign calibrate` measures: rows out / time of a replica alone).
- One simulated actor stands for k replicas of its stage: it asks Ray for k x (GPUs per replica) and
  runs k batches at once in threads (`max_concurrent_calls_per_actor=k` with true multi-threading), so
  the pool has exactly the planned replicas and GPUs, while at most `max_actors` (default 40) Ray actor
  processes run here. A sleeping thread costs no CPU. Ray Data's per-actor queue is k times a real
  replica's (its default is 4 tasks in flight per concurrent call), the same in total.
- A vLLM stage (ray.data.llm: preprocess, chat template, engine, postprocess) is one simulated actor
  pool, an LLM-judge or instruction stage too; pools are fixed (min = max): Ray Data's pool autoscaling
  is not simulated.
- Images are a 1x1 PNG placeholder: object-store and shard bytes are not those of real 1024px images
  (about 1.5 MB each); memory measurements here are about how they grow with rows, not their size.
- Model-free stages run for real on the machine's 2 cores (Ray started with `num_cpus=2`), so they can
  become the bottleneck where on a cluster they would not: use big blocks (`resources.rows_per_block`)
  and a time scale that keeps the rate of Ray Data tasks within what 2 cores schedule.
- Rates are reported in cluster time: rows/s measured here x time_scale.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from synthalign_ray import store
from synthalign_ray.config import SynthAlignConfig
from synthalign_ray.engines.vllm_engine import labelled
from synthalign_ray.capacity.plan import PlanError, Profile, gpu_pools, replicas_for_split, split_bound, stage_rates
from synthalign_ray.zoo import CORPUS

SIMULATION_DIR = "simulation"
SIMULATION_FILE = "simulation.json"
DEFAULT_MAX_ACTORS = 40
CATEGORIES = ("art", "school", "daily", "nature", "city")
# Pairs committed before this share of the run's pairs and after the other are fill and drain.
STEADY_WINDOW = (0.2, 0.8)


def write_prompts(path: str | Path, n: int) -> Path:
    """n distinct prompts (ids `CATEGORY-NNNNNNN`, words from the zoo corpus), JSONL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for i in range(n):
            words = [CORPUS[(7 * i + k * 13) % len(CORPUS)] for k in range(8)]
            category = CATEGORIES[i % len(CATEGORIES)]
            out.write(json.dumps({"id": f"{category}-{i:07d}", "category": category, "prompt": " ".join(words)}) + "\n")
    return path


# --- simulated stage values: the real stages' columns and types, made up ----------------------------


def _placeholder_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (127, 127, 127)).save(buffer, format="PNG")
    return buffer.getvalue()


def _scores(seeds: np.ndarray, k: int, salt: int) -> pa.Array:
    """k distinct-looking scores per row, a deterministic function of the row's seed."""
    grid = (seeds[:, None].astype(np.uint64) * np.uint64(2654435761) + np.arange(k, dtype=np.uint64) * np.uint64(40503 + salt))
    values = ((grid % np.uint64(100003)).astype(np.float64) / 100003.0).astype(np.float32).reshape(-1)
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(seeds) * k + 1, k), pa.int32()), pa.array(values, pa.float32()))


def _repeated_list(value: pa.Scalar, per_row: int, rows: int) -> pa.Array:
    offsets = pa.array(np.arange(0, rows * per_row + 1, per_row), pa.int32())
    return pa.ListArray.from_arrays(offsets, pa.repeat(value, rows * per_row))


def simulated_columns(kind: str, stage: str, cfg: SynthAlignConfig, table: pa.Table) -> list[tuple[pa.Field, pa.Array]]:
    """The columns the real stage `stage` (of `kind`) adds to `table`, with made-up values."""
    from synthalign_ray.stages.instructions import INSTRUCTION_FIELDS
    from synthalign_ray.stages.judge import JUDGE_FIELDS
    from synthalign_ray.store import IMAGE_TYPE

    n = table.num_rows
    seeds = np.asarray(table.column("seed").to_numpy(zero_copy_only=False), dtype=np.int64)
    if kind == "images":
        k = len(cfg.images.guidance_scales)
        image = pa.scalar({"bytes": _placeholder_png(), "path": None}, IMAGE_TYPE)
        scales = pa.scalar(cfg.images.guidance_scales, pa.list_(pa.float32()))
        return [
            (pa.field("guidance_scales", pa.list_(pa.float32())), pa.repeat(scales, n)),
            (pa.field("candidate_images", pa.list_(IMAGE_TYPE)), _repeated_list(image, k, n)),
        ]
    if kind == "image_scores":
        k = len(cfg.images.guidance_scales)
        return [(pa.field(c, pa.list_(pa.float32())), _scores(seeds, k, i)) for i, c in enumerate(cfg.image_scores.score_columns())]
    if kind == "instructions":
        return [
            (INSTRUCTION_FIELDS[0], pa.array([f"Describe this image of {p}." for p in table.column("t2i_prompt").to_pylist()], pa.string())),
            (INSTRUCTION_FIELDS[1], pa.repeat(pa.scalar(f"simulated:{stage}", pa.string()), n)),
        ]
    if kind == "responses":
        from synthalign_ray.stages.responses import RESPONSES_FIELD

        model = next(m for m in cfg.responses.models if m.name == stage)
        before = table.column("responses").to_pylist() if "responses" in table.column_names else [[] for _ in range(n)]
        values = [
            list(previous or [])
            + [
                {"model": stage, "text": f"Simulated answer {j} of {stage} ({seed}).", "finish_reason": "stop", "error": None}
                for j in range(model.samples)
            ]
            for previous, seed in zip(before, seeds.tolist())
        ]
        return [(RESPONSES_FIELD, pa.array(values, RESPONSES_FIELD.type))]
    if kind == "response_scores":
        counts = np.asarray(table.column("responses").combine_chunks().value_lengths().to_numpy(zero_copy_only=False), dtype=np.int64)
        width = int(counts.max()) if n else 0
        flat = (_scores(seeds, max(width, 1), 7).flatten().to_numpy().reshape(n, max(width, 1)) if n else np.zeros((0, 1)))
        scores = pa.array([row[:c].tolist() for row, c in zip(flat, counts)], pa.list_(pa.float32()))
        objective = pa.struct([pa.field(o, pa.float32()) for o in cfg.response_scores.objectives])
        return [
            (pa.field("response_scores", pa.list_(pa.float32())), scores),
            (pa.field("response_objectives", pa.list_(objective)), pa.nulls(n, pa.list_(objective))),
            (pa.field("reward_model", pa.string()), pa.repeat(pa.scalar(cfg.response_scores.model, pa.string()), n)),
        ]
    if kind == "judge":
        counts = table.column("responses").combine_chunks().value_lengths().to_pylist()
        scores = pa.array([[float(1 + (s + j) % 10) for j in range(c or 0)] for s, c in zip(seeds.tolist(), counts)], pa.list_(pa.float32()))
        return [(JUDGE_FIELDS[0], scores), (JUDGE_FIELDS[1], pa.repeat(pa.scalar("simulated", pa.string()), n))]
    raise ValueError(f"no simulated columns for stage kind {kind!r}")


class SimulatedStage:
    """A Ray Data actor standing for `replicas` replicas of a model stage: each call (one batch) sleeps
    the stage's seconds per batch and adds the stage's columns with made-up values. Calls run in
    threads, `replicas` at once (the pool's max_concurrent_calls_per_actor)."""

    def __init__(self, kind: str, stage: str, cfg: SynthAlignConfig, seconds: float, replicas: int, gpus: float, record_dir: str):
        import ray

        self.kind, self.stage, self.cfg, self.seconds = kind, stage, cfg, seconds
        record = {
            "stage": stage,
            "replicas": replicas,
            "gpus": gpus,
            "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }
        store.write_json(store.join(record_dir, f"{stage}-{uuid.uuid4().hex[:8]}.json"), record)

    def __call__(self, table: pa.Table) -> pa.Table:
        time.sleep(self.seconds)
        for column, values in simulated_columns(self.kind, self.stage, self.cfg, table):
            index = table.schema.get_field_index(column.name)  # `responses` grows model by model
            table = table.append_column(column, values) if index < 0 else table.set_column(index, column, values)
        return table


# --- grouping replicas into actors ------------------------------------------------------------------


def _ray_gpu_amount_ok(gpus: float) -> bool:
    return gpus <= 1 or math.isclose(gpus, round(gpus))


def group_replicas(replicas: int, gpus_per_replica: float, max_actors: int) -> tuple[int, int]:
    """(actors, replicas per actor) with actors * per_actor == replicas exactly, actors <= max_actors
    where a divisor allows it (else a single actor), and a GPU ask per actor that Ray accepts."""
    for per_actor in range(1, replicas + 1):
        if replicas % per_actor == 0 and replicas // per_actor <= max_actors and _ray_gpu_amount_ok(per_actor * gpus_per_replica):
            return replicas // per_actor, per_actor
    if _ray_gpu_amount_ok(replicas * gpus_per_replica):
        return 1, replicas
    raise PlanError(f"cannot group {replicas} replicas of {gpus_per_replica:g} GPUs into actors Ray can place")


@dataclass
class SimulatedPool:
    stage: str
    kind: str
    replicas: int
    actors: int
    per_actor: int
    gpus_per_replica: float
    batch_size: int
    seconds_per_batch: float  # the profile's, in cluster time


def simulated_pools(cfg: SynthAlignConfig, profile: Profile, replicas: dict[str, int], max_actors: int) -> list[SimulatedPool]:
    """One simulated pool per GPU stage of the config (the actor budget shared equally among them)."""
    refs = gpu_pools(cfg)
    budget = max(1, max_actors // len(refs))
    pools = []
    for ref in refs:
        stage = profile.stage(ref.name)
        kind = "responses" if ref.path.startswith("responses.") else ref.name
        actors, per_actor = group_replicas(replicas[ref.name], stage.num_gpus, budget)
        pools.append(SimulatedPool(ref.name, kind, replicas[ref.name], actors, per_actor, stage.num_gpus, stage.batch_size, stage.seconds_per_batch))
    return pools


def build_simulated_dataset(
    cfg: SynthAlignConfig, prompts: store.BlockFileDatasource, commits=None, *, pools: list[SimulatedPool], time_scale: float, record_dir: str
):
    """`pipeline.build_dataset`'s graph with every GPU stage a simulated pool (same stages in the same
    order, the model-free ones real, same blocks, the same stage commits and restores)."""
    from ray.data import ActorPoolStrategy

    from synthalign_ray.checkpoints import apply_stages
    from synthalign_ray.pipeline import prompt_blocks
    from synthalign_ray.stages import graph

    by_stage = {p.stage: p for p in pools}

    def simulated(ds, stage: str):
        pool = by_stage[stage]
        return ds.map_batches(
            labelled(SimulatedStage, stage),
            fn_constructor_kwargs=dict(
                kind=pool.kind, stage=stage, cfg=cfg, seconds=pool.seconds_per_batch * time_scale,
                replicas=pool.per_actor, gpus=pool.per_actor * pool.gpus_per_replica, record_dir=record_dir,
            ),
            compute=ActorPoolStrategy(
                size=pool.actors, max_concurrent_calls_per_actor=pool.per_actor, enable_true_multi_threading=True
            ),
            num_gpus=pool.per_actor * pool.gpus_per_replica,
            num_cpus=0,
            batch_size=pool.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )

    def run(ds, stage):
        if stage.profile_name is not None:
            return simulated(ds, stage.profile_name)
        if stage.kind == "task" or stage.name == "instructions":  # an endpoint writing instructions runs for real
            return stage.apply(ds)
        raise PlanError(f"simulate: a {stage.name} on an OpenAI-compatible endpoint is not simulated; use a vLLM one or none")

    return apply_stages(prompt_blocks(prompts), graph.build(cfg), commits, run)


def simulation_config(cfg: SynthAlignConfig, prompts_path: str) -> SynthAlignConfig:
    """The config on the generated prompts: every row kept (no limit), template instructions where the
    config reads a file (which knows none of the generated ids)."""
    if cfg.instructions.source == "llm" and cfg.instructions.llm.backend != "vllm":
        raise PlanError("simulate: LLM instructions from an OpenAI-compatible endpoint are not simulated")
    data = cfg.model_dump(mode="json")
    data["prompts"].update(path=prompts_path, limit=None, format="jsonl")
    if cfg.instructions.source == "file":
        data["instructions"] = {"source": "template"}
    return SynthAlignConfig.model_validate(data)


# --- measuring ----------------------------------------------------------------------------------------


def shard_commits(output: str, folder: str = "pairs") -> list[tuple[float, int]]:
    """(commit time, rows) of every shard in a folder of the run, oldest first: a shard is moved into
    place whole, so its modification time is when its rows were committed."""
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    fs, path = store.filesystem(store.join(output, folder))
    infos = [i for i in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)) if i.path.endswith(".parquet")]
    commits = []
    for info in infos:
        with fs.open_input_file(info.path) as f:
            commits.append((info.mtime.timestamp(), pq.ParquetFile(f).metadata.num_rows))
    return sorted(commits)


def steady_rate(commits: list[tuple[float, int]], window: tuple[float, float] = STEADY_WINDOW) -> float | None:
    """Rows/s of the run's steady state: the slope of the least-squares line through (commit time, rows
    committed so far) over the commits between window[0] and window[1] of the run's rows, so that fill
    and drain are left out. A slope rather than two end points: when all replicas of the slowest stage
    start together, shards commit in waves, and two end points would fall on arbitrary places of two
    waves. None with fewer than 3 commits in the window, or all at one time."""
    total = sum(rows for _, rows in commits)
    points, done = [], 0
    for at, rows in commits:
        done += rows
        if window[0] * total <= done <= window[1] * total:
            points.append((at, done))
    if len(points) < 3 or points[-1][0] <= points[0][0]:
        return None
    times = np.array([t for t, _ in points]) - points[0][0]
    counts = np.array([c for _, c in points], dtype=np.float64)
    return float(np.polyfit(times, counts, 1)[0])


# --- the command --------------------------------------------------------------------------------------


@dataclass
class SimulationResult:
    output: str
    gpus: float
    split: str
    rows: int
    time_scale: float
    replicas: dict[str, int]
    pools: list[dict[str, Any]]
    actors_started: dict[str, dict[str, Any]]
    bound_rows_per_s: float  # cluster time
    steady_pairs_per_s: float | None  # cluster time
    seconds: float
    counts: dict[str, Any] = field(repr=False)

    @property
    def ratio(self) -> float | None:
        return None if self.steady_pairs_per_s is None else self.steady_pairs_per_s / self.bound_rows_per_s

    def table(self) -> str:
        lines = [f"{'stage':26s} {'replicas':>8s} {'actors x per actor':>18s} {'GPUs':>6s} {'started (replicas, GPUs)':>24s}"]
        for pool in self.pools:
            started = self.actors_started.get(pool["stage"], {})
            lines.append(
                f"{pool['stage']:26s} {pool['replicas']:8d} {pool['actors']:>9d} x {pool['per_actor']:<6d} "
                f"{pool['replicas'] * pool['gpus_per_replica']:6g} {started.get('replicas', 0):>14d}, {started.get('gpus', 0):g}"
            )
        steady = "n/a" if self.steady_pairs_per_s is None else f"{self.steady_pairs_per_s:.4f}"
        ratio = "n/a" if self.ratio is None else f"{self.ratio:.3f}"
        lines.append(
            f"{self.gpus:g} fake GPUs, split {self.split}, time scale {self.time_scale:g}: steady state {steady} pairs/s "
            f"(cluster time), bound {self.bound_rows_per_s:.4f} rows/s, achieved / bound {ratio}"
        )
        return "\n".join(lines)


def simulate(
    cfg: SynthAlignConfig,
    profile: Profile,
    *,
    gpus: float,
    rows: int,
    output: str,
    split: str = "plan",
    time_scale: float = 1.0,
    max_actors: int = DEFAULT_MAX_ACTORS,
    overwrite: bool = False,
    object_store_mib: int = 2048,
) -> SimulationResult:
    """Run `pipeline.generate` with simulated model stages on a local Ray with `gpus` fake GPUs."""
    import ray

    from synthalign_ray.pipeline import generate

    if time_scale < 0:
        raise PlanError(f"--time-scale must be >= 0, got {time_scale}")
    if "://" in output:
        raise PlanError("simulate writes to a local folder")
    replicas = replicas_for_split(cfg, profile, gpus, split)
    bound = split_bound(stage_rates(cfg, profile), replicas)
    pools = simulated_pools(cfg, profile, replicas, max_actors)
    sim_dir = store.join(output, SIMULATION_DIR)
    prompts_path = str(Path(output) / SIMULATION_DIR / f"prompts-{rows}.jsonl")
    if not Path(prompts_path).exists():
        write_prompts(prompts_path, rows)
    sim_cfg = simulation_config(cfg, prompts_path)
    record_dir = store.join(sim_dir, "actors", uuid.uuid4().hex[:8])

    if ray.is_initialized():
        raise PlanError("simulate starts its own local Ray with fake GPUs; Ray is already initialized here")
    ray.init(
        address="local",  # a new local Ray of its own, never another session's cluster on this machine
        num_cpus=2,
        num_gpus=gpus,
        object_store_memory=object_store_mib * 1024**2,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the driver's 2 cores have better things to do
        started = time.time()
        build = functools.partial(build_simulated_dataset, pools=pools, time_scale=time_scale, record_dir=record_dir)
        result = generate(sim_cfg, output, config_source=f"simulate:{split}", overwrite=overwrite, build=build)
        seconds = time.time() - started
    finally:
        ray.shutdown()

    sim_rate = steady_rate(shard_commits(output))
    steady = None if sim_rate is None else sim_rate * time_scale
    outcome = SimulationResult(
        output=output,
        gpus=gpus,
        split=split,
        rows=rows,
        time_scale=time_scale,
        replicas=replicas,
        pools=[asdict(p) for p in pools],
        actors_started=actors_started(record_dir),
        bound_rows_per_s=bound,
        steady_pairs_per_s=steady,
        seconds=round(seconds, 2),
        counts=result.counts,
    )
    summary = {k: v for k, v in asdict(outcome).items()} | {
        "profile": profile.model_dump(mode="json"),
        "ratio": outcome.ratio,
        "steady_window": STEADY_WINDOW,
    }
    store.write_json(store.join(sim_dir, SIMULATION_FILE), summary)
    return outcome


def actors_started(record_dir: str) -> dict[str, dict[str, Any]]:
    """Per stage: the actors that started, the replicas they stand for, and the fake GPUs Ray gave them."""
    fs, path = store.filesystem(record_dir)
    import pyarrow.fs as pafs

    out: dict[str, dict[str, Any]] = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        record = store.read_json(info.path)
        stage = out.setdefault(record["stage"], {"actors": 0, "replicas": 0, "gpus": 0.0, "gpu_ids": []})
        stage["actors"] += 1
        stage["replicas"] += record["replicas"]
        stage["gpus"] += record["gpus"]
        stage["gpu_ids"] += record["gpu_ids"]
    return out
