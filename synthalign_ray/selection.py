"""Pure selection rules shared by the stages: no Ray, no torch, unit-tested in tests/unit/.

Ties go to the lowest index (the first candidate), so selection is deterministic whatever the order of
evaluation; non-finite scores (NaN, inf from a broken scorer) never win.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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
