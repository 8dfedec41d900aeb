"""The `synthalign` command. Thin: parse arguments, call the library, print. User errors (bad config,
bad prompt file, missing path, unknown zoo model) derive from `UserError`; `_Commands` catches them in
one place and prints one `error:` line with exit status 2, without a traceback."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from synthalign_ray.errors import UserError


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(2)


class _Commands(TyperGroup):
    """The command group that turns any UserError raised below it into `_fail` (also under CliRunner,
    which invokes the group, not `main`)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as e:
            _fail(str(e))


app = typer.Typer(cls=_Commands, no_args_is_help=True, add_completion=False, help="Synth-Align / PDS-DPO on Ray.")
config_app = typer.Typer(no_args_is_help=True, help="Check configs.")
zoo_app = typer.Typer(no_args_is_help=True, help="Tiny offline random-weight models for tests and demos.")
app.add_typer(config_app, name="config")
app.add_typer(zoo_app, name="zoo")

SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="override a config value: KEY=VALUE (VALUE is YAML)")
]
ForceUnlockOption = Annotated[
    bool, typer.Option("--force-unlock", help="break the output's lease held by another run (it must be gone)")
]
RunFolderArgument = Annotated[str, typer.Argument(help="run folder or URI written by `synthalign generate`")]


def _load(config: str, overrides: list[str] | None, schema=None):
    from synthalign_ray.config import SynthAlignConfig, load_config

    return load_config(config, overrides or [], schema or SynthAlignConfig)


@config_app.command("validate")
def config_validate(
    config: Annotated[str, typer.Argument(help="YAML config file")],
    overrides: SetOption = None,
    show: Annotated[bool, typer.Option(help="print the validated config with defaults")] = False,
):
    """Validate a config (fields, model references, prompt file) without starting anything."""
    from synthalign_ray.pipeline import model_refs
    from synthalign_ray.stages.instructions import missing_instructions
    from synthalign_ray.stages.prompts import check_prompts, valid_ids

    cfg = _load(config, overrides)
    check = check_prompts(cfg.prompts)
    missing = missing_instructions(cfg.instructions, valid_ids(cfg.prompts, check))
    if missing:
        typer.echo(f"warning: {cfg.instructions.path} has no instruction for {len(missing)} prompt id(s), e.g. {missing[:5]}", err=True)
    for b in check.bad:
        typer.echo(f"warning: {cfg.prompts.path}: skipping {b}", err=True)
    unchecked = _check_hub(model_refs(cfg))
    if show:
        typer.echo(json.dumps(cfg.model_dump(mode="json"), indent=2))
    if unchecked:
        fields = ", ".join(c.field for c in unchecked)
        typer.echo(f"{config}: valid, except that the hub could not be reached to check {fields} ({check.rows} prompts, {len(check.bad)} skipped)")
    else:
        typer.echo(f"{config}: ok ({check.rows} prompts, {len(check.bad)} skipped)")


def _check_hub(refs: dict[str, str]):
    """Refuse model references (field -> reference) naming a hub model that is not there or is gated
    without access; warn about each one the hub could not be asked about (returned)."""
    from synthalign_ray.config import ConfigError
    from synthalign_ray.hub import check_hub_models

    checks = check_hub_models(refs)
    wrong = [c.line() for c in checks if c.reached and c.problem]
    if wrong:
        raise ConfigError("\n".join(wrong))  # one line per field, as the config's validation errors
    unchecked = [c for c in checks if not c.reached]
    for c in unchecked:
        typer.echo(f"warning: {c.line()}", err=True)
    return unchecked


@zoo_app.command("build")
def zoo_build(
    names: Annotated[Optional[list[str]], typer.Argument(help="models to build (default: all at this scale)")] = None,
    force: Annotated[bool, typer.Option("--force", help="rebuild even if built")] = False,
    seed: int = 0,
    scale: Annotated[
        str,
        typer.Option(
            "--scale",
            help="tiny: the twins; paper: the paper's models at their released shapes, vocabularies and dtypes "
            "(random weights)",
        ),
    ] = "tiny",
    device: Annotated[str, typer.Option("--device", help="paper scale: where the weights are made (cpu, cuda, cuda:1)")] = "cpu",
    layers: Annotated[
        Optional[int], typer.Option("--layers", min=1, help="paper scale: cap every stack's depth at N (for tests)")
    ] = None,
):
    """Build random-weight models into the zoo folder ($SYNTHALIGN_ZOO or ~/.cache/synthalign/zoo).

    `--scale paper` builds sd3, image-reward, armorm and lvlm-llava at the released shapes into NAME-paper[-LN]."""
    from synthalign_ray import zoo

    if scale not in zoo.SCALES:
        _fail(f"--scale {scale!r}: must be one of {', '.join(zoo.SCALES)}")
    known = zoo.BUILDERS if scale == "tiny" else zoo.PAPER_BUILDERS
    for name in names or sorted(known):
        if name not in known:
            _fail(f"unknown {scale} zoo model {name!r}; known: {', '.join(sorted(known))}")
        typer.echo(f"{name}: {zoo.build(name, seed=seed, force=force, scale=scale, device=device, layers=layers)}")


@zoo_app.command("list")
def zoo_list():
    """List zoo models and whether they are built."""
    from synthalign_ray import zoo

    for name, (_, description) in sorted(zoo.BUILDERS.items()):
        state = "built" if zoo.is_built(name) else "not built"
        typer.echo(f"{name:16s} {state:10s} {description}")


@app.command("prompts")
def prompts(
    config: Annotated[str, typer.Option("--config", "-c", help="topic prompts YAML (see configs/topics_tiny.yaml)")],
    output: Annotated[str, typer.Option("--output", "-o", help="prompt file to write (JSONL: id, category, prompt)")],
    overrides: SetOption = None,
):
    """Have an LLM write text-to-image prompts per topic into a prompt file to review before `generate`."""
    from synthalign_ray.stages.topic_prompts import TopicPromptsConfig, write_topic_prompts

    cfg = _load(config, overrides, TopicPromptsConfig)
    report = write_topic_prompts(cfg, output)
    typer.echo(
        f"{output}: {report['prompts']} prompts from {report['requests']} requests "
        f"({report['failed_requests']} failed, removed {report['removed']}); report: {output}.report.json"
    )
    if report["short_topics"]:
        typer.echo(f"warning: topics short of per_topic: {report['short_topics']} (raise oversample)", err=True)


@app.command()
def generate(
    config: Annotated[str, typer.Option("--config", "-c", help="YAML config file")],
    output: Annotated[str, typer.Option("--output", "-o", help="run folder or URI (s3://, gs://)")],
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard what OUTPUT holds and start afresh")] = False,
    force_unlock: ForceUnlockOption = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show Ray's, vLLM's and the models' logs too (else only in OUTPUT/logs/)")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="only print, per model stage, the rows it would compute and reuse")
    ] = False,
):
    """Generate the preference dataset of a config into OUTPUT; rerunning the same command resumes, and a
    changed config reuses every stage it leaves unchanged."""
    from synthalign_ray.console import run_console
    from synthalign_ray.pipeline import generate as run
    from synthalign_ray.pipeline import model_refs, stage_operators
    from synthalign_ray.stages import graph

    cfg = _load(config, overrides)
    if dry_run:
        return _print_dry_run(cfg, output)
    _check_hub(model_refs(cfg))  # before anything starts: not when the first GPU actor loads the model
    stages = stage_operators(graph.build(cfg))
    with run_console(output, "generate", stages, verbose) as log:
        result = run(cfg, output, config_source=config, overwrite=overwrite, force_unlock=force_unlock)
        _report_run(cfg, output, result, log)


def _print_dry_run(cfg, output: str) -> None:
    from synthalign_ray.pipeline import dry_run

    plan = dry_run(cfg, output)
    typer.echo(f"{output}: {plan.rows} rows, {plan.done} done, {plan.rows - plan.done} to do ({plan.generation} generation)")
    width = max(len(name) for name in plan.stages)
    typer.echo(f"{'stage'.ljust(width)}  computed  reused")
    for name, counts in plan.stages.items():
        typer.echo(f"{name.ljust(width)}  {counts['computed']:8d}  {counts['reused']:6d}")


def _report_run(cfg, output: str, result, log: str | None) -> None:
    """generate's closing lines: the counts, the stage table, where the log is; exit 1 past max_failed_fraction."""
    if log is not None:
        typer.echo(f"log: {log}")
    c = result.counts
    typer.echo(
        f"{output}: {c['rows']} rows -> {c['pairs']} pairs, {c['dropped']} dropped {c['dropped_by_reason']}, "
        f"{c['failed']} failed {c['failed_by_stage']}; {c['processed_this_run']} processed this run, "
        f"{c['rejected_input_rows']} input rows rejected, {result.seconds:.1f}s"
    )
    if result.manifest["stages"]:
        from synthalign_ray.progress import StageStats, format_table

        groups = result.manifest["groups"]
        numbers = sorted({stage["group"] for stage in result.manifest["stages"]})
        for number in numbers:
            if len(groups) > 1:  # rows that restored different stages ran as different graphs
                restored = ", ".join(groups[number]["restored"]) or "none"
                typer.echo(f"{groups[number]['rows']} rows, stages restored from the stage store: {restored}")
            stages = [StageStats(**{k: v for k, v in stage.items() if k != "group"}) for stage in result.manifest["stages"] if stage["group"] == number]
            typer.echo(format_table(stages, run_s=result.manifest["execution_seconds"] if number == numbers[-1] else None))
    if result.failed_fraction > cfg.resources.max_failed_fraction:
        from synthalign_ray.accounting import failure_report

        lines = failure_report(c, result.failures, cfg.resources.max_failed_fraction)
        typer.secho(f"error: {lines[0]}", fg="red", err=True)
        typer.echo("\n".join(lines[1:]), err=True)
        raise typer.Exit(1)


@app.command("export")
def export(
    run: Annotated[str, typer.Argument(help="run folder (its pairs/ is exported)")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder for the JSON and images/")],
    format: Annotated[str, typer.Option("--format", help="only llava: the LLaVA / PDS-DPO JSON")] = "llava",
):
    """Write the pairs of a run as LLaVA / PDS-DPO JSON (conversations, rejected_conversations) + images."""
    from synthalign_ray.formats.llava_json import export_llava

    if format != "llava":
        _fail(f"--format {format!r}: only 'llava' is supported")
    result = export_llava(run, output)
    typer.echo(f"{result.json_path}: {result.pairs} pairs, images in {result.images_dir} ({result.skipped} rows skipped)")


@app.command("import")
def import_(
    json_file: Annotated[str, typer.Argument(help="LLaVA / PDS-DPO JSON (e.g. the published PDS-DPO data)")],
    output: Annotated[str, typer.Option("--output", "-o", help="run folder to write pairs/ into")],
    images: Annotated[Optional[str], typer.Option("--images", help="image folder (default: images/ beside the JSON)")] = None,
):
    """Turn a LLaVA / PDS-DPO JSON into our Parquet pairs, so it can be trained on."""
    from synthalign_ray import store
    from synthalign_ray.formats.llava_json import import_llava

    table = import_llava(json_file, images)
    store.write_table(store.join(output, store.FOLDERS["ok"], "imported.parquet"), store.with_hf_features(table))
    typer.echo(f"{output}: {table.num_rows} pairs imported from {json_file}")


@app.command()
def repair(
    output: RunFolderArgument,
    force_unlock: ForceUnlockOption = False,
):
    """Keep one row per id in a run folder whose shards hold ids more than once, and rebuild the manifest's counts."""
    from synthalign_ray.repair import repair as run

    result = run(output, force_unlock=force_unlock)
    c = result.counts
    typer.echo(
        f"{output}: {result.shards} shards, {len(result.duplicate_ids)} ids written more than once, "
        f"{result.rows_dropped} rows dropped, {result.shards_rewritten} shards rewritten; "
        f"now {c['pairs']} pairs, {c['dropped']} dropped, {c['failed']} failed"
    )
    if result.duplicate_ids:
        typer.echo(f"ids that were duplicated: {result.duplicate_ids[:10]}{' ...' if len(result.duplicate_ids) > 10 else ''}")


@app.command()
def gc(
    output: RunFolderArgument,
    force_unlock: ForceUnlockOption = False,
):
    """Remove a run folder's older generations (generations/) and the stage-store entries its current one does not use."""
    from synthalign_ray.generations import collect_garbage

    removed = collect_garbage(output, force_unlock=force_unlock)
    typer.echo(f"{output}: removed {removed['generations']} files of older generations, {removed['stage_entries']} unused stage-store shards")


# --- DPO training (issue 4): `synthalign train` and `synthalign merge` --------------------------------


@app.command()
def train(
    config: Annotated[str, typer.Option("--config", "-c", help="training YAML config (configs/train_tiny.yaml)")],
    data: Annotated[str, typer.Option("--data", "-d", help="pairs: a run folder (its pairs/), a Parquet folder or file, local or URI")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder or URI for the adapter, merged model, log")],
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard the run's checkpoints and start afresh")] = False,
):
    """DPO-train the config's LVLM on DATA's pairs with Ray Train; rerunning the same command resumes."""
    from synthalign_ray.train.config import load_train_config
    from synthalign_ray.train.trainer import train as run_training

    cfg = load_train_config(config, overrides or [])
    _check_hub({"model": cfg.model})
    result = run_training(cfg, data, output, overwrite=overwrite)
    d = result.data
    loss = result.metrics.get("loss")
    typer.echo(
        f"{output}: trained on {d.trained_rows} of {d.rows} pairs ({len(d.skipped_too_long)} over max_length skipped), "
        f"last checkpoint step {result.metrics.get('step')}, loss {loss if loss is None else round(loss, 4)}, "
        f"{result.seconds:.1f}s"
    )


@app.command()
def merge(
    adapter: Annotated[str, typer.Argument(help="LoRA adapter folder (OUTPUT/adapter of a training run)")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder or URI for the merged model")],
    base: Annotated[
        Optional[str],
        typer.Option("--base", help="base model (default: the adapter's base_model_name_or_path, @ its revision if it records one)"),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto, float32, bfloat16, float16")] = "auto",
):
    """Merge a LoRA adapter into its base model, saved in the HF format vLLM serves (with processor files)."""
    from pathlib import Path

    from synthalign_ray.base import adapter_base, resolve_model_path
    from synthalign_ray.train.merge import merge_adapter

    config_file = Path(adapter) / "adapter_config.json"
    if not config_file.is_file():
        _fail(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    base = base or adapter_base(json.loads(config_file.read_text()))
    if not base:
        _fail(f"{config_file}: no base_model_name_or_path; pass --base")
    merge_adapter(resolve_model_path(base), adapter, output, dtype=dtype)
    typer.echo(f"{output}: {base} + {adapter} merged")


# --- Evaluation (issue 5): `synthalign evaluate` ----------------------------------------------------


@app.command()
def evaluate(
    config: Annotated[str, typer.Option("--config", "-c", help="evaluation YAML config (configs/eval_tiny.yaml)")],
    model: Annotated[str, typer.Option("--model", "-m", help="model to evaluate: merged model folder, hub id (org/name[@REVISION]) or zoo:NAME")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder or URI for metrics, predictions, comparison")],
    benchmarks: Annotated[str, typer.Option("--benchmarks", "-b", help="comma-separated: pope, chair, mmhal, amber")] = "pope",
    adapter: Annotated[Optional[str], typer.Option("--adapter", help="LoRA adapter folder applied to --model (merged first)")] = None,
    base: Annotated[Optional[str], typer.Option("--base", help="base model to compare with (default with --adapter: --model)")] = None,
    overrides: SetOption = None,
):
    """Run benchmarks on a model (and its base) as Ray Data batch inference on vLLM; write metrics and a comparison."""
    from synthalign_ray.evaluate.runner import evaluate as run_evaluation
    from synthalign_ray.evaluate.runner import load_eval_config, summary_line

    cfg = load_eval_config(config, overrides or [])
    _check_hub({"--model": model, **({"--base": base} if base else {})})
    summary = run_evaluation(
        cfg, model=model, output=output, benchmarks=benchmarks.split(","), adapter=adapter, base=base, config_source=config
    )
    typer.echo(f"{output}: {summary_line(summary)} ({summary['seconds']}s)")
    if len(summary["models"]) == 2:
        typer.echo(f"comparison: {output.rstrip('/')}/comparison.md")


@app.command("rescore-pope")
def rescore_pope(
    samples: Annotated[str, typer.Argument(help="lmms-eval POPE sample log (samples_pope*.jsonl, from --log_samples)")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="JSON file for the metrics (default: print)")] = None,
):
    """Re-score lmms-eval's logged POPE answers with the official POPE / LLaVA parser, per split."""
    from synthalign_ray import store
    from synthalign_ray.evaluate.lmms_eval import rescore_pope_samples

    result = rescore_pope_samples(samples)
    if output:
        store.write_json(output, result)
    typer.echo(json.dumps(result if not output else result["mean"], indent=2))


# --- Dataset report (issue 6): `synthalign report` -------------------------------------------------


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="run folder or URI written by `synthalign generate`")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="report folder (default: RUN/report)")] = None,
    license: Annotated[str, typer.Option("--license", help="license id for the card's metadata (e.g. cc-by-4.0)")] = "unknown",
    name: Annotated[Optional[str], typer.Option("--name", help="the card's pretty_name and title")] = None,
    sample_size: Annotated[int, typer.Option("--sample-size", min=0, help="pairs shown in index.html")] = 200,
    near_miss_margin: Annotated[
        Optional[float], typer.Option("--near-miss-margin", help="margin at or below which a fluent rejected answer is a near miss (default: the margins' lower quartile)")
    ] = None,
):
    """Write a run's dataset card (README.md), stats.json, plots and index.html, streaming over its shards."""
    from synthalign_ray.report.build import write_report

    result = write_report(run, output, license=license, pretty_name=name, sample_size=sample_size, near_miss_margin=near_miss_margin)
    rows = result.stats["rows"]
    plots = [f for f in result.files if f.startswith("plots/")]
    typer.echo(
        f"{result.output}: README.md, stats.json, index.html, {len(plots)} plots, {result.stats['sample_size']} sampled pairs "
        f"({rows['pairs']} pairs, {rows['dropped']} dropped, {rows['failed']} failed)"
    )
    if result.stats["manifest"]["counts_mismatch"]:
        typer.echo(f"warning: manifest counts differ from the shards: {result.stats['manifest']['counts_mismatch']}", err=True)


@app.command()
def correlate(
    runs: Annotated[str, typer.Argument(help="RUNS.yaml: runs (name, stats, evaluation), downstream metrics")],
    output: Annotated[str, typer.Option("--output", "-o", help="folder for correlations.json, correlations.md, plots/")],
    overrides: SetOption = None,
):
    """Pearson and Spearman (bootstrap 95% intervals) between runs' dataset metrics and downstream metrics."""
    from synthalign_ray.report.correlate import render_markdown, write_correlations

    result = write_correlations(runs, output, overrides)
    typer.echo(render_markdown(result))
    typer.echo(f"{output}: correlations.json, correlations.md, plots/")


@app.command()
def judge(
    run: Annotated[str, typer.Argument(help="run folder or URI written by `synthalign generate`")],
    config: Annotated[str, typer.Option("--config", "-c", help="judge YAML config (configs/judge_tiny.yaml)")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="folder for judge.json, judge.md, verdicts.parquet (default: RUN/judge)")] = None,
    overrides: SetOption = None,
):
    """Ask a VLM judge which image matches the caption where two image scorers' top-1 differ (paper Table 5)."""
    from synthalign_ray.report.judge import JudgeRunConfig, judge_run, render_markdown

    cfg = _load(config, overrides, JudgeRunConfig)
    result = judge_run(run, cfg, output, config_source=config)
    typer.echo(render_markdown(result))
    typer.echo(f"{output or run.rstrip('/') + '/judge'}: judge.json, judge.md, verdicts.parquet ({result['seconds']}s)")


# --- Capacity (issue 7): `synthalign plan`, `simulate`, `calibrate` ----------------------------------

ConfigOption = Annotated[str, typer.Option("--config", "-c", help="generation YAML config")]
ProfileOption = Annotated[str, typer.Option("--profile", help="per-stage throughput YAML (configs/profiles/, or `synthalign calibrate`)")]


@app.command()
def plan(
    config: ConfigOption,
    profile: ProfileOption,
    output: Annotated[str, typer.Option("--output", "-o", help="where to write the config with the planned pools")],
    gpus: Annotated[float | None, typer.Option("--gpus", help="GPUs to split across the GPU stages (with --cluster: all it holds)")] = None,
    cluster: Annotated[str | None, typer.Option("--cluster", help="a `ray up` launcher YAML: plan within its GPU node types' limits")] = None,
    overrides: SetOption = None,
):
    """Split N GPUs across the config's GPU stages so the slowest stage is as fast as it can be."""
    from synthalign_ray.capacity.plan import launcher_nodes, load_profile, make_plan, unused_profile_stages, write_planned_config

    cfg = _load(config, overrides)
    prof = load_profile(profile)
    nodes = launcher_nodes(cluster) if cluster is not None else None
    result = make_plan(cfg, prof, gpus, nodes)
    write_planned_config(config, cfg, prof, profile, result, output, overrides)
    if nodes is not None:
        typer.echo(nodes.describe())
    typer.echo(f"profile: {prof.gpu}, {prof.source.kind}")
    typer.echo(result.table())
    unused = unused_profile_stages(cfg, prof)
    if unused:
        typer.echo(f"note: profile stages not in the config, ignored: {unused}", err=True)
    typer.echo(f"{output}: written")


@app.command()
def simulate(
    config: ConfigOption,
    profile: ProfileOption,
    gpus: Annotated[float, typer.Option("--gpus", help="fake GPUs of the simulated cluster")],
    output: Annotated[str, typer.Option("--output", "-o", help="local run folder")],
    rows: Annotated[int, typer.Option("--rows", help="generated prompts to run")] = 1000,
    split: Annotated[str, typer.Option("--split", help="plan (synthalign plan's), equal, or config (its max_actors)")] = "plan",
    time_scale: Annotated[float, typer.Option("--time-scale", help="simulated seconds per profile second")] = 1.0,
    max_actors: Annotated[int, typer.Option("--max-actors", help="Ray actor processes at most (one stands for several replicas)")] = 40,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="discard what OUTPUT holds and start afresh")] = False,
):
    """Capacity questions only: run generate's driver on ROWS made-up prompts with every model stage a
    sleep of the profile's seconds per batch, on N fake GPUs of a local Ray (no GPU, no model)."""
    from synthalign_ray.capacity.plan import load_profile
    from synthalign_ray.capacity.simulate import simulate as run

    cfg = _load(config, overrides)
    result = run(cfg, load_profile(profile), gpus=gpus, rows=rows, output=output, split=split,
                 time_scale=time_scale, max_actors=max_actors, overwrite=overwrite)
    c = result.counts
    typer.echo(f"{output}: {c['rows']} rows -> {c['pairs']} pairs, {c['dropped']} dropped, {c['failed']} failed; {result.seconds:.1f}s")
    typer.echo(result.table())


@app.command()
def calibrate(
    config: ConfigOption,
    output: Annotated[str, typer.Option("--output", "-o", help="profile YAML to write")],
    prompts: Annotated[int, typer.Option("--prompts", help="generated prompts each stage runs on")] = 64,
    gpu_name: Annotated[Optional[str], typer.Option("--gpu-name", help="GPU type to record (default: CUDA's name, or cpu)")] = None,
    spot: Annotated[float, typer.Option("--spot", help="USD per GPU-hour, spot")] = 0.0,
    on_demand: Annotated[float, typer.Option("--on-demand", help="USD per GPU-hour, on demand")] = 0.0,
    overrides: SetOption = None,
):
    """Measure each stage alone (one replica per pool) on generated prompts; write a profile for `plan`."""
    from synthalign_ray.capacity.calibrate import calibrate as run
    from synthalign_ray.capacity.plan import GpuPrice

    cfg = _load(config, overrides)
    profile = run(cfg, prompts, output, gpu=gpu_name, price=GpuPrice(on_demand=on_demand, spot=spot))
    for stage in profile.stages:
        typer.echo(f"{stage.name:26s} {stage.seconds_per_batch:9.3f} s per batch of {stage.batch_size:3d}  ({stage.note})")
    typer.echo(f"{output}: written ({profile.gpu})")


@app.command()
def doctor(
    lock: Annotated[Optional[str], typer.Option("--lock", help="compare with this lock (default: the one scripts/install.sh installed)")] = None,
):
    """The installed stack's versions, and whether this environment still matches its lock (exit 1 if not)."""
    from pathlib import Path

    from synthalign_ray import lockfile, store

    for name, version in store.package_versions().items():
        typer.echo(f"{name:16s} {version}")
    record = lockfile.install_record()
    if lock is None and record is None:
        typer.echo("lock: none recorded (this environment was not installed by scripts/install.sh); --lock names one")
        return
    repo = Path(lockfile.__file__).resolve().parents[1]
    path = Path(lock) if lock else repo / record["lock"]
    entries = lockfile.read_lock(path)
    drift = lockfile.installed_drift(entries)
    for name, locked, installed in drift:
        typer.secho(f"drift: {name} {installed or 'not installed'} (locked {locked})", fg="red")
    lock_changed = lock is None and lockfile.file_sha256(path) != record["sha256"]
    if lock_changed:
        typer.secho(f"drift: {path} changed since this environment was installed; run scripts/install.sh again", fg="red")
    if drift or lock_changed:
        raise typer.Exit(1)
    typer.echo(f"lock: {path} ({len(entries)} packages), all installed as locked")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
