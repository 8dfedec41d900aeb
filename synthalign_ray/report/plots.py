"""The report's plots: matplotlib (Agg, no display), one PNG per question a reader asks of the dataset.

Every function takes the numbers of `RunStats` (its `result()` dict, and for distributions the
accumulator itself) and returns the PNG bytes, or None when the run has nothing to show (e.g. no CLIP
or BLIP scores: no agreement plot). Titles say what is counted and over how many rows, so a plot read
alone is not misread.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from matplotlib.ticker import MaxNLocator  # noqa: E402

from synthalign_ray.report.stats import HARD_NEGATIVE_KINDS, EASY_KINDS, RunStats  # noqa: E402

CHOSEN_COLOR, REJECTED_COLOR = "#2a7ab0", "#d0583a"


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _heatmap(ax, matrix: np.ndarray, rows: list[str], cols: list[str], labels: list[list[str]], cmap: str, vmax=None):
    """A heatmap with a text label in each cell, readable on light and dark cells."""
    image = ax.imshow(matrix, cmap=cmap, aspect="auto", vmin=0, vmax=vmax if vmax is not None else max(matrix.max(), 1e-9))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    threshold = (vmax if vmax is not None else matrix.max()) * 0.6
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, labels[i][j], ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > threshold else "black")  # fmt: skip
    return image


def guidance_selection(result: dict[str, Any]) -> bytes | None:
    """Paper Fig. 5: share of rows whose kept image came from each guidance scale, overall and by category."""
    guidance = result["guidance"]
    scales = guidance["scales"]
    if not guidance["rows"]:
        return None
    categories = list(guidance["by_category"])
    # constrained layout leaves room for long category names between the panels (they overlapped the bars)
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, max(3.2, 0.45 * len(categories) + 1.6)), gridspec_kw={"width_ratios": [1, 1.4]}, layout="constrained"
    )
    percents = [100 * guidance["share"][s] for s in scales]
    bars = left.bar(range(len(scales)), percents, color="#5b8cc0", tick_label=scales)
    left.bar_label(bars, labels=[f"{p:.1f}%\n({guidance['selected'][s]})" for p, s in zip(percents, scales)], fontsize=8)
    left.axhline(100 / len(scales), color="grey", linestyle="--", linewidth=1, label=f"uniform ({100 / len(scales):.0f}%)")
    left.set_ylim(0, max(percents) * 1.3 + 1)
    left.set_xlabel("guidance scale of the kept image")
    left.set_ylabel("% of rows")
    left.set_title(f"All categories ({guidance['rows']} rows)")
    left.legend(fontsize=8, loc="upper right")
    matrix = np.array([[100 * guidance["by_category"][c]["share"][s] for s in scales] for c in categories])
    names = [f"{c} (n={guidance['by_category'][c]['rows']})" for c in categories]
    image = _heatmap(right, matrix, names, scales, [[f"{v:.0f}%" for v in row] for row in matrix], "Blues", vmax=100)
    right.set_xlabel("guidance scale of the kept image")
    right.set_title("By category (% of the category's rows)")
    fig.colorbar(image, ax=right, fraction=0.04)
    fig.suptitle("Which guidance scale the image scorer selected")
    return _png(fig)


def image_scores(stats: RunStats) -> bytes | None:
    """Scores of every candidate image vs of the kept ones (the argmax of each row)."""
    if not stats.candidate_image_scores:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    candidates, kept = np.asarray(stats.candidate_image_scores), np.asarray(stats.selected_image_scores)
    bins = np.histogram_bin_edges(candidates, bins=min(40, max(5, len(candidates) // 5)))
    ax.hist(candidates, bins=bins, color="#b0b0b0", label=f"all candidates (n={len(candidates)})")
    ax.hist(kept, bins=bins, color="#2a7ab0", alpha=0.8, label=f"kept image per row (n={len(kept)})")
    ax.set_xlabel("image score (image_scores: ImageReward)")
    ax.set_ylabel("images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Image scores: candidates vs the kept image")
    ax.legend(fontsize=8)
    return _png(fig)


def margins(stats: RunStats, result: dict[str, Any]) -> bytes | None:
    values = np.asarray([m for m in stats.margins if np.isfinite(m)])
    if not len(values):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.hist(values, bins=min(40, max(5, len(values) // 4)), color="#6a9f58")
    threshold = result["hard_negatives"]["near_miss_margin"]
    if threshold is not None:
        ax.axvline(threshold, color="#d0583a", linestyle="--", linewidth=1.2,
                   label=f"near-miss threshold {threshold:.3g} ({result['hard_negatives']['near_miss_margin_source']})")  # fmt: skip
        ax.legend(fontsize=8)
    ax.set_xlabel("margin = score(chosen) - score(rejected)")
    ax.set_ylabel("pairs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 0.5 ticks on small runs
    ax.set_title(f"Chosen - rejected margins ({len(values)} pairs; median {np.median(values):.3g})")
    return _png(fig)


def response_lengths(stats: RunStats) -> bytes | None:
    if not stats.chosen_words:
        return None
    chosen, rejected = np.asarray(stats.chosen_words), np.asarray(stats.rejected_words)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    top = max(chosen.max(), rejected.max())
    # Word counts are integers: one bin per count (edges at halves) while that stays readable, else 40 bins.
    bins = np.arange(-0.5, top + 1.5) if top <= 60 else np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    # Side-by-side bars, not overlaid: overlapping translucent bars mix into a third colour.
    ax.hist([chosen, rejected], bins=bins, color=[CHOSEN_COLOR, REJECTED_COLOR],
            label=[f"chosen (median {np.median(chosen):g} words)", f"rejected (median {np.median(rejected):g} words)"])  # fmt: skip
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("pairs")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Response length, chosen vs rejected ({len(chosen)} pairs)")
    ax.legend(fontsize=8)
    return _png(fig)


def model_matrix(result: dict[str, Any]) -> bytes | None:
    models = result["models"]
    names = models["names"]
    matrix = np.array([[models["matrix"][c][r] for r in names] for c in names], dtype=float)
    if not matrix.sum():
        return None
    total = matrix.sum()
    fig, ax = plt.subplots(figsize=(2.2 + 1.1 * len(names), 1.6 + 0.8 * len(names)))
    labels = [[f"{int(v)}\n({100 * v / total:.0f}%)" for v in row] for row in matrix]
    image = _heatmap(ax, matrix, names, names, labels, "Purples")
    ax.set_ylabel("chosen answer's model")
    ax.set_xlabel("rejected answer's model")
    ax.set_title(f"Which LVLM wins: pairs by chosen x rejected model ({int(total)} pairs)")
    fig.colorbar(image, ax=ax, fraction=0.05, label="pairs")
    return _png(fig)


def prompt_classes(result: dict[str, Any]) -> bytes | None:
    classes = result["instruction_classes"]
    categories = list(classes["by_category"])
    if not categories:
        return None
    kinds = [k for k in classes["classes"] if k != "other" or classes["total"]["other"]]
    counts = np.array([[classes["by_category"][c][k] for k in kinds] for c in categories], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    percent = 100 * counts / np.where(totals == 0, 1, totals)
    fig, ax = plt.subplots(figsize=(2.5 + 1.8 * len(kinds), 1.4 + 0.45 * len(categories)))
    labels = [[f"{p:.0f}% ({int(n)})" for p, n in zip(prow, nrow)] for prow, nrow in zip(percent, counts)]
    image = _heatmap(ax, percent, [f"{c} (n={int(t)})" for c, t in zip(categories, totals[:, 0])],
                     [k.replace(" description", "\ndescription") for k in kinds], labels, "Greens", vmax=100)  # fmt: skip
    ax.set_title("Instruction class by category (% of the category's pairs; rule-based classifier)")
    fig.colorbar(image, ax=ax, fraction=0.04)
    return _png(fig)


def hard_negatives(result: dict[str, Any]) -> bytes | None:
    counts = result["hard_negatives"]["counts"]
    total = sum(counts.values())
    if not total:
        return None
    kinds = list(HARD_NEGATIVE_KINDS)
    values = [counts[k] for k in kinds]
    colors = ["#e3a35b" if k in EASY_KINDS else ("#c0392b" if k == "near miss" else "#7f8c8d") for k in kinds]
    fig, ax = plt.subplots(figsize=(7, 3.4))
    bars = ax.barh(kinds[::-1], values[::-1], color=colors[::-1])
    ax.bar_label(bars, labels=[f"{v} ({100 * v / total:.0f}%)" for v in values[::-1]], fontsize=8, padding=2)
    ax.set_xlim(0, max(values) * 1.25 + 1)
    ax.set_xlabel("pairs (kind of the rejected answer)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    threshold = result["hard_negatives"]["near_miss_margin"]
    ax.set_title(
        f"Hard-negative composition ({total} pairs): orange = easy negatives,\n"
        f"red = fluent near misses (margin <= {threshold:.3g}), grey = fluent, larger margin"
        if threshold is not None else f"Hard-negative composition ({total} pairs)",
        fontsize=10,
    )  # fmt: skip
    return _png(fig)


def scorer_agreement(result: dict[str, Any]) -> bytes | None:
    agreement = result["scorer_agreement"]
    groups = agreement["pairs"]
    if not agreement["rows"]:
        return None
    labels = list(groups)
    ks = [k for k in ("top1", "top2", "top3") if all(k in groups[g] for g in labels)]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(ks)
    for i, k in enumerate(ks):
        x = np.arange(len(labels)) + (i - (len(ks) - 1) / 2) * width
        values = [groups[g][k]["percent"] for g in labels]
        bars = ax.bar(x, values, width, label=f"@ {k.replace('top', 'top-')}")
        # Values inside the bars: above them they collide with the chance markers.
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, label_type="center", color="white")
        ax.scatter(x, [groups[g][k]["chance_percent"] for g in labels], marker="_", s=200, color="black", zorder=3,
                   label="chance level" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylim(0, 110)
    ax.set_ylabel("mean top-k overlap (%)")
    ax.set_title(f"Scorer agreement on the kept image (paper Table 4; {agreement['rows']} rows)")
    ax.legend(fontsize=8, ncol=len(ks) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return _png(fig)


def all_plots(stats: RunStats, result: dict[str, Any]) -> dict[str, bytes]:
    """File name -> PNG bytes, for every plot the run has data for (in the card's order)."""
    plots = {
        "guidance_selection.png": guidance_selection(result),
        "image_scores.png": image_scores(stats),
        "scorer_agreement.png": scorer_agreement(result),
        "margins.png": margins(stats, result),
        "response_lengths.png": response_lengths(stats),
        "model_matrix.png": model_matrix(result),
        "prompt_classes.png": prompt_classes(result),
        "hard_negatives.png": hard_negatives(result),
    }
    return {name: png for name, png in plots.items() if png is not None}
