"""Dataset statistics of a generation run: pure functions and a streaming accumulator (no Ray, no torch).

`RunStats.add_batch` takes one Arrow record batch at a time (only the columns in STATS_COLUMNS), so a
report reads a run shard by shard and never holds its text or images. What it keeps grows with the
number of rows only as a few numbers per row (scores, margins, lengths), for the distributions.

Definitions (the card and stats.json use these names):

- Scorer agreement (paper Table 4). For a row where ImageReward, CLIP and BLIP all scored the same K
  candidate images, top-k(scorer) is the set of the k best-scored images (ties to the lower index, as
  `selection.argmax`). overlap@k of two scorers = |top-k(a) & top-k(b)| / k; of all three =
  |top-k(a) & top-k(b) & top-k(c)| / k; the table reports its mean over rows, in percent. At k = 1 it is
  the share of rows where the scorers pick the same image. The paper's numbers have this form (top-3
  values in thirds: 79.13 %), and set equality could not give them (it is 25 % by chance at k = 3 of
  4). Chance level, for scorers that rank at random: k / K for two scorers, (k / K)^2 for three.
- Spearman per scorer pair: within a row, Spearman's rho of the two scorers' scores over its K images
  (average ranks for ties), averaged over rows; rows where a scorer gives every image the same score
  have no rho and are counted apart.
- Instruction classes (`classify_instruction`) and hard-negative kinds (`hard_negative_kind`): the rules
  are in their docstrings and the constants above them.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

SCORERS = ("image_scores", "clip_scores", "blip_scores")
SCORER_NAMES = {"image_scores": "ImageReward", "clip_scores": "CLIP", "blip_scores": "BLIP"}
TOP_KS = (1, 2, 3)

# The columns the statistics read; a shard may lack some (failed rows stop before later stages).
STATS_COLUMNS = (
    "id", "category", "status", "drop_reason", "failed_stage", "guidance_scales", "image_index", *SCORERS,
    "instruction", "responses", "response_scores", "chosen_model", "rejected_model", "margin",
    "chosen_text", "rejected_text",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Scorer agreement and rank correlation
# ---------------------------------------------------------------------------------------------------


def top_k(scores: Sequence[float], k: int) -> set[int]:
    """Indexes of the k highest scores; ties go to the lower index (as `selection.argmax`)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return set(order[:k])


def overlap_at_k(rankings: Sequence[Sequence[float]], k: int) -> float:
    """|intersection of every scorer's top-k| / k for one row (1.0 = the same k images)."""
    sets = [top_k(scores, k) for scores in rankings]
    return len(set.intersection(*sets)) / k


def chance_overlap(n_scorers: int, k: int, n_candidates: int) -> float:
    """Expected overlap@k of scorers ranking n_candidates at random: each image is in a scorer's
    top-k with probability k / K, independently across scorers, so E|intersection| = K (k/K)^n."""
    return (k / n_candidates) ** (n_scorers - 1)


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (what Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    start = 0
    while start < len(x):
        end = start
        while end + 1 < len(x) and sorted_x[end + 1] == sorted_x[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Pearson's r; None when either side is constant or there are fewer than 2 points."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"pearson: {len(a)} values vs {len(b)}")
    if len(a) < 2:
        return None
    a, b = a - a.mean(), b - b.mean()
    denominator = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return None if denominator == 0 else float((a * b).sum() / denominator)


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rho: Pearson's r of the average ranks; None when either side is constant."""
    return pearson(average_ranks(x), average_ranks(y))


# ---------------------------------------------------------------------------------------------------
# Text rules: response length, instruction class, hard-negative kind
# ---------------------------------------------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def words(text: str | None) -> list[str]:
    return _WORD.findall(text.lower()) if text else []


def word_count(text: str | None) -> int:
    return len(words(text))


INSTRUCTION_CLASSES = ("direct visual description", "interpretive", "commonsense", "other")
# Checked in this order; the first class with a matching cue wins. Cues are whole words or phrases.
# commonsense: knowledge or reasoning about the world beyond what is drawn (causes, purposes, what next).
COMMONSENSE_CUES = (
    "why", "what might", "what could", "what would", "what will", "what if", "how might", "how could",
    "how would", "what is likely", "likely", "probably", "predict", "purpose", "used for", "what should",
    "should", "safe", "safety", "danger", "dangerous", "infer", "reason", "explain", "typically", "usually",
    "happen", "happened", "happening next", "cause", "benefit", "risk",
)  # fmt: skip
# interpretive: mood, meaning, style, story: judgements a viewer makes about the image.
INTERPRETIVE_CUES = (
    "mood", "atmosphere", "feel", "feeling", "feelings", "emotion", "emotions", "emotional", "convey",
    "conveys", "symbol", "symbolize", "symbolism", "represent", "represents", "story", "meaning", "mean",
    "interpret", "interpretation", "impression", "style", "artistic", "aesthetic", "evoke", "evokes",
    "suggest", "suggests", "tone", "theme", "imagine", "vibe", "message", "narrative",
)  # fmt: skip
# direct visual description: what is visible (objects, colours, counts, positions, a description).
DIRECT_CUES = (
    "describe", "description", "what is in", "what is shown", "what does the image show", "what do you see",
    "what color", "what colour", "colors", "colours", "how many", "count", "list", "identify", "where",
    "which", "what is the", "what are the", "what objects", "caption", "visible", "see", "show", "shows",
    "detail", "details", "look like", "wearing", "holding", "located", "position", "background", "foreground",
)  # fmt: skip


def _cue_pattern(cues: Sequence[str]) -> re.Pattern:
    return re.compile(r"\b(" + "|".join(re.escape(cue) for cue in cues) + r")\b")


_CLASS_PATTERNS = (
    ("commonsense", _cue_pattern(COMMONSENSE_CUES)),
    ("interpretive", _cue_pattern(INTERPRETIVE_CUES)),
    ("direct visual description", _cue_pattern(DIRECT_CUES)),
)


def classify_instruction(instruction: str | None) -> str:
    """The kind of request an instruction makes, by keyword cues (a transparent rule, not a model).

    Lower-cased, the instruction is matched against COMMONSENSE_CUES, then INTERPRETIVE_CUES, then
    DIRECT_CUES (whole words / phrases); the first list with a match names the class, so "Describe the
    mood" is interpretive and "Why is the man holding an umbrella?" is commonsense. No cue: "other".
    """
    text = " ".join((instruction or "").lower().split())
    for name, pattern in _CLASS_PATTERNS:
        if pattern.search(text):
            return name
    return "other"


HARD_NEGATIVE_KINDS = ("empty-ish", "short", "generic", "repetitive", "near miss", "clear loss")
EASY_KINDS = ("empty-ish", "short", "generic", "repetitive")
EMPTYISH_MAX_WORDS = 2  # "Yes.", "A dog." : no answer to speak of
SHORT_MAX_WORDS = 9  # fewer than 10 words ...
SHORT_CHOSEN_RATIO = 1 / 3  # ... or under a third of the chosen answer's words
GENERIC_PHRASES = (
    "i'm sorry", "i am sorry", "i cannot", "i can't", "i can not", "as an ai", "i don't know", "i do not know",
    "not sure", "unable to", "no image", "cannot see", "can't see", "it is an image", "this is an image",
    "the image shows an image", "it is a picture", "this is a picture",
)  # fmt: skip
GENERIC_MAX_CONTENT_WORDS = 3  # at most 3 distinct non-stop words: says nothing specific
REPETITIVE_MIN_WORDS = 6
REPETITIVE_MAX_DISTINCT_TRIGRAMS = 0.5  # under half of its word trigrams distinct: loops
STOP_WORDS = frozenset(
    "a an the this that these those is are was were be been it its of in on at to and or with for from by "
    "as there here image picture photo shows show i you he she they we my your his her their".split()
)


def distinct_trigram_share(tokens: Sequence[str]) -> float:
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(trigrams)) / len(trigrams) if trigrams else 1.0


def hard_negative_kind(rejected: str | None, chosen: str | None, margin: float, near_miss_margin: float) -> str:
    """What kind of negative a pair's rejected answer is. Rules, in order (the first that holds):

      empty-ish   at most EMPTYISH_MAX_WORDS words
      short       at most SHORT_MAX_WORDS words, or under SHORT_CHOSEN_RATIO of the chosen answer's words
      generic     contains a GENERIC_PHRASES phrase (refusal, hedge, "it is a picture"), or at most
                  GENERIC_MAX_CONTENT_WORDS distinct words outside STOP_WORDS
      repetitive  at least REPETITIVE_MIN_WORDS words and under REPETITIVE_MAX_DISTINCT_TRIGRAMS of its
                  word trigrams distinct (a generation loop)
      near miss   none of the above (a fluent answer) and margin <= near_miss_margin
      clear loss  a fluent answer that lost by more than near_miss_margin
    The first four are the easy negatives; near misses are the hard ones.
    """
    tokens = words(rejected)
    n = len(tokens)
    if n <= EMPTYISH_MAX_WORDS:
        return "empty-ish"
    if n <= SHORT_MAX_WORDS or n < SHORT_CHOSEN_RATIO * word_count(chosen):
        return "short"
    lowered = " ".join((rejected or "").lower().replace("’", "'").split())
    content = {token for token in tokens if token not in STOP_WORDS}
    if any(phrase in lowered for phrase in GENERIC_PHRASES) or len(content) <= GENERIC_MAX_CONTENT_WORDS:
        return "generic"
    if n >= REPETITIVE_MIN_WORDS and distinct_trigram_share(tokens) < REPETITIVE_MAX_DISTINCT_TRIGRAMS:
        return "repetitive"
    return "near miss" if margin <= near_miss_margin else "clear loss"


# ---------------------------------------------------------------------------------------------------
# Small numeric summaries
# ---------------------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float | int | None]:
    """count, mean, std, min, quartiles, max of the finite values (None where there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if not len(x):
        return {"count": 0, "mean": None, "std": None, "min": None, "p25": None, "median": None, "p75": None, "max": None}
    p25, median, p75 = np.percentile(x, [25, 50, 75])
    return {
        "count": int(len(x)), "mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()),
        "p25": float(p25), "median": float(median), "p75": float(p75), "max": float(x.max()),
    }  # fmt: skip


def shares(counts: dict[Any, int]) -> dict[Any, float]:
    total = sum(counts.values())
    return {key: (n / total if total else 0.0) for key, n in counts.items()}


def scale_label(scale: float) -> str:
    return f"{scale:g}"


# ---------------------------------------------------------------------------------------------------
# The streaming accumulator
# ---------------------------------------------------------------------------------------------------


@dataclass
class RunStats:
    """Everything the report says about a run, added up one record batch at a time."""

    near_miss_margin: float | None = None  # None: the lower quartile of the run's margins (decided at the end)
    status: Counter = field(default_factory=Counter)
    drop_reasons: Counter = field(default_factory=Counter)
    failed_stages: Counter = field(default_factory=Counter)
    rows_by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))  # category -> status
    # guidance scale chosen, over rows where an image was selected (pairs and dropped rows alike)
    guidance_selected: Counter = field(default_factory=Counter)
    guidance_by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    guidance_offered: Counter = field(default_factory=Counter)  # how many rows had each scale as a candidate
    selected_image_scores: list[float] = field(default_factory=list)
    selected_clip_scores: list[float] = field(default_factory=list)  # of the kept image (chosen by image_scores)
    selected_blip_scores: list[float] = field(default_factory=list)
    candidate_image_scores: list[float] = field(default_factory=list)
    # scorer agreement: sums of per-row overlap@k and chance, by scorer group
    agreement_rows: int = 0
    agreement_missing: int = 0  # rows with an image but not all three scorers' scores
    overlap_sums: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    overlap_rows: dict[int, int] = field(default_factory=Counter)
    chance_sums: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(float)))
    spearman_values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    spearman_undefined: Counter = field(default_factory=Counter)
    # pairs
    margins: list[float] = field(default_factory=list)
    chosen_words: list[int] = field(default_factory=list)
    rejected_words: list[int] = field(default_factory=list)
    model_matrix: Counter = field(default_factory=Counter)  # (chosen_model, rejected_model) -> pairs
    models_seen: Counter = field(default_factory=Counter)  # answers per model, over rows with answers
    answer_finish: Counter = field(default_factory=Counter)  # finish_reason of every answer
    class_by_category: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    _easy_kinds: list[str] = field(default_factory=list)  # per pair: an easy kind, or "" for fluent

    # --- one batch --------------------------------------------------------------------------------

    def add_batch(self, batch: pa.RecordBatch | pa.Table) -> None:
        for row in batch.to_pylist():
            self.add_row(row)

    def add_row(self, row: dict[str, Any]) -> None:
        status = row.get("status") or "unknown"
        category = row.get("category") or "(none)"
        self.status[status] += 1
        self.rows_by_category[category][status] += 1
        if row.get("drop_reason"):
            self.drop_reasons[row["drop_reason"]] += 1
        if status == "failed":
            self.failed_stages[row.get("failed_stage") or "(unknown)"] += 1
        self._add_images(row, category)
        for response in row.get("responses") or []:
            self.models_seen[response.get("model") or "(unknown)"] += 1
            self.answer_finish[response.get("finish_reason") or ("error" if response.get("error") else "(none)")] += 1
        if status == "ok":
            self._add_pair(row, category)

    def _add_images(self, row: dict[str, Any], category: str) -> None:
        scales, index, scores = row.get("guidance_scales"), row.get("image_index"), row.get("image_scores")
        if scales is None or index is None:
            return
        for scale in scales:
            self.guidance_offered[scale_label(scale)] += 1
        label = scale_label(scales[index])
        self.guidance_selected[label] += 1
        self.guidance_by_category[category][label] += 1
        if scores:
            self.candidate_image_scores.extend(s for s in scores if s is not None)
            if scores[index] is not None:
                self.selected_image_scores.append(scores[index])
        for column, kept in (("clip_scores", self.selected_clip_scores), ("blip_scores", self.selected_blip_scores)):
            values = row.get(column)
            if values is not None and index < len(values) and values[index] is not None:
                kept.append(values[index])
        rankings = [row.get(name) for name in SCORERS]
        usable = all(r is not None and len(r) == len(scales) and all(s is not None and math.isfinite(s) for s in r) for r in rankings)
        if not usable:
            self.agreement_missing += 1
            return
        self.agreement_rows += 1
        n = len(scales)
        groups = {f"{SCORERS[a]}|{SCORERS[b]}": (rankings[a], rankings[b]) for a, b in ((0, 1), (0, 2), (1, 2))}
        for k in TOP_KS:
            if k > n:
                continue
            self.overlap_rows[k] += 1
            for name, pair in groups.items():
                self.overlap_sums[name][k] += overlap_at_k(pair, k)
                self.chance_sums[name][k] += chance_overlap(2, k, n)
            self.overlap_sums["all"][k] += overlap_at_k(rankings, k)
            self.chance_sums["all"][k] += chance_overlap(3, k, n)
        for name, (a, b) in groups.items():
            rho = spearman(a, b)
            if rho is None:
                self.spearman_undefined[name] += 1
            else:
                self.spearman_values[name].append(rho)

    def _add_pair(self, row: dict[str, Any], category: str) -> None:
        self.margins.append(float(row["margin"]) if row.get("margin") is not None else float("nan"))
        self.chosen_words.append(word_count(row.get("chosen_text")))
        self.rejected_words.append(word_count(row.get("rejected_text")))
        self.model_matrix[(row.get("chosen_model") or "(unknown)", row.get("rejected_model") or "(unknown)")] += 1
        self.class_by_category[category][classify_instruction(row.get("instruction"))] += 1
        # The easy kinds do not depend on the margin; near miss vs clear loss is decided in `result`,
        # once the margin threshold is known (+inf here: only an easy kind can come back).
        kind = hard_negative_kind(row.get("rejected_text"), row.get("chosen_text"), 0.0, float("inf"))
        self._easy_kinds.append(kind if kind in EASY_KINDS else "")

    # --- the numbers --------------------------------------------------------------------------------

    def resolved_near_miss_margin(self) -> float | None:
        if self.near_miss_margin is not None:
            return self.near_miss_margin
        finite = [m for m in self.margins if math.isfinite(m)]
        return float(np.percentile(finite, 25)) if finite else None

    def hard_negatives(self) -> Counter:
        threshold = self.resolved_near_miss_margin()
        kinds = Counter({kind: 0 for kind in HARD_NEGATIVE_KINDS})
        for easy, margin in zip(self._easy_kinds, self.margins):
            if easy:
                kinds[easy] += 1
            else:
                kinds["near miss" if threshold is not None and margin <= threshold else "clear loss"] += 1
        return kinds

    def scorer_agreement(self) -> dict[str, Any]:
        table = {}
        for name in [*(f"{SCORERS[a]}|{SCORERS[b]}" for a, b in ((0, 1), (0, 2), (1, 2))), "all"]:
            label = "All 3" if name == "all" else " & ".join(SCORER_NAMES[s] for s in name.split("|"))
            table[label] = {
                f"top{k}": {
                    "percent": 100 * self.overlap_sums[name][k] / self.overlap_rows[k],
                    "chance_percent": 100 * self.chance_sums[name][k] / self.overlap_rows[k],
                }
                for k in TOP_KS
                if self.overlap_rows.get(k)
            }
            if name != "all":
                values = self.spearman_values[name]
                table[label]["spearman_mean"] = float(np.mean(values)) if values else None
                table[label]["spearman_rows"] = len(values)
                table[label]["spearman_undefined_rows"] = self.spearman_undefined[name]
        return {"rows": self.agreement_rows, "rows_without_all_scorers": self.agreement_missing, "pairs": table}

    def result(self) -> dict[str, Any]:
        """The numbers as plain JSON-able values (stats.json)."""
        scales = sorted(self.guidance_offered, key=float)
        by_category = {
            category: {"rows": sum(counts.values()), "share": {s: shares(counts).get(s, 0.0) for s in scales}}
            for category, counts in sorted(self.guidance_by_category.items())
        }
        chosen_models = sorted({c for c, _ in self.model_matrix} | {r for _, r in self.model_matrix} | set(self.models_seen))
        hard = self.hard_negatives()
        pairs = len(self.margins)
        return {
            "rows": {
                "total": sum(self.status.values()),
                "pairs": self.status.get("ok", 0),
                "dropped": self.status.get("dropped", 0),
                "failed": self.status.get("failed", 0),
                "dropped_by_reason": dict(sorted(self.drop_reasons.items())),
                "failed_by_stage": dict(sorted(self.failed_stages.items())),
                "by_category": {c: dict(sorted(s.items())) for c, s in sorted(self.rows_by_category.items())},
            },
            "guidance": {
                "rows": sum(self.guidance_selected.values()),
                "scales": scales,
                "selected": {s: self.guidance_selected.get(s, 0) for s in scales},
                "share": {s: shares(self.guidance_selected).get(s, 0.0) for s in scales},
                "by_category": by_category,
            },
            "image_scores": {
                "selected": summary(self.selected_image_scores),
                "candidates": summary(self.candidate_image_scores),
                "selected_clip": summary(self.selected_clip_scores),
                "selected_blip": summary(self.selected_blip_scores),
            },
            "scorer_agreement": self.scorer_agreement(),
            "margins": summary(self.margins),
            "response_words": {"chosen": summary(self.chosen_words), "rejected": summary(self.rejected_words)},
            "chosen_longer_share": (
                sum(c > r for c, r in zip(self.chosen_words, self.rejected_words)) / pairs if pairs else None
            ),
            "models": {
                "answers": dict(sorted(self.models_seen.items())),
                "finish_reasons": dict(sorted(self.answer_finish.items())),
                "names": chosen_models,
                "chosen": {m: _side(self.model_matrix, 0).get(m, 0) for m in chosen_models},
                "rejected": {m: _side(self.model_matrix, 1).get(m, 0) for m in chosen_models},
                "matrix": {c: {r: self.model_matrix.get((c, r), 0) for r in chosen_models} for c in chosen_models},
            },
            "instruction_classes": {
                "classes": list(INSTRUCTION_CLASSES),
                "by_category": {
                    c: {k: counts.get(k, 0) for k in INSTRUCTION_CLASSES} for c, counts in sorted(self.class_by_category.items())
                },
                "total": {k: sum(c.get(k, 0) for c in self.class_by_category.values()) for k in INSTRUCTION_CLASSES},
            },
            "hard_negatives": {
                "near_miss_margin": self.resolved_near_miss_margin(),
                "near_miss_margin_source": "given" if self.near_miss_margin is not None else "lower quartile of margins",
                "counts": {k: hard[k] for k in HARD_NEGATIVE_KINDS},
                "easy": sum(hard[k] for k in EASY_KINDS),
            },
        }


def _side(matrix: Counter, side: int) -> Counter:
    """Pairs per chosen model (side 0) or per rejected model (side 1)."""
    out: Counter = Counter()
    for models, n in matrix.items():
        out[models[side]] += n
    return out
