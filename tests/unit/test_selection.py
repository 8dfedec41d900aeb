import math

import pytest

from synthalign_ray.selection import NoValidScore, argmax, argmin


def test_argmax_and_argmin_pick_extremes():
    assert argmax([0.1, 2.5, -1.0, 2.4]) == 1
    assert argmin([0.1, 2.5, -1.0, 2.4]) == 2


def test_ties_go_to_the_first_candidate():
    assert argmax([1.0, 3.0, 3.0]) == 1
    assert argmin([2.0, 0.5, 0.5, 2.0]) == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
def test_non_finite_scores_never_win(bad):
    assert argmax([bad, 0.3, 0.2]) == 1
    assert argmin([0.3, bad, 0.2]) == 2


def test_all_invalid_raises():
    with pytest.raises(NoValidScore):
        argmax([math.nan, None])
    with pytest.raises(NoValidScore):
        argmin([])
