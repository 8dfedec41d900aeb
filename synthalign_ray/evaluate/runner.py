"""`synthalign evaluate`: benchmarks of a model, and of its base next to it, in one Ray session.

    evaluate(cfg, model="runs/dpo/merged", base="llava-hf/llava-1.5-7b-hf", output="runs/eval")
    evaluate(cfg, model="llava-hf/llava-1.5-7b-hf", adapter="runs/dpo/adapter", output="runs/eval")

Models are `zoo:NAME`, a local folder or a hub id. With `adapter`, the evaluated model is `model` +
the LoRA adapter, merged first (`train.merge.merge_adapter`, the same code as `synthalign merge`) and
served by vLLM as a plain checkpoint; its base defaults to `model`. vLLM's own LoRA serving
(`enable_lora`) is not used: merging once costs one model load, and the merged model is what the
paper evaluates. Output folder:

    evaluation.json         models, benchmarks, config, package versions, seconds, the headline metrics
    comparison.md           base vs trained, per benchmark / group / metric, with deltas (two models)
    <label>/<benchmark>.json                every metric of a benchmark (labels: base, trained; or model)
    <label>/<benchmark>_predictions.parquet one row per question / image
    trained/merged/         the merged model, when --adapter is given and OUTPUT is a local folder

Benchmarks: pope (`pope.py`), chair (`chair.py`), mmhal (`mmhal.py`), amber (`amber.py`). Every file is
checked before Ray starts; then each model answers the prompts of all benchmarks in one pass over one vLLM pool
(`common.answer_prompts`), and the MMHal-Bench judge rates every model's answers in one more pass.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from synthalign_ray import store
from synthalign_ray.config import ConfigError, ResourcesConfig
from synthalign_ray.engines.vllm_engine import VLLMPoolConfig
from synthalign_ray.evaluate import amber, chair, mmhal, pope
from synthalign_ray.evaluate.amber import AmberConfig
from synthalign_ray.evaluate.chair import ChairConfig
from synthalign_ray.evaluate.common import answer_prompts
from synthalign_ray.evaluate.mmhal import MmhalConfig
from synthalign_ray.evaluate.pope import PopeConfig
from synthalign_ray.formats.llava_conversation import llava_v1_chat_template
from synthalign_ray.base import StrictModel, check_model_ref

BENCHMARKS = ("pope", "chair", "mmhal", "amber")


class GenerationConfig(StrictModel):
    """Decoding of the evaluated models: greedy, as the official evaluation scripts."""

    max_tokens: int = Field(128, ge=1, description="POPE answers' budget (LLaVA's POPE evaluation allows 128 new tokens)")
    prompt_format: Literal["chat_template", "llava_v1"] = Field(
        "chat_template",
        description="chat_template: the evaluated model's own chat template renders the prompts; llava_v1: "
        "LLaVA-1.5's official vicuna_v1 conversation (its system sentence, then USER: <image>\\n{question} "
        "ASSISTANT:), as LLaVA's evaluation scripts prompt LLaVA-1.5 models and the paper's numbers were made",
    )
    pool: VLLMPoolConfig = Field(default_factory=VLLMPoolConfig)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vllm.AsyncEngineArgs")

    def chat_template(self) -> str | None:
        """The chat template the engines render prompts with (None: the model's own)."""
        return llava_v1_chat_template() if self.prompt_format == "llava_v1" else None


class EvalConfig(StrictModel):
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    pope: PopeConfig | None = None
    chair: ChairConfig | None = None
    mmhal: MmhalConfig | None = None
    amber: AmberConfig | None = None
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
    names = list(dict.fromkeys(names))  # each once, in the order given
    unknown = [name for name in names if name not in BENCHMARKS]
    if not names or unknown:
        raise ConfigError(
            f"--benchmarks {text!r}: runnable benchmarks are {', '.join(BENCHMARKS)} (the lmms-eval bridge covers general benchmarks)"
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
    from synthalign_ray.runtime import init_ray

    started = time.time()
    benchmarks = benchmark_list(list(benchmarks))
    models = models_to_evaluate(model, adapter, base)
    for name in benchmarks:
        if getattr(cfg, name) is None:
            raise ConfigError(f"{config_source or 'config'}: {name}: benchmark {name} needs a `{name}` section (files, image_dir)")
    if "mmhal" in benchmarks:
        try:
            cfg.mmhal.judge.check_environment("mmhal.judge")
        except ValueError as error:
            raise ConfigError(str(error)) from None
    inputs = load_inputs(cfg, benchmarks)  # every file checked before Ray starts
    prompts = [row for name in benchmarks for row in inputs[name]["prompts"]]

    init_ray(cfg.resources)
    answers: dict[str, dict[str, dict[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="synthalign-eval-") as scratch:
        for m in models:
            served = _served_model(m, output, scratch)
            answers[m.label] = answer_prompts(
                prompts,
                served,
                pool=cfg.generation.pool,
                engine_kwargs=cfg.generation.engine_kwargs,
                chat_template=cfg.generation.chat_template(),
            )
    replies = _judge_mmhal(cfg.mmhal, inputs["mmhal"]["prompts"], answers) if "mmhal" in benchmarks else {}

    results: dict[str, dict[str, Any]] = {}
    for m in models:
        results[m.label] = {}
        for name in benchmarks:
            table, scores, details = score_benchmark(name, cfg, inputs[name], answers[m.label], replies.get(m.label, {}))
            report = {"benchmark": name, "model": m.reference, "adapter": m.adapter, **details, **scores}
            store.write_table(store.join(output, m.label, f"{name}_predictions.parquet"), table)
            store.write_json(store.join(output, m.label, f"{name}.json"), report)
            results[m.label][name] = scores
    summary = {
        "models": {m.label: {"model": m.reference, "adapter": m.adapter} for m in models},
        "benchmarks": benchmarks,
        "config": cfg.model_dump(mode="json"),
        "config_source": config_source,
        "versions": store.package_versions(),
        "seconds": round(time.time() - started, 1),
        "results": {label: {b: headline(b, r) for b, r in by_benchmark.items()} for label, by_benchmark in results.items()},
    }
    store.write_json(store.join(output, "evaluation.json"), summary)
    if len(models) == 2:
        judge = cfg.mmhal.judge.model if "mmhal" in benchmarks else None
        store.write_bytes(store.join(output, "comparison.md"), comparison_table(results, models, judge).encode())
    return summary


def load_inputs(cfg: EvalConfig, benchmarks: list[str]) -> dict[str, dict[str, Any]]:
    """Each benchmark's prompt rows (and what its scoring needs), read and checked."""
    inputs: dict[str, dict[str, Any]] = {}
    if "pope" in benchmarks:
        inputs["pope"] = {"prompts": pope.load_questions(cfg.pope, cfg.generation.max_tokens)}
    if "chair" in benchmarks:
        vocabulary = chair.vocabulary(cfg.chair)
        rows, objects = chair.load_images(cfg.chair, vocabulary)
        inputs["chair"] = {"prompts": rows, "objects": objects, "vocabulary": vocabulary}
    if "mmhal" in benchmarks:
        inputs["mmhal"] = {"prompts": mmhal.load_questions(cfg.mmhal)}
    if "amber" in benchmarks:
        rows, resources = amber.load_queries(cfg.amber, cfg.generation.max_tokens)
        nouns, similar = amber.scorers(cfg.amber) if resources is not None else (None, None)
        inputs["amber"] = {"prompts": rows, "resources": resources, "nouns": nouns, "similar": similar}
    return inputs


def _judge_mmhal(cfg: MmhalConfig, questions: list[dict[str, Any]], answers: dict[str, dict[str, dict[str, str]]]):
    """Every model's MMHal-Bench answers rated in one judge pass: label -> question id -> reply."""
    items = [
        {"id": f"{label}/{q['id']}", "judge_prompt": mmhal.judge_prompt(q, by_id[q["id"]]["answer"])}
        for label, by_id in answers.items()
        for q in questions
    ]
    replies = mmhal.judge_answers(items, cfg.judge)
    return {label: {q["id"]: replies[f"{label}/{q['id']}"] for q in questions} for label in answers}


def score_benchmark(name: str, cfg: EvalConfig, inputs: dict[str, Any], answers: dict[str, dict[str, str]], replies: dict[str, Any]):
    """(predictions table, scores, report details) of one benchmark for one model."""
    if name == "pope":
        table = pope.predictions(inputs["prompts"], answers)
        scores = pope.score(table, cfg.pope.splits)
        details = {
            "parser": "official (POPE evaluate.py / LLaVA llava/eval/eval_pope.py)", "prompt_suffix": cfg.pope.prompt_suffix,
            "max_tokens": cfg.generation.max_tokens, "questions": {split: scores["splits"][split]["n"] for split in cfg.pope.splits},
        }  # fmt: skip
        return table, scores, details
    if name == "chair":
        table, scores = chair.score(inputs["prompts"], answers, inputs["objects"], inputs["vocabulary"])
        details = {
            "prompt": cfg.chair.prompt, "max_tokens": cfg.chair.max_tokens,
            "synonyms": cfg.chair.synonyms or "synthalign_ray.evaluate.coco_synonyms (not CHAIR's full table)",
        }  # fmt: skip
        return table, scores, details
    if name == "amber":
        table, scores = amber.score(inputs["prompts"], answers, inputs["resources"], nouns=inputs["nouns"], similar=inputs["similar"])
        details = {
            "scorer": "AMBER inference.py's metrics; yes/no answers through POPE's parser", "units": "percent",
            "nouns": cfg.amber.nouns, "spacy_model": cfg.amber.spacy_model, "prompt_suffix": cfg.amber.prompt_suffix,
            "max_tokens": {"generative": cfg.amber.max_tokens, "discriminative": cfg.generation.max_tokens},
            "queries": {task: sum(row["task"] == task for row in inputs["prompts"]) for task in ("generative", "discriminative")},
        }  # fmt: skip
        return table, scores, details
    table, scores = mmhal.score(inputs["prompts"], answers, replies)
    details = {
        "judge": cfg.mmhal.judge.model, "judge_backend": cfg.mmhal.judge.backend,
        "judge_note": f"rated by {cfg.mmhal.judge.model}, not GPT-4: not comparable with GPT-4 MMHal-Bench scores",
        "max_tokens": cfg.mmhal.max_tokens,
    }  # fmt: skip
    return table, scores, details


def headline(benchmark: str, scores: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a benchmark that go into evaluation.json and the summary line."""
    if benchmark == "pope":
        return scores["mean"]
    if benchmark == "amber":
        return amber.headline(scores)
    return {name: scores[name] for name in (chair.HEADLINE_METRICS if benchmark == "chair" else mmhal.HEADLINE_METRICS)}


def comparison_rows(benchmark: str, scores: dict[str, Any]) -> list[tuple[str, str, float | None, bool]]:
    """(group, metric, value, is a fraction shown in percent) rows of one benchmark's scores."""
    if benchmark == "pope":
        groups = [(split, scores["splits"][split]) for split in scores["splits"]] + [("mean", scores["mean"])]
        return [(group, metric, values[metric], True) for group, values in groups for metric in pope.HEADLINE_METRICS]
    if benchmark == "chair":
        return [("all", metric, scores[metric], True) for metric in chair.HEADLINE_METRICS]
    if benchmark == "amber":
        return amber.comparison_rows(scores)
    groups = [("all", scores)] + [(f"type {name}", values) for name, values in scores["question_types"].items()]
    return [row for group, values in groups for row in ((group, "score (0-6)", values["score"], False), (group, "hallucination_rate", values["hallucination_rate"], True))]


def _served_model(m: ModelUnderTest, output: str, scratch: str) -> str:
    """The folder or id vLLM loads: the model itself, or model + adapter merged."""
    if m.adapter is None:
        return m.reference
    from synthalign_ray.base import resolve_model_path
    from synthalign_ray.train.merge import merge_adapter

    merged = str(Path(output) / m.label / "merged") if "://" not in output else str(Path(scratch) / "merged")
    return merge_adapter(resolve_model_path(m.reference), m.adapter, merged)


def comparison_table(results: dict[str, dict[str, Any]], models: list[ModelUnderTest], judge: str | None = None) -> str:
    """Markdown: one row per benchmark / group / metric, base and trained, and the delta."""
    base, trained = models
    lines = [
        f"# Evaluation: {trained.reference}{' + ' + trained.adapter if trained.adapter else ''} vs {base.reference}",
        "",
        "Percent except MMHal-Bench's score (0-6); delta = trained - base. POPE: official parser, yes-ratio over "
        "predictions; mean = over splits. CHAIR: CHAIRs, CHAIRi and recall over the captions. AMBER: generative "
        "CHAIR / Cover / Hal / Cog, discriminative per dimension with \"no\" as the positive class.",
    ]
    if judge is not None:
        lines.append(f"MMHal-Bench judged by {judge}: not comparable with GPT-4-judged scores.")
    lines += ["", "| benchmark | group | metric | base | trained | delta |", "| --- | --- | --- | ---: | ---: | ---: |"]
    for benchmark, base_scores in results[base.label].items():
        trained_rows = comparison_rows(benchmark, results[trained.label][benchmark])
        for (group, metric, b, percent), (_, _, t, _) in zip(comparison_rows(benchmark, base_scores), trained_rows, strict=True):
            lines.append(f"| {benchmark} | {group} | {metric} | {_number(b, percent)} | {_number(t, percent)} | {_delta(b, t, percent)} |")
    return "\n".join(lines) + "\n"


def _number(value: float | None, percent: bool) -> str:
    if value is None:
        return "n/a"
    return f"{value * 100:.1f}" if percent else f"{value:.2f}"


def _delta(base: float | None, trained: float | None, percent: bool = True) -> str:
    if base is None or trained is None:
        return "n/a"
    return f"{(trained - base) * 100:+.1f}" if percent else f"{trained - base:+.2f}"


def load_eval_config(path: str, overrides: list[str] | None = None) -> EvalConfig:
    """The evaluation config of a YAML file; relative benchmark paths resolve against the file's folder
    when they exist there (a config travels with its data, as the generation config)."""
    from synthalign_ray.config import load_config

    cfg = load_config(path, overrides or [], EvalConfig)
    folder = Path(path).parent

    def near_config(value: str | None) -> str | None:
        if value is None:
            return None
        candidate = folder / value
        return str(candidate) if "://" not in value and not Path(value).is_absolute() and candidate.exists() else value

    if cfg.pope is not None:
        cfg.pope.image_dir = near_config(cfg.pope.image_dir)
        cfg.pope.question_dir = near_config(cfg.pope.question_dir)
        cfg.pope.question_files = {split: near_config(p) for split, p in cfg.pope.question_files.items()}
    sections = (
        ("chair", ("image_dir", "objects_file", "coco_instances", "coco_captions", "synonyms")),
        ("mmhal", ("image_dir", "response_file")),
        ("amber", ("image_dir", "data_dir", *amber.DATA_FILES)),
    )
    for section, fields in sections:
        benchmark = getattr(cfg, section)
        for name in fields if benchmark is not None else ():
            setattr(benchmark, name, near_config(getattr(benchmark, name)))
    return cfg


SUMMARY_METRICS = {
    "pope": (("acc", "accuracy"), ("F1", "f1"), ("yes", "yes_ratio")),
    "chair": (("CHAIRs", "chair_s"), ("CHAIRi", "chair_i"), ("recall", "recall")),
    "amber": (("CHAIR", "chair"), ("Cover", "cover"), ("Hal", "hal"), ("Cog", "cog"), ("F1", "f1")),
}


def summary_line(summary: dict[str, Any]) -> str:
    parts = []
    for label, by_benchmark in summary["results"].items():
        for benchmark, values in by_benchmark.items():
            if benchmark == "mmhal":
                score = "n/a" if values["score"] is None else f"{values['score']:.2f}"
                parts.append(f"{label} mmhal score {score} hallucination {_number(values['hallucination_rate'], True)}")
            else:
                scale = 100 if benchmark == "amber" else 1  # AMBER's numbers are percent already
                numbers = " ".join(
                    f"{short} {_number(None if values[key] is None else values[key] / scale, True)}" for short, key in SUMMARY_METRICS[benchmark]
                )
                parts.append(f"{label} {benchmark} {numbers}")
    return "; ".join(parts)
