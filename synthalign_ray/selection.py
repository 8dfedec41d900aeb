"""Pure selection rules shared by the stages: no Ray, no torch, unit-tested in tests/unit/.

Ties go to the lowest index (the first candidate), so selection is deterministic whatever the order of
evaluation; non-finite scores (NaN, inf from a broken scorer) never win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


class NoValidScore(ValueError):
    """Every candidate's score is missing or non-finite: nothing can be selected."""


def _valid(scores: Sequence[float | None]) -> list[tuple[int, float]]:
    return [(i, float(s)) for i, s in enumerate(scores) if s is not None and math.isfinite(s)]


def argmax(scores: Sequence[float | None]) -> int:
    """Index of the highest finite score; the first one on ties."""
    valid = _valid(scores)
    if not valid:
        raise NoValidScore(f"no finite score among {len(scores)} candidates")
    return max(valid, key=lambda item: (item[1], -item[0]))[0]


def argmin(scores: Sequence[float | None]) -> int:
    """Index of the lowest finite score; the first one on ties."""
    valid = _valid(scores)
    if not valid:
        raise NoValidScore(f"no finite score among {len(scores)} candidates")
    return min(valid, key=lambda item: (item[1], item[0]))[0]


# ---------------------------------------------------------------------------------------------------
# Preference pairs (paper eq. 10): chosen = argmax reward, rejected = argmin reward, among VALID answers.
# ---------------------------------------------------------------------------------------------------

# Why a row did not become a pair: the fixed vocabulary written to the `drop_reason` column.
DROP_TOO_FEW_VALID = "too_few_valid"  # fewer than `min_valid` valid answers (see `is_valid_answer`)
DROP_TIE = "tie"  # every valid answer has the same score (best == worst) and `drop_ties` is set
DROP_LOW_MARGIN = "low_margin"  # best - worst < `min_margin`
DROP_SAME_TEXT = "same_text"  # chosen and rejected read the same once whitespace is normalised
DROP_REASONS = (DROP_TOO_FEW_VALID, DROP_TIE, DROP_LOW_MARGIN, DROP_SAME_TEXT)


@dataclass(frozen=True)
class Pair:
    """A preference pair: indexes into the row's answers, and the reward margin (best - worst >= 0)."""

    chosen: int
    rejected: int
    margin: float


@dataclass(frozen=True)
class Drop:
    """A row that does not become a pair: `reason` is one of DROP_REASONS; `detail` is for humans."""

    reason: str
    detail: str = ""


def normalize_text(text: str) -> str:
    """Whitespace-normalised text: runs of whitespace become one space, ends are stripped."""
    return " ".join(text.split())


def is_valid_answer(text: str | None, score: float | None, *, min_chars: int = 1, max_chars: int | None = None) -> bool:
    """Whether an answer may take part in a pair, as chosen or as rejected.

    Valid = a finite score (not None / NaN / inf: an errored or unscored answer), a string text that is
    not empty, and a length within [min_chars, max_chars]. The length is counted in characters of the
    text without leading and trailing whitespace, so a whitespace-only answer is empty; `min_chars` is
    at least 1 whatever the caller passes. Length is part of validity, not a drop reason of its own: an
    answer out of bounds is ignored, and the row is dropped as `too_few_valid` only if too few answers
    remain.
    """
    if score is None or not isinstance(text, str):
        return False
    try:
        if not math.isfinite(score):
            return False
    except TypeError:
        return False
    n = len(text.strip())
    return n >= max(1, min_chars) and (max_chars is None or n <= max_chars)


def select_pair(
    texts: Sequence[str | None],
    scores: Sequence[float | None],
    *,
    min_valid: int = 2,
    min_margin: float = 0.0,
    drop_ties: bool = True,
    min_chars: int = 1,
    max_chars: int | None = None,
) -> Pair | Drop:
    """Chosen = the highest-scoring valid answer, rejected = the lowest-scoring one (paper eq. 10).

    Only valid answers (`is_valid_answer`) compete, so an empty or errored answer can never be chosen
    or rejected (the official code ranks every answer, an empty one included). Ties go to the first
    index on both sides, as in `argmax` / `argmin`. The checks run in this order, the first that fails
    gives the drop reason:
      too_few_valid  fewer than `min_valid` valid answers
      tie            best == worst score; with `drop_ties=False` the row is kept instead, as the first
                     and the last valid answer (margin 0)
      low_margin     best - worst < `min_margin`
      same_text      chosen and rejected texts are equal after `normalize_text`
    """
    if len(texts) != len(scores):
        raise ValueError(f"{len(texts)} answers but {len(scores)} scores")
    if min_valid < 2:
        raise ValueError(f"min_valid must be >= 2 (a pair needs two answers), got {min_valid}")
    if not (min_margin >= 0 and math.isfinite(min_margin)):
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin}")
    if max_chars is not None and max_chars < max(1, min_chars):
        raise ValueError(f"max_chars ({max_chars}) < min_chars ({min_chars})")

    valid = [
        i
        for i, (text, score) in enumerate(zip(texts, scores))
        if is_valid_answer(text, score, min_chars=min_chars, max_chars=max_chars)
    ]
    if len(valid) < min_valid:
        return Drop(DROP_TOO_FEW_VALID, f"{len(valid)} valid answers of {len(texts)}, need {min_valid}")
    valid_set = set(valid)
    masked = [float(scores[i]) if i in valid_set else None for i in range(len(scores))]
    chosen, rejected = argmax(masked), argmin(masked)
    margin = masked[chosen] - masked[rejected]
    if margin == 0:
        if drop_ties:
            return Drop(DROP_TIE, f"all {len(valid)} valid answers score {masked[chosen]!r}")
        chosen, rejected = valid[0], valid[-1]
    if margin < min_margin:
        return Drop(DROP_LOW_MARGIN, f"margin {margin!r} < {min_margin!r}")
    if normalize_text(texts[chosen]) == normalize_text(texts[rejected]):
        return Drop(DROP_SAME_TEXT, f"answers {chosen} and {rejected} have the same text")
    return Pair(chosen=chosen, rejected=rejected, margin=margin)


# ---------------------------------------------------------------------------------------------------
# What ranks the answers: the reward model (paper), an image-aware judge, or a mix of both.
# ---------------------------------------------------------------------------------------------------

RANK_BY = ("reward", "judge", "mix")


def standardized(scores: Sequence[float | None]) -> list[float | None]:
    """Each finite score as (score - mean) / std over the finite ones (population std; all equal -> 0);
    None and non-finite stay None. Puts scores of different scales on one footing within a row."""
    valid = _valid(scores)
    if not valid:
        return [None] * len(scores)
    mean = sum(s for _, s in valid) / len(valid)
    std = math.sqrt(sum((s - mean) ** 2 for _, s in valid) / len(valid))
    out: list[float | None] = [None] * len(scores)
    for i, s in valid:
        out[i] = 0.0 if std == 0 else (s - mean) / std
    return out


def ranking_scores(
    reward: Sequence[float | None],
    judge: Sequence[float | None] | None,
    rank_by: str = "reward",
    judge_weight: float = 0.5,
) -> list[float | None]:
    """The score that ranks a row's answers.

    reward  the reward model's scores as they are (paper eq. 10)
    judge   the judge's scores as they are
    mix     (1 - judge_weight) * z(reward) + judge_weight * z(judge), each standardized over the answers
            that have both scores (an answer missing either has none)
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    if rank_by == "reward":
        return list(reward)
    if judge is None:
        raise ValueError(f"rank_by={rank_by} needs judge scores, and the row has none")
    if len(judge) != len(reward):
        raise ValueError(f"{len(reward)} reward scores but {len(judge)} judge scores")
    if rank_by == "judge":
        return list(judge)
    if not 0 <= judge_weight <= 1:
        raise ValueError(f"judge_weight must be in [0, 1], got {judge_weight}")
    both = {i for i, _ in _valid(reward)} & {i for i, _ in _valid(judge)}
    z_reward = standardized([s if i in both else None for i, s in enumerate(reward)])
    z_judge = standardized([s if i in both else None for i, s in enumerate(judge)])
    return [
        None if i not in both else (1 - judge_weight) * z_reward[i] + judge_weight * z_judge[i]
        for i in range(len(reward))
    ]
