"""The Hugging Face dataset card (README.md) of a run, rendered from the report's numbers alone.

`report_stats` joins the streaming statistics with the run's manifest into the dict written as
stats.json; `render_card` only formats that dict, so every number in the card is in stats.json.
YAML front matter follows the Hub's dataset card metadata: license, task_categories, size_categories,
tags, pretty_name, configs (pairs/*.parquet as the train split) and dataset_info (features, split size).
"""

from __future__ import annotations

import datetime
from typing import Any

import yaml

from synthalign_ray import store
from synthalign_ray.report import stats as rules

TASK_CATEGORIES = ["image-text-to-text", "visual-question-answering"]
TAGS = ["dpo", "preference", "synthetic", "multimodal", "synth-align", "pds-dpo"]
# The Hub's size buckets, by number of examples.
SIZE_CATEGORIES = [
    (1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
    (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
]  # fmt: skip
PLOT_CAPTIONS = {
    "guidance_selection.png": "Share of rows whose kept image came from each guidance scale (paper Fig. 5)",
    "image_scores.png": "Image scores of all candidates and of the kept image",
    "scorer_agreement.png": "Top-k agreement of the image scorers (paper Table 4)",
    "margins.png": "Chosen - rejected margins",
    "response_lengths.png": "Response length, chosen vs rejected",
    "model_matrix.png": "Chosen model x rejected model",
    "prompt_classes.png": "Instruction class by category",
    "hard_negatives.png": "Hard-negative composition of the rejected answers",
}


def size_category(n: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if n < bound:
            return name
    return "n>1B"


def report_stats(
    numbers: dict[str, Any], manifest: dict[str, Any] | None, *, run: str, license: str, plots: list[str], sample_size: int
) -> dict[str, Any]:
    """stats.json: the statistics, the manifest's counts, models, config and versions, and report metadata."""
    manifest = manifest or {}
    counts = manifest.get("counts")
    rows = numbers["rows"]
    shard_counts = {"pairs": rows["pairs"], "dropped": rows["dropped"], "failed": rows["failed"]}
    mismatch = None
    if counts is not None:
        recorded = {key: counts.get(key) for key in shard_counts}
        if recorded != shard_counts:
            mismatch = {"manifest": recorded, "shards": shard_counts}
    return {
        "run": run,
        "report_created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "license": license,
        "manifest": {
            "present": bool(manifest),
            "complete": manifest.get("complete"),
            "counts": counts,
            "counts_mismatch": mismatch,
            "models": manifest.get("models", {}),
            "config_source": manifest.get("config_source"),
            "config_fingerprint": manifest.get("config_fingerprint"),
            "seconds": manifest.get("seconds"),
        },
        "config": manifest.get("config"),
        "versions": {"generation": manifest.get("versions", {}), "report": store.package_versions()},
        "size_category": size_category(rows["pairs"]),
        "plots": [f"plots/{name}" for name in plots],
        "sample_size": sample_size,
        **numbers,
    }


def _f(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _plot(report: dict[str, Any], name: str) -> str:
    path = f"plots/{name}"
    return f"![{PLOT_CAPTIONS[name]}]({path})\n" if path in report["plots"] else ""


def front_matter(report: dict[str, Any], features: dict | None, pretty_name: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "license": report["license"],
        "task_categories": TASK_CATEGORIES,
        "language": ["en"],
        "tags": TAGS,
        "size_categories": [report["size_category"]],
        "pretty_name": pretty_name or "Synth-Align synthetic preference pairs",
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "pairs/*.parquet"}]}],
    }
    info: dict[str, Any] = {"splits": [{"name": "train", "num_examples": report["rows"]["pairs"]}]}
    if features:
        from datasets import Features

        info = {"features": Features.from_dict(features)._to_yaml_list(), **info}
    meta["dataset_info"] = info
    return meta


def render_card(report: dict[str, Any], *, features: dict | None = None, pretty_name: str | None = None) -> str:
    """The dataset card's Markdown with YAML front matter."""
    rows, manifest = report["rows"], report["manifest"]
    out = ["---", yaml.safe_dump(front_matter(report, features, pretty_name), sort_keys=False).rstrip(), "---", ""]
    add = out.append
    add(f"# {pretty_name or 'Synth-Align synthetic preference pairs'}\n")
    add(
        "Multimodal preference pairs made by the Synth-Align / PDS-DPO pipeline (synthalign-ray): a diffusion model "
        "renders one image per guidance scale for each text-to-image prompt, an image scorer keeps the best one, "
        "LVLMs answer an instruction about it, and a reward model ranks the answers: chosen = best, rejected = worst. "
        f"Report made {report['report_created']} from `{report['run']}`.\n"
    )
    add("```python\nimport datasets\npairs = datasets.load_dataset(\"parquet\", data_files=\"pairs/*.parquet\", split=\"train\")\n"
        "# TRL vision DPO columns: images, prompt, chosen, rejected\n```\n")  # fmt: skip

    add("## Counts\n")
    counts = manifest["counts"] or {}
    table = [["pairs (train split)", rows["pairs"]], ["dropped", rows["dropped"]], ["failed", rows["failed"]],
             ["rows in the shards", rows["total"]]]  # fmt: skip
    if counts:
        table += [["input rows (manifest)", counts.get("input_rows")], ["input rows rejected (manifest)", counts.get("rejected_input_rows")]]
    add(_table(["", "rows"], table) + "\n")
    if manifest["counts_mismatch"]:
        add(f"**Warning:** the manifest's counts differ from the shards: {manifest['counts_mismatch']} (an unfinished run?).\n")
    if not manifest["present"]:
        add("No manifest.json in the run folder: models, config and versions of the generation are unknown.\n")
    if rows["dropped_by_reason"]:
        add("Drop reasons (see synthalign-ray's docs/generation.md, Output):\n")
        add(_table(["drop_reason", "rows"], [[k, v] for k, v in rows["dropped_by_reason"].items()]) + "\n")
    if rows["failed_by_stage"]:
        add(_table(["failed_stage", "rows"], [[k, v] for k, v in rows["failed_by_stage"].items()]) + "\n")
    statuses = sorted({s for c in rows["by_category"].values() for s in c})
    add("By category:\n")
    add(_table(["category", *statuses], [[c, *(v.get(s, 0) for s in statuses)] for c, v in rows["by_category"].items()]) + "\n")

    add("## Models\n")
    models = report["models"]
    if manifest["models"]:
        add(_table(["role", "model"], [[k, f"`{v}`"] for k, v in manifest["models"].items()]) + "\n")
    add(_table(["answering model", "answers", "chosen", "rejected"],
               [[m, models["answers"].get(m, 0), models["chosen"].get(m, 0), models["rejected"].get(m, 0)] for m in models["names"]]) + "\n")  # fmt: skip
    if models["finish_reasons"]:
        add("Answers by finish reason: " + ", ".join(f"{k} {v}" for k, v in models["finish_reasons"].items()) + ".\n")
    add(_plot(report, "model_matrix.png"))

    add("## Image selection\n")
    guidance = report["guidance"]
    if guidance["rows"]:
        add(f"Guidance scale of the kept image, over {guidance['rows']} rows with a selected image (pairs and dropped rows):\n")
        add(_table(["guidance scale", "rows", "share"], [[s, guidance["selected"][s], _pct(guidance["share"][s])] for s in guidance["scales"]]) + "\n")
        add(_plot(report, "guidance_selection.png"))
    images = report["image_scores"]
    add(_table(["image score (image_scores)", "n", "mean", "median", "min", "max"],
               [[name, s["count"], _f(s["mean"]), _f(s["median"]), _f(s["min"]), _f(s["max"])]
                for name, s in (("kept image", images["selected"]), ("all candidates", images["candidates"]))]) + "\n")  # fmt: skip
    add(_plot(report, "image_scores.png"))

    add("### Scorer agreement (paper Table 4)\n")
    agreement = report["scorer_agreement"]
    if agreement["rows"]:
        add(f"Over {agreement['rows']} rows where ImageReward, CLIP and BLIP all scored every candidate image. "
            "overlap@k = |top-k of one scorer & top-k of the other (& the third)| / k, averaged over rows, in percent; "
            "@1 is the share of rows where they keep the same image. In brackets: the level of scorers ranking at random. "
            "Spearman: rank correlation of two scorers over a row's candidates (ties averaged), mean over rows.\n")  # fmt: skip
        header = ["scorers", "@ top 1", "@ top 2", "@ top 3", "Spearman (mean)", "rows with rho"]
        body = []
        for name, group in agreement["pairs"].items():
            cells = [f"{group[k]['percent']:.1f} ({group[k]['chance_percent']:.1f})" if k in group else "n/a" for k in ("top1", "top2", "top3")]
            body.append([name, *cells, (f"{group['spearman_mean']:.3f}" if group.get("spearman_mean") is not None else "n/a") if name != "All 3" else "", group.get("spearman_rows", "")])
        add(_table(header, body) + "\n")
        add(_plot(report, "scorer_agreement.png"))
    else:
        add(f"Not computed: no row has all three scorers' scores ({agreement['rows_without_all_scorers']} rows with a "
            "selected image lack CLIP or BLIP scores; set `image_scores.clip` and `image_scores.blip`).\n")  # fmt: skip

    add("## Pairs\n")
    margins = report["margins"]
    add(f"Margin = score(chosen) - score(rejected), in the units of `pairs.rank_by`: mean {_f(margins['mean'])}, "
        f"median {_f(margins['median'])}, quartiles {_f(margins['p25'])} / {_f(margins['p75'])}, range {_f(margins['min'])} .. {_f(margins['max'])} "
        f"over {margins['count']} pairs.\n")  # fmt: skip
    add(_plot(report, "margins.png"))
    words = report["response_words"]
    add(_table(["answer length (words)", "mean", "median", "min", "max"],
               [[side, _f(words[side]["mean"]), _f(words[side]["median"]), _f(words[side]["min"]), _f(words[side]["max"])]
                for side in ("chosen", "rejected")]) + "\n")  # fmt: skip
    add(f"The chosen answer is longer than the rejected one in {_pct(report['chosen_longer_share'])} of pairs.\n")
    add(_plot(report, "response_lengths.png"))

    add("### Instruction classes\n")
    classes = report["instruction_classes"]
    add("A transparent keyword classifier (`synthalign_ray/report/stats.py: classify_instruction`): commonsense cues "
        "(why, what might, purpose, ...) first, then interpretive cues (mood, feel, symbolize, style, ...), then direct "
        "visual cues (describe, what color, how many, ...); no cue: other.\n")  # fmt: skip
    add(_table(["category", *classes["classes"]], [[c, *(v[k] for k in classes["classes"])] for c, v in classes["by_category"].items()]
               + [["**all**", *(classes["total"][k] for k in classes["classes"])]]) + "\n")  # fmt: skip
    add(_plot(report, "prompt_classes.png"))

    add("### Hard negatives\n")
    hard = report["hard_negatives"]
    add(f"Kind of each pair's rejected answer (`hard_negative_kind`): empty-ish (<= {rules.EMPTYISH_MAX_WORDS} words), short "
        f"(<= {rules.SHORT_MAX_WORDS} words or under a third of the chosen answer's words), generic (a refusal or boilerplate "
        f"phrase, or <= {rules.GENERIC_MAX_CONTENT_WORDS} distinct content words), repetitive (under "
        f"{rules.REPETITIVE_MAX_DISTINCT_TRIGRAMS:.0%} distinct word trigrams) are easy negatives; a fluent answer is a near "
        f"miss when the margin is <= {_f(hard['near_miss_margin'])} ({hard['near_miss_margin_source']}), else a clear loss.\n")  # fmt: skip
    total = sum(hard["counts"].values())
    add(_table(["kind", "pairs", "share"], [[k, v, _pct(v / total if total else None)] for k, v in hard["counts"].items()]) + "\n")
    add(_plot(report, "hard_negatives.png"))

    add("## Generation\n")
    if manifest["config_source"] or manifest["config_fingerprint"]:
        add(f"Config `{manifest['config_source']}` (fingerprint `{manifest['config_fingerprint']}`), run time {_f(manifest['seconds'])} s.\n")
    if report["config"]:
        add("<details><summary>Config</summary>\n\n```yaml\n" + yaml.safe_dump(report["config"], sort_keys=False).rstrip() + "\n```\n</details>\n")
    versions = report["versions"]
    names = sorted(set(versions["generation"]) | set(versions["report"]))
    add(_table(["package", "generation", "report"], [[n, versions["generation"].get(n, ""), versions["report"].get(n, "")] for n in names]) + "\n")
    add(f"License: `{report['license']}`. The images are synthetic; check the licenses of the diffusion model and the "
        "answering LVLMs before redistribution.\n")  # fmt: skip
    return "\n".join(out)
