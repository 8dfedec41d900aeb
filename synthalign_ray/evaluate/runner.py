"""`synthalign evaluate`: benchmarks of a model, and of its base next to it, in one Ray session.

    evaluate(cfg, model="runs/dpo/merged", base="llava-hf/llava-1.5-7b-hf", output="runs/eval")
    evaluate(cfg, model="llava-hf/llava-1.5-7b-hf", adapter="runs/dpo/adapter", output="runs/eval")

Models are `zoo:NAME`, a local folder or a hub id. With `adapter`, the evaluated model is `model` +
the LoRA adapter, merged first (`train.merge.merge_adapter`, the same code as `synthalign merge`) and
served by vLLM as a plain checkpoint; its base defaults to `model`. vLLM's own LoRA serving
(`enable_lora`) is not used: merging once costs one model load, and the merged model is what the
paper evaluates. Output folder:

    evaluation.json         models, benchmarks, config, package versions, seconds, the headline metrics
    comparison.md           base vs trained, per benchmark / split / metric, with deltas (two models)
    <label>/pope.json       every POPE metric (labels: base, trained; or model alone)
    <label>/pope_predictions.parquet
    trained/merged/         the merged model, when --adapter is given and OUTPUT is a local folder
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field

from synthalign_ray import store
from synthalign_ray.config import ConfigError, ResourcesConfig
from synthalign_ray.engines.vllm_engine import VLLMPoolConfig
from synthalign_ray.evaluate import pope
from synthalign_ray.evaluate.pope import PopeConfig
from synthalign_ray.stages.common import StrictModel, check_model_ref

BENCHMARKS = ("pope",)


class GenerationConfig(StrictModel):
    """Decoding of the evaluated models: greedy, as the official evaluation scripts."""

    max_tokens: int = Field(128, ge=1, description="LLaVA's POPE evaluation allows 128 new tokens")
    pool: VLLMPoolConfig = Field(default_factory=VLLMPoolConfig)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vllm.AsyncEngineArgs")


class EvalConfig(StrictModel):
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pope: PopeConfig | None = None
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)


@dataclass(frozen=True)
class ModelUnderTest:
    label: str  # "base", "trained" or "model": the output subfolder
    reference: str  # what the user named
    adapter: str | None = None


def models_to_evaluate(model: str, adapter: str | None = None, base: str | None = None) -> list[ModelUnderTest]:
    """The models of a run, checked: `model` (+ `adapter`) alone, or next to its base (`base`, or `model`
    itself when an adapter is given)."""
    for field, ref in (("--model", model), ("--base", base)):
        if ref is not None:
            try:
                check_model_ref(ref)
            except ValueError as error:
                raise ConfigError(f"{field}: {error}") from None
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter {adapter}: not a LoRA adapter folder (no adapter_config.json)")
    base = base if base is not None else (model if adapter is not None else None)
    if base is None:
        return [ModelUnderTest("model", model, adapter)]
    return [ModelUnderTest("base", base), ModelUnderTest("trained", model, adapter)]


def benchmark_list(text: str | list[str]) -> list[str]:
    names = [name.strip() for name in (text.split(",") if isinstance(text, str) else text) if name.strip()]
    unknown = [name for name in names if name not in BENCHMARKS]
    if not names or unknown:
        raise ConfigError(
            f"--benchmarks {text!r}: runnable benchmarks are {', '.join(BENCHMARKS)} (CHAIR and AMBER are scored from "
            "saved answers with synthalign_ray.evaluate.metrics; the lmms-eval bridge covers general benchmarks)"
        )
    return names


def evaluate(
    cfg: EvalConfig,
    *,
    model: str,
    output: str,
    benchmarks: list[str] = ("pope",),
    adapter: str | None = None,
    base: str | None = None,
    config_source: str | None = None,
) -> dict[str, Any]:
    """Run the benchmarks on every model, write the outputs (module docstring), return the summary."""
    from synthalign_ray.pipeline import init_ray

    started = time.time()
    benchmarks = benchmark_list(list(benchmarks))
    models = models_to_evaluate(model, adapter, base)
    if "pope" in benchmarks and cfg.pope is None:
        raise ConfigError(f"{config_source or 'config'}: pope: benchmark pope needs a `pope` section (question files, image_dir)")
    questions = pope.load_questions(cfg.pope) if "pope" in benchmarks else []  # every file checked before Ray starts

    init_ray(cfg.resources)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="synthalign-eval-") as scratch:
        for m in models:
            served = _served_model(m, output, scratch)
            results[m.label] = {}
            if "pope" in benchmarks:
                table = pope.answer_questions(
                    questions, served, max_tokens=cfg.generation.max_tokens, pool=cfg.generation.pool,
                    engine_kwargs=cfg.generation.engine_kwargs,
                )  # fmt: skip
                scores = pope.score(table, cfg.pope.splits)
                report = {
                    "benchmark": "pope", "model": m.reference, "adapter": m.adapter,
                    "parser": "official (POPE evaluate.py / LLaVA llava/eval/eval_pope.py)",
                    "prompt_suffix": cfg.pope.prompt_suffix, "max_tokens": cfg.generation.max_tokens,
                    "questions": {split: scores["splits"][split]["n"] for split in cfg.pope.splits}, **scores,
                }  # fmt: skip
                store.write_table(store.join(output, m.label, "pope_predictions.parquet"), table)
                store.write_json(store.join(output, m.label, "pope.json"), report)
                results[m.label]["pope"] = scores
    summary = {
        "models": {m.label: {"model": m.reference, "adapter": m.adapter} for m in models},
        "benchmarks": benchmarks,
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "versions": store.package_versions(),
        "seconds": round(time.time() - started, 1),
        "results": {label: {b: r["mean"] for b, r in by_benchmark.items()} for label, by_benchmark in results.items()},
    }
    store.write_json(store.join(output, "evaluation.json"), summary)
    if len(models) == 2:
        store.write_bytes(store.join(output, "comparison.md"), comparison_table(results, models).encode())
    return summary


def _served_model(m: ModelUnderTest, output: str, scratch: str) -> str:
    """The folder or id vLLM loads: the model itself, or model + adapter merged."""
    if m.adapter is None:
        return m.reference
    from synthalign_ray.stages.common import resolve_model_path
    from synthalign_ray.train.merge import merge_adapter

    merged = str(Path(output) / m.label / "merged") if "://" not in output else str(Path(scratch) / "merged")
    return merge_adapter(resolve_model_path(m.reference), m.adapter, merged)


def comparison_table(results: dict[str, dict[str, Any]], models: list[ModelUnderTest]) -> str:
    """Markdown: one row per benchmark / split / metric, base and trained in percent, and the delta."""
    base, trained = models
    lines = [
        f"# Evaluation: {trained.reference}{' + ' + trained.adapter if trained.adapter else ''} vs {base.reference}",
        "",
        "Percent; delta = trained - base. POPE: official parser, yes-ratio over predictions; mean = over splits.",
        "",
        "| benchmark | split | metric | base | trained | delta |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for benchmark, base_scores in results[base.label].items():
        trained_scores = results[trained.label][benchmark]
        groups = [*base_scores["splits"], "mean"]
        for group in groups:
            b = base_scores["mean"] if group == "mean" else base_scores["splits"][group]
            t = trained_scores["mean"] if group == "mean" else trained_scores["splits"][group]
            for metric in pope.HEADLINE_METRICS:
                lines.append(f"| {benchmark} | {group} | {metric} | {_pct(b[metric])} | {_pct(t[metric])} | {_delta(b[metric], t[metric])} |")
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.1f}"


def _delta(base: float | None, trained: float | None) -> str:
    return "n/a" if base is None or trained is None else f"{(trained - base) * 100:+.1f}"


def load_eval_config(path: str, overrides: list[str] | None = None) -> EvalConfig:
    """The evaluation config of a YAML file; relative benchmark paths resolve against the file's folder
    when they exist there (a config travels with its data, as the generation config)."""
    from synthalign_ray.config import load_config

    cfg = load_config(path, overrides or [], EvalConfig)
    if cfg.pope is not None:
        folder = Path(path).parent

        def near_config(value: str) -> str:
            candidate = folder / value
            return str(candidate) if "://" not in value and not Path(value).is_absolute() and candidate.exists() else value

        cfg.pope.image_dir = near_config(cfg.pope.image_dir)
        if cfg.pope.question_dir is not None:
            cfg.pope.question_dir = near_config(cfg.pope.question_dir)
        cfg.pope.question_files = {split: near_config(p) for split, p in cfg.pope.question_files.items()}
    return cfg


def summary_line(summary: dict[str, Any]) -> str:
    parts = []
    for label, by_benchmark in summary["results"].items():
        for benchmark, mean in by_benchmark.items():
            parts.append(f"{label} {benchmark} acc {_pct(mean['accuracy'])} F1 {_pct(mean['f1'])} yes {_pct(mean['yes_ratio'])}")
    return "; ".join(parts)

