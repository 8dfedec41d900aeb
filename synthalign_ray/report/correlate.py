"""`synthalign correlate RUNS.yaml`: do dataset metrics predict downstream metrics? (seeds/000)

Each run in RUNS.yaml pairs a dataset report (`stats.json` of `synthalign report`) with an evaluation
(`evaluation.json` of `synthalign evaluate`). For every dataset metric x downstream metric it gives
Pearson's r and Spearman's rho over the runs, each with a percentile bootstrap 95% interval (runs
resampled with replacement; resamples where a side is constant have no correlation and are left out,
and counted), a scatter plot, and a caveat on sample size beside every number: with a handful of runs
a correlation is an anecdote, and the bootstrap interval of 5 points is itself unreliable.

    runs:
      - {name: small, stats: runs/a/report/stats.json, evaluation: runs/a-eval/evaluation.json}
      - {name: large, stats: runs/b/report, evaluation: runs/b-eval}     # folders work too
    downstream: [pope.f1, pope.accuracy]     # benchmark.metric of evaluation.json's results
    model: trained                           # whose results (default: trained, else the only model)
    bootstrap: 2000
    seed: 0
Relative paths are relative to RUNS.yaml's folder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from synthalign_ray import store
from synthalign_ray.config import ConfigError
from synthalign_ray.report.stats import pearson, spearman
from synthalign_ray.base import StrictModel


def _agreement(stats: dict, pair: str) -> float | None:
    return stats["scorer_agreement"]["pairs"].get(pair, {}).get("top1", {}).get("percent")


def _share(part: float | None, whole: float | None) -> float | None:
    return part / whole if part is not None and whole else None


# Dataset metrics: name -> how to read it from a stats.json (None where the run lacks it).
DATASET_METRICS: dict[str, Callable[[dict], float | None]] = {
    "pairs": lambda s: s["rows"]["pairs"],
    "drop_share": lambda s: _share(s["rows"]["dropped"], s["rows"]["total"]),
    "mean_kept_image_score": lambda s: s["image_scores"]["selected"]["mean"],
    "mean_kept_clip_score": lambda s: s["image_scores"].get("selected_clip", {}).get("mean"),
    "mean_kept_blip_score": lambda s: s["image_scores"].get("selected_blip", {}).get("mean"),
    "ir_clip_top1_agreement": lambda s: _agreement(s, "ImageReward & CLIP"),
    "mean_margin": lambda s: s["margins"]["mean"],
    "median_margin": lambda s: s["margins"]["median"],
    "mean_chosen_words": lambda s: s["response_words"]["chosen"]["mean"],
    "chosen_longer_share": lambda s: s["chosen_longer_share"],
    "easy_negative_share": lambda s: _share(s["hard_negatives"]["easy"], s["rows"]["pairs"]),
}


class RunEntry(StrictModel):
    name: str
    stats: str = Field(description="stats.json of `synthalign report`, or the report folder")
    evaluation: str = Field(description="evaluation.json of `synthalign evaluate`, or its folder")


class CorrelateConfig(StrictModel):
    runs: list[RunEntry] = Field(min_length=2)
    downstream: list[str] = Field(["pope.f1"], min_length=1, description="benchmark.metric in evaluation.json results")
    dataset: list[str] | None = Field(None, description="dataset metrics (default: all of DATASET_METRICS)")
    model: str | None = Field(None, description="results label: default trained, else the only one")
    bootstrap: int = Field(2000, ge=100)
    seed: int = 0


def caveat(n: int) -> str:
    """What a correlation over n runs can and cannot say."""
    if n < 3:
        return f"n={n}: no correlation can be estimated"
    if n < 6:
        return f"n={n}: anecdotal; any r is compatible with no relation, the bootstrap interval is unreliable"
    if n < 15:
        return f"n={n}: small sample; wide intervals, one run can swing r"
    if n < 30:
        return f"n={n}: moderate sample; read the interval, not the point"
    return f"n={n}"


def bootstrap_interval(
    x: Sequence[float], y: Sequence[float], statistic: Callable, *, resamples: int, seed: int, level: float = 0.95
) -> tuple[float | None, float | None, int]:
    """Percentile bootstrap interval of statistic(x, y) over points resampled with replacement:
    (low, high, resamples with a defined statistic)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        index = rng.integers(0, len(x), len(x))
        value = statistic(x[index], y[index])
        if value is not None:
            values.append(value)
    if not values:
        return None, None, 0
    low, high = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(low), float(high), len(values)


def correlation(x: Sequence[float], y: Sequence[float], *, resamples: int, seed: int) -> dict[str, Any]:
    """Pearson and Spearman of paired points with bootstrap intervals and the sample-size caveat."""
    out: dict[str, Any] = {"n": len(x), "caveat": caveat(len(x))}
    for name, statistic in (("pearson", pearson), ("spearman", spearman)):
        value = statistic(x, y) if len(x) >= 3 else None
        low, high, defined = (
            bootstrap_interval(x, y, statistic, resamples=resamples, seed=seed) if value is not None else (None, None, 0)
        )
        out[name] = {"value": value, "ci95": [low, high], "defined_resamples": defined, "resamples": resamples}
    return out


def _resolve(base: Path, ref: str, file_name: str) -> str:
    path = ref if "://" in ref or Path(ref).is_absolute() else str(base / ref)
    return path if path.endswith(".json") else store.join(path, file_name)


def _read(uri: str, what: str, config: str) -> dict[str, Any]:
    try:
        return store.read_json(uri)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: {what}: cannot read {uri} ({e})") from None


def downstream_value(evaluation: dict[str, Any], metric: str, model: str | None, where: str) -> float:
    results = evaluation.get("results") or {}
    label = model or ("trained" if "trained" in results else next(iter(results), None) if len(results) == 1 else None)
    if label not in results:
        raise ConfigError(f"{where}: no results for model {label!r} (have {sorted(results)}; set `model`)")
    benchmark, _, name = metric.partition(".")
    value = results[label].get(benchmark, {}).get(name)
    if value is None:
        raise ConfigError(f"{where}: no {metric!r} in results[{label!r}] (have {sorted(results[label])})")
    return float(value)


def correlate(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Correlations of every dataset metric with every downstream metric over the runs of RUNS.yaml."""
    from synthalign_ray.config import load_config

    cfg = load_config(config_path, overrides or [], CorrelateConfig)
    base = Path(config_path).parent
    names = cfg.dataset or list(DATASET_METRICS)
    unknown = [n for n in names if n not in DATASET_METRICS]
    if unknown:
        raise ConfigError(f"{config_path}: dataset: unknown metric(s) {unknown}; known: {list(DATASET_METRICS)}")
    table: dict[str, dict[str, Any]] = {}
    values: dict[str, dict[str, float | None]] = {}
    for i, run in enumerate(cfg.runs):
        stats = _read(_resolve(base, run.stats, "stats.json"), f"runs.{i}.stats", config_path)
        evaluation_uri = _resolve(base, run.evaluation, "evaluation.json")
        evaluation = _read(evaluation_uri, f"runs.{i}.evaluation", config_path)
        row = {name: DATASET_METRICS[name](stats) for name in names}
        row.update({m: downstream_value(evaluation, m, cfg.model, f"{config_path}: runs.{i}.evaluation ({evaluation_uri})") for m in cfg.downstream})
        values[run.name] = row
    for d in names:
        for m in cfg.downstream:
            points = [(v[d], v[m]) for v in values.values() if v[d] is not None and math.isfinite(v[d])]
            result = correlation([p[0] for p in points], [p[1] for p in points], resamples=cfg.bootstrap, seed=cfg.seed)
            table.setdefault(d, {})[m] = {**result, "runs_without_metric": len(values) - len(points)}
    return {"runs": values, "correlations": table, "config": cfg.model_dump(mode="json")}


def _fmt(stat: dict[str, Any]) -> str:
    if stat["value"] is None:
        return "n/a"
    low, high = stat["ci95"]
    return f"{stat['value']:+.2f} [{low:+.2f}, {high:+.2f}]"


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Dataset metrics vs downstream metrics",
        "",
        f"{len(result['runs'])} runs. Pearson r and Spearman rho with percentile bootstrap 95% intervals "
        f"({result['config']['bootstrap']} resamples of the runs). Correlation over a few runs is not evidence of a relation; "
        "read the caveat beside every number.",
        "",
        "| dataset metric | downstream | n | Pearson r [95% CI] | Spearman rho [95% CI] | caveat |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d, by_metric in result["correlations"].items():
        for m, c in by_metric.items():
            lines.append(f"| {d} | {m} | {c['n']} | {_fmt(c['pearson'])} | {_fmt(c['spearman'])} | {c['caveat']} |")
    lines += ["", "| run | " + " | ".join(next(iter(result["runs"].values()))) + " |"]
    lines.append("| --- |" + " --- |" * len(next(iter(result["runs"].values()))))
    for name, row in result["runs"].items():
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None else f"{v:.4g}" for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def scatter_png(result: dict[str, Any], dataset_metric: str, downstream_metric: str) -> bytes | None:
    from synthalign_ray.report.plots import _png, plt

    points = [(name, v[dataset_metric], v[downstream_metric]) for name, v in result["runs"].items() if v[dataset_metric] is not None]
    if len(points) < 2:
        return None
    c = result["correlations"][dataset_metric][downstream_metric]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.scatter([p[1] for p in points], [p[2] for p in points], color="#2a7ab0")
    for name, x, y in points:
        ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(dataset_metric)
    ax.set_ylabel(downstream_metric)
    ax.set_title(f"r {_fmt(c['pearson'])}, rho {_fmt(c['spearman'])}\n{c['caveat']}", fontsize=8)
    return _png(fig)


def write_correlations(config_path: str, output: str, overrides: list[str] | None = None) -> dict[str, Any]:
    """correlations.json, correlations.md and plots/<dataset>__<downstream>.png in `output`."""
    result = correlate(config_path, overrides)
    store.write_json(store.join(output, "correlations.json"), result)
    store.write_bytes(store.join(output, "correlations.md"), render_markdown(result).encode())
    for d, by_metric in result["correlations"].items():
        for m in by_metric:
            png = scatter_png(result, d, m)
            if png is not None:
                store.write_bytes(store.join(output, "plots", f"{d}__{m}.png"), png)
    return result

