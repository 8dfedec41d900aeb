"""The judge comparison's logic (report/judge.py) on hand-made inputs with known answers: no Ray, no model."""

import math

import numpy as np

import pyarrow as pa
import pytest
from PIL import Image

from synthalign_ray import store
from synthalign_ray.config import ConfigError, load_config
from synthalign_ray.report.judge import (
    JudgeRunConfig,
    Layout,
    comparison_rows,
    disagreement,
    find_disagreements,
    parse_choice,
    preferred_scorer,
    render_markdown,
    row_outcome,
    side_by_side,
    summarize,
    verdicts,
    wilson_interval,
)
from tests.conftest import REPO

X, Y = "image_scores", "clip_scores"


@pytest.mark.parametrize(
    "reply, choice",
    [
        ("A", "A"),
        ("b", "B"),
        ("(B).", "B"),
        ("**A**", "A"),
        ("A. The left image shows the red car.", "A"),
        ("B: it has the dog", "B"),
        ("Image B matches the caption better.", "B"),
        ("The answer is A", "A"),
        ("I would pick option (A) here", "A"),
        ("Tie", "tie"),
        ("They match it equally well.", "tie"),
        ("Both image A and image B match.", "tie"),  # both letters named: falls through to the tie words
        ("A dog runs on the grass", None),  # "A" is an article here
        ("the answer is a red car", None),  # lower-case a after "is": not a letter choice
        ("", None),
        (None, None),
        ("the left one", None),
    ],
)
def test_parse_choice(reply, choice):
    assert parse_choice(reply) == choice


def test_disagreement_picks_top1_with_ties_to_the_lower_index():
    assert disagreement([0.1, 0.9, 0.3], [0.8, 0.2, 0.3]) == (1, 0)
    assert disagreement([0.5, 0.5, 0.1], [0.1, 0.7, 0.7]) == (0, 1)  # ties: lower index for each scorer
    assert disagreement([1.0, 0.0], [2.0, 1.0]) is False  # same top-1
    assert disagreement([1.0, 0.0], None) is None
    assert disagreement([1.0, 0.0], [1.0, 0.0, 0.5]) is None  # different K
    assert disagreement([1.0], [1.0]) is None  # one candidate: nothing to compare
    assert disagreement([1.0, math.nan], [0.0, 1.0]) is None
    assert disagreement([1.0, None], [0.0, 1.0]) is None


def test_preferred_scorer_maps_positions_to_scorers():
    assert preferred_scorer("A", X, Y) == X and preferred_scorer("B", X, Y) == Y
    assert preferred_scorer("A", Y, X) == Y and preferred_scorer("B", Y, X) == X
    assert preferred_scorer("tie", X, Y) == "tie"
    assert preferred_scorer(None, X, Y) is None


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        (X, X, "win"),
        (Y, Y, "loss"),
        ("tie", "tie", "tie"),
        (X, Y, "tie"),  # orders disagree: the judge followed the position
        (X, "tie", "tie"),
        (None, X, "unparsed"),
        (X, None, "unparsed"),
    ],
)
def test_row_outcome(first, second, outcome):
    assert row_outcome(first, second, X, Y) == outcome


def test_wilson_interval_against_hand_computed_values():
    # z = 1.96: 5/10 -> center 0.5, half = 1.96 / 1.38415 * sqrt(0.025 + 0.0096037) = 0.26341
    low, high = wilson_interval(5, 10)
    assert (low, high) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # 0/10 -> [0, z^2 / (n + z^2)] = [0, 3.84146 / 13.84146]; 10/10 mirrors it
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    # the paper's 53 RM wins of 90 decisive rows, as (2np + z^2 -/+ z sqrt(z^2 + 4np(1-p))) / (2(n + z^2)):
    # (106 + 3.84146 -/+ 1.95996 * sqrt(3.84146 + 87.15556)) / 187.68292 = (109.84146 -/+ 18.69656) / 187.68292
    assert wilson_interval(53, 90) == pytest.approx((0.48563, 0.68487), abs=1e-5)
    assert wilson_interval(0, 0) is None


def test_summarize_counts_and_shares():
    outcomes = ["win"] * 53 + ["loss"] * 37 + ["tie"] * 10 + ["unparsed"] * 3
    s = summarize(outcomes, position_bias_rows=4)
    assert (s["asked"], s["wins"], s["losses"], s["ties"], s["unparsed"]) == (103, 53, 37, 10, 3)
    assert s["asked"] == s["wins"] + s["losses"] + s["ties"] + s["unparsed"]
    assert s["share_of_judged"]["win"]["share"] == pytest.approx(0.53) and s["share_of_judged"]["win"]["n"] == 100
    assert s["win_rate_decisive"]["share"] == pytest.approx(53 / 90)  # the paper's 58.9 %
    assert s["win_rate_decisive"]["ci95"] == pytest.approx([0.48563, 0.68487], abs=1e-5)
    assert s["position_bias_rows"] == 4
    with pytest.raises(ValueError, match="unknown outcome"):
        summarize(["won"])


def _reply(row_id, left, choice, status="ok"):
    return {"id": f"{row_id}|{left}-left", "row_id": row_id, "caption": "a cat", "left": left, "pick_x": 0, "pick_y": 1,
            "status": status, "error": None if status == "ok" else "boom", "judge_reply": choice, "judge_choice": choice}  # fmt: skip


def test_verdicts_apply_the_position_bias_rule():
    replies = pa.Table.from_pylist([
        _reply("r1", X, "A"), _reply("r1", Y, "B"),  # X's image both times: win
        _reply("r2", X, "B"), _reply("r2", Y, "A"),  # Y's image both times: loss
        _reply("r3", X, "A"), _reply("r3", Y, "A"),  # always the left image: position bias -> tie
        _reply("r4", X, "tie"), _reply("r4", Y, "tie"),  # stated tie
        _reply("r5", X, "unparsed"), _reply("r5", Y, "B"),  # one reply unparsed
        _reply("r6", X, None, status="failed"), _reply("r6", Y, "B"),  # one request failed
    ])  # fmt: skip
    table, counts, bias = verdicts(replies, X, Y)
    outcomes = dict(zip(table.column("id").to_pylist(), table.column("outcome").to_pylist()))
    assert outcomes == {"r1": "win", "r2": "loss", "r3": "tie", "r4": "tie", "r5": "unparsed", "r6": "unparsed"}
    assert bias == 1
    assert counts == {"A": 4, "B": 4, "tie": 2, "unparsed": 1, "failed": 1, "total": 12}
    assert table.column("choice_x_left").to_pylist()[4:] == ["unparsed", "failed"]
    assert table.column("error").to_pylist()[5] == "boom"


def test_verdicts_refuse_a_row_with_one_order_missing():
    with pytest.raises(RuntimeError, match="both orders"):
        verdicts(pa.Table.from_pylist([_reply("r1", X, "A")]), X, Y)


def test_side_by_side_layout():
    red, blue = Image.new("RGB", (40, 20), (255, 0, 0)), Image.new("RGB", (10, 10), (0, 0, 255))
    picture, (box_a, box_b) = side_by_side(red, blue, 64)
    layout = Layout.for_height(64)
    # both scaled to 64 px tall, aspect kept: 128 and 64 px wide, a gap between them
    assert box_a == (layout.margin, layout.margin + layout.band, layout.margin + 128, layout.margin + layout.band + 64)
    assert box_b == (box_a[2] + layout.gap, box_a[1], box_a[2] + layout.gap + 64, box_a[3])
    assert picture.size == (box_b[2] + layout.margin, box_a[3] + layout.margin)
    assert picture.getpixel(((box_a[0] + box_a[2]) // 2, (box_a[1] + box_a[3]) // 2)) == (255, 0, 0)
    assert picture.getpixel(((box_b[0] + box_b[2]) // 2, (box_b[1] + box_b[3]) // 2)) == (0, 0, 255)
    assert picture.getpixel((box_a[2] + layout.gap // 2, box_a[1] + 5)) == (255, 255, 255)  # the gap is white

    def ink(x0, x1):  # dark pixels in the label band between x0 and x1
        band = np.asarray(picture.crop((x0, 0, x1, box_a[1])).convert("L"))
        return int((band < 100).sum())

    assert ink(box_a[0], box_a[2]) > 0 and ink(box_b[0], box_b[2]) > 0  # "A" above the left, "B" above the right
    assert ink(box_a[0], box_a[0] + 40) == 0  # centred: nothing drawn at the left edge of a wide image


def _image(color):
    return store.encode_image(Image.new("RGB", (16, 16), color))


def test_comparison_rows_make_both_orders_with_the_picks_in_place():
    images = [_image((255, 0, 0)), _image((0, 255, 0)), _image((0, 0, 255))]
    batch = pa.Table.from_pylist([
        {"id": "r1", "t2i_prompt": "a red square", "candidate_images": images},
        {"id": "r2", "t2i_prompt": "not asked", "candidate_images": images},
    ])  # fmt: skip
    out = comparison_rows(batch, {"r1": (0, 2)}, X, Y, height=32)
    assert out.column("row_id").to_pylist() == ["r1", "r1"]
    assert out.column("left").to_pylist() == [X, Y]
    assert out.column("status").to_pylist() == ["ok", "ok"] and out.column("caption").to_pylist() == ["a red square"] * 2
    assert len(set(out.column("id").to_pylist())) == 2
    layout = Layout.for_height(32)
    middle_a, middle_b = (layout.margin + 16, layout.margin + layout.band + 16), (layout.margin + 32 + layout.gap + 16, layout.margin + layout.band + 16)
    first, second = (store.decode_image(s) for s in out.column("image").to_pylist())
    assert (first.getpixel(middle_a), first.getpixel(middle_b)) == ((255, 0, 0), (0, 0, 255))  # X's pick (0) on the left
    assert (second.getpixel(middle_a), second.getpixel(middle_b)) == ((0, 0, 255), (255, 0, 0))  # swapped


def test_find_disagreements_streams_scores_and_samples_by_id_hash(tmp_path):
    run = str(tmp_path / "run")
    scores = pa.list_(pa.float32())
    pairs = pa.table({
        "id": ["agree", "differ1", "differ2", "one_scorer"],
        X: pa.array([[1, 0], [1, 0], [0, 1, 2], [1, 0]], scores),
        Y: pa.array([[1, 0], [0, 1], [2, 1, 0], None], scores),
    })  # fmt: skip
    failed = pa.table({"id": ["early_failure"]})  # a shard of rows that failed before scoring: no score columns
    store.write_table(f"{run}/pairs/0.parquet", pairs)
    store.write_table(f"{run}/failed/0.parquet", failed)
    found = find_disagreements(run, X, Y, limit=None)
    assert (found.read, found.comparable, found.disagree) == (5, 3, 2)
    assert found.picks == {"differ1": (0, 1), "differ2": (2, 0)}
    assert [s.rsplit("/", 2)[-2] for s in found.shards] == ["pairs"]
    sampled = find_disagreements(run, X, Y, limit=1)
    assert len(sampled.picks) == 1 and sampled.disagree == 2
    assert sampled.picks == find_disagreements(run, X, Y, limit=1).picks  # the same sample every time


def test_config_and_markdown():
    cfg = load_config(REPO / "configs/judge_tiny.yaml", [], JudgeRunConfig)
    assert cfg.judge.model == "zoo:lvlm-llava" and cfg.scorers == (X, Y)
    for override, message in (("scorers=[image_scores, image_scores]", "two different"),
                              ("scorers=[image_scores, pick_scores]", "unknown column"),
                              ("prompt='Which is better?'", "caption")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_config(REPO / "configs/judge_tiny.yaml", [override], JudgeRunConfig)
    result = {
        "scorers": [X, Y], "judge_model": "gpt-4o", "rows": {"read": 120, "comparable": 118, "disagree": 103},
        "summary": summarize(["win"] * 53 + ["loss"] * 37 + ["tie"] * 10 + ["unparsed"] * 3, position_bias_rows=2),
        "replies": {"A": 90, "B": 100, "tie": 12, "unparsed": 4, "failed": 0, "total": 206}, "config": {"limit": None},
    }  # fmt: skip
    text = render_markdown(result)
    assert "| ImageReward wins | 53 | 53.0% [" in text and "| CLIP wins | 37 | 37.0% [" in text
    assert "| Ties | 10 | 10.0% [" in text and "| Unparsed | 3 |" in text
    assert "win rate over decisive rows (ImageReward or CLIP wins): 58.9% [48.6, 68.5] (n = 90)" in text
