"""Calibration: each stage of the pipeline alone, and a measured profile for `synthalign plan`.

    synthalign calibrate --config configs/paper.yaml --prompts 200 --output configs/profiles/mine.yaml

`stages_alone` runs every stage of the pipeline (`stages.graph.build`), in its order, alone on the rows the
stage before it produced (benchmarks/pipeline.py uses it too, to compare the pipeline with its slowest stage).
A stage's rate is its last Ray Data operator's (rows out / first task start to last task end), so model
loading and engine start-up are not in it. `calibrate` runs them with ONE replica per model pool on K
generated prompts, and writes each GPU stage's seconds per batch = batch_size / (rows/s of its one
replica: the rate of its operator with the most task time, e.g. the vLLM engine) into a profile (`plan.Profile`, source: measured). Calibrate on the GPU type you will plan for,
with the batch sizes you will run; on a machine without GPUs, replicas run on the CPU and the profile
says so (num_gpus 1 stands for the replica's one device).
"""

from __future__ import annotations

import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

from synthalign_ray import store
from synthalign_ray.config import SynthAlignConfig
from synthalign_ray.capacity.plan import GpuPrice, PlanError, Profile, ProfileSource, StageProfile, gpu_pools, write_profile
from synthalign_ray.progress import stage_stats


@dataclass
class StageRate:
    stage: str
    rows: int
    operator: str  # the stage's last Ray Data operator, whose rate is the stage's
    rows_per_s: float
    # The stage's model operator, the one with the most task time (the vLLM engine, not the light maps
    # around it, which may see their rows arrive at once or be held back by it), and its rate: what one
    # replica does.
    model_operator: str = ""
    model_rows_per_s: float = 0.0


def stages_alone(cfg: SynthAlignConfig, prompts, sink_output: str) -> list[StageRate]:
    """Each stage of the pipeline (`stages.graph.build`), in its order, alone on the rows the stage before
    it gave.

    `prompts` is the pipeline's input table (`stages.prompts.prompts_table`); the last stage (pairs)
    writes to `sink_output` through the real datasink (benchmarks/pipeline.py checks that the outcome is
    the pipeline's). Each stage's input is the previous stage's materialized output, fed in the same
    blocks and re-read through `from_arrow_refs` so that its stats hold its own operators only."""
    import ray

    from synthalign_ray.stages import graph

    step = cfg.resources.rows_per_block
    blocks = [ray.put(prompts.slice(start, step)) for start in range(0, prompts.num_rows, step)]
    rates: list[StageRate] = []
    stages = graph.build(cfg)
    for stage in stages:
        dataset = stage.apply(ray.data.from_arrow_refs(blocks))
        if stage is stages[-1]:
            dataset.write_datasink(store.StatusSplitDatasink(sink_output))
        else:
            dataset = dataset.materialize()
            blocks = dataset.to_arrow_refs()
        operators = [s for s in stage_stats(dataset.get_stats_summary()) if s.rows_in is not None]  # not the source
        last = operators[-1]
        model = max(operators, key=lambda s: s.busy_s)
        rates.append(StageRate(stage.name, last.rows_out, last.stage, last.rows_per_s, model.stage, model.rows_per_s))
        print(f"  alone: {stage.name}: {last.rows_per_s:.3f} rows/s ({last.stage})", flush=True)
    return rates


def single_replica(cfg: SynthAlignConfig) -> SynthAlignConfig:
    """The config with every GPU stage's pool at one replica (min = max = 1)."""
    data = cfg.model_dump(mode="json")
    for ref in gpu_pools(cfg):
        node = data
        for part in ref.path.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        node["pool"].update(min_actors=1, max_actors=1)
    return SynthAlignConfig.model_validate(data)


def profile_from_rates(cfg: SynthAlignConfig, rates: list[StageRate], *, gpu: str, price: GpuPrice, on_gpu: bool, prompts: int) -> Profile:
    """A measured profile: one entry per GPU stage of `cfg` (one replica each), from its rate alone."""
    from synthalign_ray.stages import graph

    profile_names = {stage.name: stage.profile_name for stage in graph.build(cfg)}
    by_name = {profile_names[r.stage]: r for r in rates if profile_names.get(r.stage) is not None}
    stages = []
    for ref in gpu_pools(cfg):
        rate = by_name[ref.name]
        if rate.model_rows_per_s <= 0:
            raise PlanError(f"stage {ref.name!r} moved no rows in calibration ({rate.model_operator}); give it more prompts")
        gpus = ref.pool.num_gpus
        if gpus is None:  # a vLLM pool's default: one GPU per tensor-parallel worker when there are GPUs
            gpus = float(ref.pool.tensor_parallel_size) if on_gpu else 0.0
        stages.append(
            StageProfile(
                name=ref.name,
                seconds_per_batch=round(ref.pool.batch_size / rate.model_rows_per_s, 4),
                batch_size=ref.pool.batch_size,
                num_gpus=gpus if gpus > 0 else 1,
                note=f"{rate.rows} rows, {rate.model_rows_per_s:.4f} rows/s ({rate.model_operator})"
                + ("" if gpus > 0 else "; ran on the CPU"),
            )
        )
    device = "GPU" if on_gpu else "CPU (no GPU: num_gpus 1 stands for the replica's one device)"
    how = (
        f"synthalign calibrate on {prompts} prompts, {platform.node()}: each stage alone with one replica on {device}; "
        "seconds_per_batch = batch_size / (rows out / first task start to last task end of its model operator, the one with the most task time)"
    )
    return Profile(gpu=gpu, gpu_hour_usd=price, source=ProfileSource(kind="measured", how=how), stages=stages)


def calibrate(cfg: SynthAlignConfig, prompts: int, output: str, *, gpu: str | None = None, price: GpuPrice | None = None,
              work: str | None = None) -> Profile:
    """Run each stage alone on `prompts` generated prompts (one replica per pool) and write the profile."""
    import ray

    from synthalign_ray.pipeline import prepare_zoo_models
    from synthalign_ray.runtime import init_ray
    from synthalign_ray.capacity.simulate import simulation_config, write_prompts
    from synthalign_ray.stages.prompts import prompts_table, read_prompts

    work_dir = Path(work or tempfile.mkdtemp(prefix="calibrate-"))
    cfg = single_replica(simulation_config(cfg, str(write_prompts(work_dir / "prompts.jsonl", prompts))))
    rows, _ = read_prompts(cfg.prompts, cfg.seed)
    prepare_zoo_models(cfg)
    init_ray(cfg.resources, cfg.chat_models().values())
    try:
        on_gpu = ray.cluster_resources().get("GPU", 0) > 0
        rates = stages_alone(cfg, prompts_table(rows), str(work_dir / "stages-alone"))
    finally:
        ray.shutdown()
    if gpu is None:
        gpu = _gpu_name() if on_gpu else f"cpu ({platform.processor() or platform.machine()})"
    profile = profile_from_rates(cfg, rates, gpu=gpu, price=price or GpuPrice(on_demand=0, spot=0), on_gpu=on_gpu, prompts=prompts)
    write_profile(profile, output, header="Measured by `synthalign calibrate`; set gpu_hour_usd to your prices.")
    return profile


def _gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:
        return "gpu"
