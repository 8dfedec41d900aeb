"""Report statistics on hand-made data with answers worked out by hand (synthalign_ray/report/stats.py)."""

import itertools
import math

import pytest
import yaml

from synthalign_ray.report import card, html
from synthalign_ray.report.stats import (
    RunStats,
    average_ranks,
    chance_overlap,
    classify_instruction,
    hard_negative_kind,
    overlap_at_k,
    spearman,
    top_k,
)


def test_top_k_breaks_ties_to_the_lower_index_like_argmax():
    assert top_k([1.0, 3.0, 3.0, 0.0], 1) == {1}
    assert top_k([2.0, 2.0, 2.0, 2.0], 2) == {0, 1}
    assert top_k([0.1, 0.4, 0.3, 0.2], 3) == {1, 2, 3}


def test_overlap_at_k_two_and_three_scorers():
    a, b, c = [4, 3, 2, 1], [4, 3, 1, 2], [1, 2, 3, 4]
    assert overlap_at_k([a, b], 1) == 1.0
    assert overlap_at_k([a, b], 2) == 1.0
    assert overlap_at_k([a, b], 3) == pytest.approx(2 / 3)  # {0,1,2} & {0,1,3}
    assert overlap_at_k([a, c], 1) == 0.0
    assert overlap_at_k([a, c], 3) == pytest.approx(2 / 3)  # {0,1,2} & {1,2,3}
    assert overlap_at_k([a, b, c], 2) == 0.0  # {0,1} & {0,1} & {2,3}
    assert overlap_at_k([a, b, c], 3) == pytest.approx(1 / 3)  # only image 1 is in all three


@pytest.mark.parametrize("scorers", [2, 3])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_chance_overlap_is_the_mean_over_all_rankings(scorers, k):
    """Brute force over every ordering of 4 candidates for each scorer: the closed form must match."""
    perms = list(itertools.permutations(range(4)))
    values = [overlap_at_k([list(p) for p in combo], k) for combo in itertools.product(perms, repeat=scorers)]
    assert sum(values) / len(values) == pytest.approx(chance_overlap(scorers, k, 4))


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 20, 30]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([5, 5, 5]).tolist() == [2.0, 2.0, 2.0]
    assert average_ranks([3, 1, 2]).tolist() == [3.0, 1.0, 2.0]


def test_spearman_known_values():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [0.4, 0.3, 0.2, 0.1]) == pytest.approx(-1.0)
    # no ties: 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 4 / 120
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # ties: Pearson of ranks [1,2,3,4] and [1,2.5,2.5,4] = 4.5 / sqrt(5 * 4.5)
    assert spearman([1, 2, 3, 4], [1, 2, 2, 3]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3], [7, 7, 7]) is None  # a constant scorer has no rank correlation


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("Describe this image in detail.", "direct visual description"),
        ("How many birds are on the wire?", "direct visual description"),
        ("What color is the car?", "direct visual description"),
        ("Describe the mood of this scene.", "interpretive"),  # interpretive cue beats "describe"
        ("What does the painting symbolize?", "interpretive"),
        ("Why is the man holding an umbrella?", "commonsense"),  # commonsense beats "holding"
        ("What might happen next in this street?", "commonsense"),
        ("What is this tool typically used for?", "commonsense"),
        ("Hello there.", "other"),
        (None, "other"),
    ],
)
def test_classify_instruction(instruction, expected):
    assert classify_instruction(instruction) == expected


def test_classifier_matches_whole_words_only():
    # "seesaw" holds "see" and "likelihood" holds "likely": neither is a cue on its own
    assert classify_instruction("Seesaw likelihood") == "other"


FLUENT = "A brown dog runs across the green park chasing a red ball near two tall oak trees."


@pytest.mark.parametrize(
    "rejected, chosen, margin, expected",
    [
        ("Yes.", FLUENT, 1.0, "empty-ish"),
        ("", FLUENT, 1.0, "empty-ish"),
        ("A dog in a park with a ball.", FLUENT, 1.0, "short"),  # 8 words
        ("A brown dog runs across the green park chasing a ball", FLUENT + " " + FLUENT + " " + FLUENT, 1.0, "short"),  # < 1/3 of 51
        ("I'm sorry, but I cannot see the details of this image clearly enough to answer you.", FLUENT, 1.0, "generic"),
        ("It is the image of the thing and it is there in the picture, it is.", FLUENT, 1.0, "generic"),  # 2 content words
        ("red car blue bus red car blue bus red car blue bus red car blue bus", FLUENT, 1.0, "repetitive"),
        (FLUENT, FLUENT, 0.05, "near miss"),
        (FLUENT, FLUENT, 0.1, "near miss"),  # at the threshold
        (FLUENT, FLUENT, 0.5, "clear loss"),
    ],
)
def test_hard_negative_kind(rejected, chosen, margin, expected):
    assert hard_negative_kind(rejected, chosen, margin, near_miss_margin=0.1) == expected


def _row(i, status="ok", category="a", scale_index=0, margin=0.1, **extra):
    row = {
        "id": f"r{i}", "category": category, "status": status, "drop_reason": None, "failed_stage": None,
        "guidance_scales": [5.0, 7.0, 9.0], "image_index": scale_index,
        "image_scores": [3.0, 2.0, 1.0], "clip_scores": [3.0, 1.0, 2.0], "blip_scores": [1.0, 2.0, 3.0],
        "instruction": "Describe the image.",
        "responses": [{"model": "m1", "text": FLUENT, "finish_reason": "stop"}, {"model": "m2", "text": "Yes.", "finish_reason": "stop"}],
        "chosen_model": "m1", "rejected_model": "m2", "margin": margin, "chosen_text": FLUENT, "rejected_text": "Yes.",
    }  # fmt: skip
    row.update(extra)
    return row


def test_run_stats_on_hand_made_rows():
    stats = RunStats()
    stats.add_row(_row(0, category="a", scale_index=0, margin=0.2))
    stats.add_row(_row(1, category="a", scale_index=1, margin=0.4, rejected_text=FLUENT.lower()))
    stats.add_row(_row(2, category="b", scale_index=0, margin=0.6, chosen_model="m2", rejected_model="m1"))
    dropped = _row(3, status="dropped", category="b", scale_index=2, drop_reason="tie", margin=None, chosen_text=None,
                   rejected_text=None, chosen_model=None, rejected_model=None)  # fmt: skip
    stats.add_row(dropped)
    stats.add_row({"id": "r4", "category": "b", "status": "failed", "failed_stage": "images"})
    result = stats.result()

    assert result["rows"] | {"by_category": None} == {
        "total": 5, "pairs": 3, "dropped": 1, "failed": 1, "dropped_by_reason": {"tie": 1},
        "failed_by_stage": {"images": 1}, "by_category": None,
    }  # fmt: skip
    assert result["rows"]["by_category"] == {"a": {"ok": 2}, "b": {"dropped": 1, "failed": 1, "ok": 1}}
    # guidance: 4 rows had an image selected (the failed one did not): scales 5, 7, 5, 9
    assert result["guidance"]["selected"] == {"5": 2, "7": 1, "9": 1}
    assert result["guidance"]["share"]["5"] == 0.5
    assert result["guidance"]["by_category"]["b"]["share"] == {"5": 0.5, "7": 0.0, "9": 0.5}
    # agreement: every row has IR [3,2,1], CLIP [3,1,2], BLIP [1,2,3]
    agreement = result["scorer_agreement"]
    assert agreement["rows"] == 4 and agreement["rows_without_all_scorers"] == 0
    pairs = agreement["pairs"]
    assert pairs["ImageReward & CLIP"]["top1"]["percent"] == 100.0
    assert pairs["ImageReward & CLIP"]["top2"]["percent"] == 50.0  # {0,1} & {0,2}
    assert pairs["ImageReward & BLIP"]["top1"]["percent"] == 0.0
    assert pairs["All 3"]["top2"]["percent"] == 0.0  # {0,1} & {0,2} & {1,2}
    assert pairs["ImageReward & CLIP"]["top3"]["chance_percent"] == 100.0  # k = K: any top-3 is all 3 images
    assert pairs["ImageReward & CLIP"]["spearman_mean"] == pytest.approx(0.5)
    assert pairs["ImageReward & BLIP"]["spearman_mean"] == pytest.approx(-1.0)
    # pairs
    assert result["margins"]["count"] == 3 and result["margins"]["median"] == pytest.approx(0.4)
    assert result["models"]["matrix"] == {"m1": {"m1": 0, "m2": 2}, "m2": {"m1": 1, "m2": 0}}
    assert result["models"]["chosen"] == {"m1": 2, "m2": 1}
    assert result["models"]["answers"] == {"m1": 4, "m2": 4}
    assert result["instruction_classes"]["by_category"]["a"]["direct visual description"] == 2
    # threshold = lower quartile of margins [0.2, 0.4, 0.6] = 0.3; "Yes." is empty-ish twice; the fluent one
    # (margin 0.4) is a clear loss
    assert result["hard_negatives"]["near_miss_margin"] == pytest.approx(0.3)
    assert result["hard_negatives"]["counts"] == {
        "empty-ish": 2, "short": 0, "generic": 0, "repetitive": 0, "near miss": 0, "clear loss": 1
    }  # fmt: skip
    assert RunStats(near_miss_margin=0.5).result()["hard_negatives"]["near_miss_margin"] == 0.5


def test_rows_without_every_scorer_are_counted_apart():
    stats = RunStats()
    stats.add_row(_row(0, clip_scores=None))
    stats.add_row(_row(1, blip_scores=[1.0, float("nan"), 2.0]))
    agreement = stats.result()["scorer_agreement"]
    assert agreement["rows"] == 0 and agreement["rows_without_all_scorers"] == 2


def test_card_front_matter_and_every_section_number_from_stats():
    stats = RunStats()
    for i in range(3):
        stats.add_row(_row(i, margin=0.1 * (i + 1)))
    report = card.report_stats(stats.result(), {"counts": {"pairs": 3, "dropped": 0, "failed": 1}}, run="r", license="cc-by-4.0",
                               plots=["margins.png"], sample_size=3)  # fmt: skip
    assert report["manifest"]["counts_mismatch"] == {"manifest": {"pairs": 3, "dropped": 0, "failed": 1}, "shards": {"pairs": 3, "dropped": 0, "failed": 0}}
    text = card.render_card(report)
    front, body = html.strip_front_matter(text)
    meta = yaml.safe_load(front)
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_examples": 3}]
    assert "![Chosen - rejected margins](plots/margins.png)" in body
    assert "plots/model_matrix.png" not in body  # not written: not embedded
    assert "Warning" in body


@pytest.mark.parametrize("n, expected", [(0, "n<1K"), (999, "n<1K"), (1000, "1K<n<10K"), (12_000, "10K<n<100K"), (1_000_000, "1M<n<10M")])
def test_size_category(n, expected):
    assert card.size_category(n) == expected
