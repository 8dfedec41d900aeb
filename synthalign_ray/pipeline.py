"""Builds and runs the Ray Data graph of a config: one row per prompt, streamed through actor pools, its
stages those of `stages.graph.build`:

    prompts (blocks)-> ImageGenerator (pool) -> ImageScorer (pool) -> ImageSelector (tasks)
                    -> instructions (file/template tasks, or an LLM) -> one vLLM pool per LVLM (ray.data.llm)
                    -> ResponseScorer (pool) -> [judge: a VLM, optional] -> PairBuilder (tasks)
                    -> StatusSplitDatasink (pairs/, dropped/, failed/)

Every selection is row-local (the K images and M answers sit in list columns of their row), so there
is no groupby, shuffle or driver-side collect: memory stays flat as the prompt count grows. A run of
more than `resources.blocks_per_wave` blocks goes in waves, one Ray Data execution each, and each
execution is driven by a Ray worker process of its own (`runtime.run_in_wave_process`), so what an execution
leaves behind goes with that process.

Resume and exactly-once: the committed shards are the record of what is done. A rerun on the same
output reads the ids of `pairs/` and `dropped/` (each shard is moved into place whole, so a killed run
leaves whole shards or none), feeds only the other prompts through, and removes the old `failed/`
shards first since those rows are tried again. The manifest is rebuilt from the shards at the end,
with a check that no id occurs twice and that input = pairs + dropped + failed (`accounting.py`).

Stage checkpoints (`checkpoints.py`): each model-backed stage also commits its columns per row to
`stages/`, and the rows to do take from there every stage whose entry is still valid, so a killed run,
a failed row or a changed config never computes a row's stage twice. A changed config makes a new
generation: the output's `pairs/`, `dropped/`, `failed/` and manifest move to `generations/<fingerprint>/`
(and that config's own generation, if one is there, moves back), and its rows are done again from the
stage store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from synthalign_ray import checkpoints, progress, store
from synthalign_ray.accounting import accounting, failed_fraction, record_lost_rows
from synthalign_ray.config import ConfigError, SynthAlignConfig
from synthalign_ray.engines.vllm_engine import LIGHT_STAGE_CPUS
from synthalign_ray.ids import digests
from synthalign_ray.store.lease import output_lease
from synthalign_ray.runtime import (
    check_chat_environment,
    configure_data_context,
    init_ray,
    release_freed_memory,
    run_in_wave_process,
)
from synthalign_ray.stages import graph
from synthalign_ray.stages.common import start_batch_attempts
from synthalign_ray.base import STATUS_FAILED, model_source
from synthalign_ray.stages.instructions import missing_instructions
from synthalign_ray.stages.prompts import INPUT_SCHEMA, PromptCheck, check_prompts, prompt_rows, valid_ids, with_status_columns
from synthalign_ray.generations import generation_folder, start_generation
from synthalign_ray.store.stage_store import STAGES_DIR

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: str
    counts: dict[str, Any]
    seconds: float
    manifest: dict[str, Any] = field(repr=False)
    # store.failure_summary of the output when a row failed, else empty.
    failures: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def failed_fraction(self) -> float:
        return failed_fraction(self.counts)


def model_refs(cfg: SynthAlignConfig) -> dict[str, str]:
    refs = {"images.model": cfg.images.model, "image_scores.model": cfg.image_scores.model}
    for key in ("tokenizer", "clip", "blip"):
        if getattr(cfg.image_scores, key):
            refs[f"image_scores.{key}"] = getattr(cfg.image_scores, key)
    for i, model in enumerate(cfg.responses.models):
        refs[f"responses.models.{i}.model"] = model.model
    refs["response_scores.model"] = cfg.response_scores.model
    for name, chat in cfg.chat_models().items():
        refs[name] = chat.model if chat.backend == "vllm" else f"{chat.base_url} ({chat.model})"
    return refs


def prepare_zoo_models(cfg: SynthAlignConfig) -> None:
    """Build the zoo models a config names once, on the driver, before any actor races to do it."""
    for ref in model_refs(cfg).values():
        model_source(ref)


def prompt_blocks(prompts: store.BlockFileDatasource):
    """The pipeline's input: (a wave of) the run's prompts file, block by block, each read when the
    stream is ready for it."""
    import ray

    # As many blocks as the file's: with fewer read tasks than its default parallelism, Ray Data would
    # split each block (SplitBlocks) and the blocks would no longer be `rows_per_block` rows.
    return ray.data.read_datasource(prompts, override_num_blocks=max(1, len(prompts.blocks)), num_cpus=LIGHT_STAGE_CPUS)


def build_dataset(cfg: SynthAlignConfig, prompts: store.BlockFileDatasource, commits: checkpoints.StageCommits | None = None):
    """The method over (a wave of) a group's prompt file (`prompt_blocks`): its stages (`stages.graph`),
    applied in turn, each committed stage restored or run and committed as `commits` says."""
    return checkpoints.apply_stages(prompt_blocks(prompts), graph.build(cfg), commits)


def config_fingerprint(cfg: SynthAlignConfig) -> str:
    """What makes two runs' rows comparable: everything but where and with how many replicas they ran,
    how many prompts of the file were taken (growing a dataset with a higher limit is a resume), and the
    report settings."""
    data = cfg.model_dump(mode="json", exclude={"resources": True, "report": True, "prompts": {"limit", "on_bad_rows"}})
    return hashlib.sha256(json.dumps(checkpoints.without_pools(data), sort_keys=True).encode()).hexdigest()[:16]


def generate(
    cfg: SynthAlignConfig,
    output: str,
    *,
    config_source: str | None = None,
    overwrite: bool = False,
    force_unlock: bool = False,
    build=build_dataset,
) -> RunResult:
    """Run the pipeline of `cfg` into `output` (a folder or URI), resuming what is there; write the manifest.

    The run holds the output's lease (store/lease.py) from before its first write to its end."""
    started = time.time()
    check_chat_environment(cfg.chat_models())
    cfg.resources.check_secret_environment()
    check = check_prompts(cfg.prompts)
    for bad in check.bad:
        log.warning("%s: skipped %s", cfg.prompts.path, bad)
    missing = missing_instructions(cfg.instructions, valid_ids(cfg.prompts, check))
    if missing and cfg.instructions.on_missing == "fail":
        raise ConfigError(
            f"{cfg.instructions.path}: no instruction for {len(missing)} prompt id(s), e.g. {missing[:10]} "
            "(instructions.on_missing=drop drops those rows instead)"
        )
    with output_lease(output, stale_seconds=cfg.resources.lock_stale_seconds, force=force_unlock):
        return run_leased(cfg, output, check, started, config_source=config_source, overwrite=overwrite, build=build)


def run_leased(
    cfg: SynthAlignConfig, output: str, check: PromptCheck, started: float, *, config_source, overwrite, build
) -> RunResult:
    """generate()'s part that writes to the output: under its lease, after the inputs were checked."""
    import ray

    archived = start_generation(output, config_fingerprint(cfg), overwrite)
    stages = graph.build(cfg)
    fingerprints = checkpoints.fingerprints(stages, cfg.seed)
    plan = write_todo_prompts(cfg, check, output, stages, fingerprints)
    todo = sum(group.rows for group in plan.groups)
    release_freed_memory()  # before Ray's start, which would otherwise grow the heap past it
    # The manifest goes first, so a killed run can be resumed (and is checked against) its config.
    manifest = {
        "config": cfg.model_dump(mode="json"),
        "config_fingerprint": config_fingerprint(cfg),
        "config_source": config_source,
        "models": model_refs(cfg),
        "versions": store.package_versions(),
        "rejected_inputs": [{"line": b.line, "reason": b.reason} for b in check.bad],
        "outputs": {**{status: folder for status, folder in store.FOLDERS.items()}, "prompts": checkpoints.TODO_DIR, "stages": STAGES_DIR},
        # Per committed stage: its fingerprint, and of this run's rows those that run it and those that
        # take it from the stage store.
        "checkpoints": plan.stages,
        "previous_generation": archived,
    }
    store.write_json(store.join(output, store.MANIFEST), {**manifest, "complete": False})
    prepare_zoo_models(cfg)
    init_ray(cfg.resources, cfg.chat_models().values())
    store.check_seen_by_every_node(
        output, cfg.resources.shared_filesystem, label="--output", shared_field="resources.shared_filesystem", written="shards"
    )

    waves = [
        (number, group, wave)
        for number, group in enumerate(plan.groups)
        for wave in store.BlockFileDatasource(group.uri).waves(cfg.resources.blocks_per_wave)
    ]
    this_run, denied, executions = store.empty_counts(), {}, []
    runs_by_group: list[list[dict[str, Any]]] = [[] for _ in plan.groups]
    if waves:
        release_freed_memory()  # what Ray's start freed
        context = ray.data.DataContext.get_current()
        configure_data_context(context, cfg.resources)
        attempts = start_batch_attempts()  # held: a named actor lives while its handle does
        for number, (group_number, group, wave) in enumerate(waves, start=1):
            if len(waves) > 1:
                log.info("wave %d of %d: %d blocks", number, len(waves), len(wave.blocks))
            result = run_in_wave_process(cfg, wave, output, context, build, plan.commits(group))
            store.add_counts(this_run, result.counts)
            store.add_denied(denied, result.denied)
            executions.append(result)
            runs_by_group[group_number].append(result.stats)
        ray.kill(attempts)
    outcomes = store.output_counts(output, check.ids)
    if todo and record_lost_rows(output, [group.uri for group in plan.groups], outcomes, denied):
        outcomes = store.output_counts(output, check.ids)
    counts = accounting(output, check, outcomes, this_run=this_run, input_ids=valid_ids(cfg.prompts, check))
    manifest.update(
        counts=counts,
        # Per group of rows (`checkpoints.plan_todo`): the stages it restored, its operators and stage table.
        groups=[{"restored": list(group.restored), "rows": group.rows} for group in plan.groups],
        **progress.grouped_run_stats(runs_by_group, stage_operators(stages)),
        waves=len(waves),
        wave_process_peak_rss_mib=[wave.peak_rss_mib for wave in executions],
        ray_version=ray.__version__,
        seconds=round(time.time() - started, 2),
        complete=True,
    )
    store.write_json(store.join(output, store.MANIFEST), manifest)
    if cfg.report is not None:
        from synthalign_ray.report.build import write_report

        settings = cfg.report
        write_report(
            output,
            license=settings.license,
            pretty_name=settings.name,
            sample_size=settings.sample_size,
            near_miss_margin=settings.near_miss_margin,
        )
    failures = store.failure_summary(output) if counts["failed"] else {}
    return RunResult(output=output, counts=counts, seconds=manifest["seconds"], manifest=manifest, failures=failures)


def stage_operators(stages: list[graph.Stage]) -> list[tuple[str, tuple[str, ...]]]:
    """Each stage's name and the Ray Data operators that are its, its restore task among them."""
    return [(stage.name, (*stage.operators, checkpoints.restore_operator(stage.name))) for stage in stages]


def todo_rows(cfg: SynthAlignConfig, check: PromptCheck, done):
    """The valid prompt rows whose id is not in `done` (an IdSet), with their status columns, in file order."""
    for table in prompt_rows(cfg.prompts, cfg.seed, check):
        yield with_status_columns(table.filter(~done.contains(digests(table["id"].to_pylist()))))


def write_todo_prompts(
    cfg: SynthAlignConfig, check: PromptCheck, output: str, stages: list[graph.Stage], fingerprints: dict[str, str]
) -> checkpoints.Plan:
    """Plans the valid prompts with no committed outcome in `output` (all but a resume's done rows) and
    writes them to `todo/`, one prompt file per group that restores the same stages (`checkpoints.plan_todo`).
    Its failed shards go: their rows are to do. A function of its own so the done ids (16 MB at 1M rows)
    are freed before the run starts."""
    done = store.committed_ids(output)
    retried = store.remove_shards(store.join(output, store.FOLDERS[STATUS_FAILED]))
    plan = checkpoints.plan_todo(output, stages, fingerprints, lambda: todo_rows(cfg, check, done), INPUT_SCHEMA, cfg.resources.rows_per_block)
    if len(done):
        todo = sum(group.rows for group in plan.groups)
        log.info("resuming %s: %d rows done, %d to do (%d failed shards retried)", output, len(done), todo, retried)
    return plan


@dataclass
class DryRun:
    rows: int  # valid input rows
    done: int  # of those, with an outcome in the generation this config resumes
    generation: str  # "current", "archived" (brought back) or "new"
    stages: dict[str, dict[str, Any]]  # per committed stage, as the manifest's `checkpoints`


def dry_run(cfg: SynthAlignConfig, output: str) -> DryRun:
    """What `generate` would do on `output` without doing it (nothing is written): which generation it
    makes current, how many rows are done, and per committed stage the rows it would compute and reuse."""
    check = check_prompts(cfg.prompts)
    fingerprint = config_fingerprint(cfg)
    folder = generation_folder(output, fingerprint)
    done = store.committed_ids(folder)
    generation = "current" if folder == output else "archived" if len(done) else "new"
    stages = graph.build(cfg)
    counts = checkpoints.reuse_counts(output, stages, checkpoints.fingerprints(stages, cfg.seed), todo_rows(cfg, check, done))
    return DryRun(check.rows, len(done), generation, counts)
