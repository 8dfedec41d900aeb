"""Pair selection (paper eq. 10 plus filters) and the PairBuilder stage's columns: pure, no model."""

import io
import math
import random

import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from synthalign_ray import selection
from synthalign_ray.selection import (
    DROP_LOW_MARGIN,
    DROP_REASONS,
    DROP_SAME_TEXT,
    DROP_TIE,
    DROP_TOO_FEW_VALID,
    Drop,
    Pair,
    is_valid_answer,
    select_pair,
)
from synthalign_ray.stages.pairs import (
    CONVERSATION_TYPE,
    IMAGES_TYPE,
    PAIR_FIELDS,
    PairBuilder,
    PairsConfig,
)
from synthalign_ray.stages.prompts import prompts_table
from synthalign_ray.store import IMAGE_TYPE, encode_image

TEXTS = ["a dog on grass", "a cat on a chair", "two birds in a tree", "a red boat"]


# --- select_pair -------------------------------------------------------------------------------------


def test_chosen_is_argmax_and_rejected_is_argmin():
    assert select_pair(TEXTS, [0.1, 2.5, -1.0, 2.4]) == Pair(chosen=1, rejected=2, margin=3.5)


def test_drop_reasons_are_a_fixed_vocabulary():
    assert DROP_REASONS == ("too_few_valid", "tie", "low_margin", "same_text")


@pytest.mark.parametrize(
    "texts, scores",
    [
        ([], []),
        (["only one"], [1.0]),
        (["a", "b", "c"], [1.0, None, math.nan]),
        (["a", "", "   "], [1.0, 2.0, 3.0]),  # empty and whitespace-only answers are not valid
        (["a", None, "c"], [1.0, 2.0, math.inf]),  # no text (errored) / infinite score
    ],
)
def test_too_few_valid(texts, scores):
    result = select_pair(texts, scores)
    assert isinstance(result, Drop) and result.reason == DROP_TOO_FEW_VALID


def test_min_valid_counts_valid_answers_only():
    texts, scores = ["a", "b", "c", "d"], [1.0, 2.0, None, 3.0]
    assert isinstance(select_pair(texts, scores, min_valid=3), Pair)
    assert select_pair(texts, scores, min_valid=4).reason == DROP_TOO_FEW_VALID


def test_tie_is_dropped_by_default():
    result = select_pair(TEXTS, [0.7, 0.7, None, 0.7])
    assert isinstance(result, Drop) and result.reason == DROP_TIE


def test_tie_kept_on_request_uses_first_and_last_valid_answer():
    assert select_pair(TEXTS, [None, 0.7, 0.7, 0.7], drop_ties=False) == Pair(chosen=1, rejected=3, margin=0.0)
    # a kept tie still has to pass the margin filter
    assert select_pair(TEXTS[:2], [0.7, 0.7], drop_ties=False, min_margin=0.1).reason == DROP_LOW_MARGIN


def test_partial_ties_go_to_the_first_index_on_both_sides():
    # best 3.0 at 1 and 3, worst 0.5 at 0 and 2
    assert select_pair(TEXTS, [0.5, 3.0, 0.5, 3.0]) == Pair(chosen=1, rejected=0, margin=2.5)


def test_low_margin():
    assert select_pair(TEXTS[:2], [1.0, 1.2], min_margin=0.5).reason == DROP_LOW_MARGIN
    assert select_pair(TEXTS[:2], [1.0, 1.5], min_margin=0.5) == Pair(chosen=1, rejected=0, margin=0.5)


def test_same_text_after_whitespace_normalisation():
    result = select_pair(["A dog  on\tgrass ", "x", " A dog on grass"], [2.0, 1.0, 0.0])
    assert isinstance(result, Drop) and result.reason == DROP_SAME_TEXT
    # case is not normalised: these are different answers
    assert isinstance(select_pair(["A dog", "a dog"], [2.0, 1.0]), Pair)


def test_the_first_failing_check_names_the_reason():
    # a tie with equal texts is a tie (checked before same_text)
    assert select_pair(["same", "same"], [1.0, 1.0]).reason == DROP_TIE
    # low margin with equal texts is low_margin
    assert select_pair(["same", "same"], [1.0, 1.1], min_margin=1.0).reason == DROP_LOW_MARGIN


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_never_chosen_nor_rejected(bad):
    for position in range(4):
        scores = [1.0, 2.0, 3.0, 4.0]
        scores[position] = bad
        result = select_pair(TEXTS, scores)
        assert isinstance(result, Pair)
        assert position not in (result.chosen, result.rejected)
        assert math.isfinite(result.margin)


@pytest.mark.parametrize("empty", ["", "   ", "\n\t", None])
def test_empty_or_errored_answer_never_becomes_chosen_or_rejected(empty):
    # The official code ranks every answer: an empty answer with the top (or bottom) reward would be
    # chosen (or rejected). Here it is not a candidate at all, whatever its score.
    for score in (100.0, -100.0):
        texts = ["a dog", empty, "a cat", "a bird"]
        result = select_pair(texts, [1.0, score, 2.0, 0.5])
        assert isinstance(result, Pair) and 1 not in (result.chosen, result.rejected)
        assert (result.chosen, result.rejected) == (2, 3)


def test_length_bounds_fold_into_validity():
    texts = ["short", "a medium answer", "a much much longer answer than the rest"]
    scores = [9.0, 1.0, -9.0]
    # too short / too long answers are simply out: the extremes come from what is left
    assert select_pair(texts + ["mid two"], scores + [5.0], min_chars=6, max_chars=20) == Pair(3, 1, 4.0)
    # and if too few remain, the row is too_few_valid (there is no separate "length" reason)
    assert select_pair(texts, scores, min_chars=6, max_chars=20).reason == DROP_TOO_FEW_VALID
    # lengths are counted without surrounding whitespace
    assert is_valid_answer("  abc  ", 1.0, min_chars=3, max_chars=3)
    assert not is_valid_answer("abc", 1.0, min_chars=4)
    # min_chars < 1 still rejects empty answers
    assert not is_valid_answer("", 1.0, min_chars=0)


def test_selection_is_deterministic_and_order_consistent():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(2, 6)
        scores = [rng.choice([None, math.nan, 0.0, 1.0, 2.0, rng.random()]) for _ in range(n)]
        texts = [rng.choice(["", f"answer {i}", None]) for i in range(n)]
        drop_ties = rng.random() < 0.5
        first = select_pair(texts, scores, drop_ties=drop_ties)
        assert select_pair(tuple(texts), tuple(scores), drop_ties=drop_ties) == first  # same input, same answer
        if isinstance(first, Pair):
            valid = [i for i in range(n) if is_valid_answer(texts[i], scores[i])]
            best = max(scores[i] for i in valid)
            worst = min(scores[i] for i in valid)
            assert scores[first.chosen] == best and scores[first.rejected] == worst
            assert first.margin == best - worst
            if best != worst:  # ties on each side go to the first index
                assert first.chosen == min(i for i in valid if scores[i] == best)
                assert first.rejected == min(i for i in valid if scores[i] == worst)
        else:
            assert first.reason in DROP_REASONS


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="answers but"):
        select_pair(["a", "b"], [1.0])
    with pytest.raises(ValueError, match="min_valid"):
        select_pair(["a", "b"], [1.0, 2.0], min_valid=1)
    with pytest.raises(ValueError, match="min_margin"):
        select_pair(["a", "b"], [1.0, 2.0], min_margin=-1)
    with pytest.raises(ValueError, match="max_chars"):
        select_pair(["a", "b"], [1.0, 2.0], min_chars=5, max_chars=2)


# --- PairsConfig -------------------------------------------------------------------------------------


def test_config_validates_fields():
    assert PairsConfig().selection_kwargs() == dict(
        min_valid=2, min_margin=0.0, drop_ties=True, min_chars=1, max_chars=None
    )
    for bad in (dict(min_valid=1), dict(min_margin=-0.1), dict(min_chars=0), dict(min_chars=5, max_chars=3)):
        with pytest.raises(ValidationError):
            PairsConfig(**bad)
    with pytest.raises(ValidationError, match="extra"):
        PairsConfig(min_magrin=1.0)


# --- PairBuilder -------------------------------------------------------------------------------------

RESPONSE_TYPE = pa.struct(
    [("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())]
)


def png(color=(255, 0, 0)):
    return encode_image(Image.new("RGB", (8, 8), color))


def answer(model, text, error=None):
    return {"model": model, "text": text, "finish_reason": "stop" if error is None else None, "error": error}


def rows_table(cases):
    """cases: (responses, scores) per row; rows get an image and an instruction."""
    n = len(cases)
    table = prompts_table(
        [{"id": f"p{i}", "category": "c", "t2i_prompt": "t", "seed": i, "source_line": i + 1} for i in range(n)]
    )
    table = table.append_column(pa.field("image", IMAGE_TYPE), pa.array([png((i, 0, 0)) for i in range(n)], IMAGE_TYPE))
    table = table.append_column("image_index", pa.array([0] * n, pa.int32()))
    table = table.append_column("instruction", pa.array([f"describe image {i}" for i in range(n)], pa.string()))
    table = table.append_column("responses", pa.array([c[0] for c in cases], pa.list_(RESPONSE_TYPE)))
    return table.append_column("response_scores", pa.array([c[1] for c in cases], pa.list_(pa.float32())))


ANSWERS = [answer("m1", "a dog on grass"), answer("m2", "a cat"), answer("m3", "two birds")]


def test_builder_columns_types_and_values():
    table = rows_table([(ANSWERS, [0.5, 2.0, -1.0])])
    out = PairBuilder(PairsConfig())(table)
    for field in PAIR_FIELDS:
        assert out.schema.field(field.name).type == field.type
    assert out.schema.field("images").type == IMAGES_TYPE == pa.list_(IMAGE_TYPE)
    assert out.schema.field("prompt").type == CONVERSATION_TYPE
    assert out.column_names.count("drop_reason") == 1
    row = out.to_pylist()[0]
    assert row["status"] == "ok" and row["drop_reason"] is None
    assert (row["chosen_model"], row["rejected_model"]) == ("m2", "m3")
    assert (row["chosen_index"], row["rejected_index"]) == (1, 2)
    assert row["margin"] == pytest.approx(3.0)
    assert (row["chosen_text"], row["rejected_text"]) == ("a cat", "two birds")
    assert row["images"] == [row["image"]]
    assert row["prompt"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": "describe image 0"}]}
    ]
    assert row["chosen"] == [{"role": "assistant", "content": [{"type": "text", "text": "a cat"}]}]
    assert row["rejected"] == [{"role": "assistant", "content": [{"type": "text", "text": "two birds"}]}]


def test_builder_system_prompt_heads_the_prompt():
    out = PairBuilder(PairsConfig(system_prompt="You are helpful."))(rows_table([(ANSWERS, [0.5, 2.0, -1.0])]))
    prompt = out.column("prompt").to_pylist()[0]
    assert prompt[0] == {"role": "system", "content": [{"type": "text", "text": "You are helpful."}]}
    assert prompt[1]["role"] == "user"


def test_builder_drops_with_reason_and_null_pair_columns():
    cases = [
        (ANSWERS, [0.5, 2.0, -1.0]),  # pair
        (ANSWERS, [1.0, 1.0, 1.0]),  # tie
        (ANSWERS, [None, 1.0, None]),  # too_few_valid
        ([answer("m1", "same"), answer("m2", " same ")], [2.0, 1.0]),  # same_text
        (ANSWERS, None),  # no scores at all
    ]
    out = PairBuilder()(rows_table(cases)).to_pylist()
    assert [r["status"] for r in out] == ["ok", "dropped", "dropped", "dropped", "dropped"]
    assert [r["drop_reason"] for r in out] == [None, DROP_TIE, DROP_TOO_FEW_VALID, DROP_SAME_TEXT, DROP_TOO_FEW_VALID]
    for row in out[1:]:
        assert all(row[field.name] is None for field in PAIR_FIELDS)
        assert row["error"] is None and row["failed_stage"] is None


def test_builder_low_margin_from_config():
    out = PairBuilder(PairsConfig(min_margin=5.0))(rows_table([(ANSWERS, [0.5, 2.0, -1.0])])).to_pylist()
    assert out[0]["drop_reason"] == DROP_LOW_MARGIN


def test_errored_answer_never_competes_even_with_a_score():
    responses = [answer("m1", "a dog"), answer("m2", "partial text", error="timeout"), answer("m3", "a cat")]
    out = PairBuilder()(rows_table([(responses, [1.0, 99.0, 0.0])])).to_pylist()[0]
    assert (out["chosen_index"], out["rejected_index"]) == (0, 2)
    responses = [answer("m1", "a dog"), answer("m2", "a cat"), {**answer("m3", "text"), "finish_reason": "error"}]
    out = PairBuilder()(rows_table([(responses, [1.0, 0.0, -99.0])])).to_pylist()[0]
    assert (out["chosen_index"], out["rejected_index"]) == (0, 1)
    responses = [answer("m1", ""), answer("m2", "a dog"), answer("m3", "a cat")]
    out = PairBuilder()(rows_table([(responses, [99.0, 1.0, 0.0])])).to_pylist()[0]
    assert (out["chosen_index"], out["rejected_index"]) == (1, 2)


def test_bad_rows_fail_alone_and_earlier_failures_pass_through():
    table = rows_table([(ANSWERS, [0.5, 2.0, -1.0]), (ANSWERS, [1.0, 2.0]), (ANSWERS, [0.5, 2.0, -1.0])])
    status = table.column("status").to_pylist()
    status[2] = "failed"
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status, pa.string()))
    out = PairBuilder()(table).to_pylist()
    assert [r["status"] for r in out] == ["ok", "failed", "failed"]
    assert out[1]["failed_stage"] == "pairs" and "3 responses but 2 response_scores" in out[1]["error"]
    assert out[2]["failed_stage"] is None and out[2]["chosen"] is None


def test_builder_adds_drop_reason_to_tables_without_it():
    table = rows_table([(ANSWERS, [1.0, 1.0, 1.0])])
    table = table.drop_columns(["drop_reason"])
    out = PairBuilder()(table).to_pylist()
    assert out[0]["status"] == "dropped" and out[0]["drop_reason"] == DROP_TIE


def test_builder_is_picklable_for_ray_tasks():
    import pickle

    builder = pickle.loads(pickle.dumps(PairBuilder(PairsConfig(min_margin=0.5))))
    assert builder.cfg.min_margin == 0.5


def test_image_bytes_are_carried_unchanged():
    table = rows_table([(ANSWERS, [0.5, 2.0, -1.0])])
    out = PairBuilder()(table).to_pylist()[0]
    assert out["images"][0]["bytes"] == table.column("image").to_pylist()[0]["bytes"]
    Image.open(io.BytesIO(out["images"][0]["bytes"])).verify()


def test_select_pair_module_exports():
    assert selection.Pair is Pair and selection.Drop is Drop


def test_rank_by_judge_or_mix_while_both_scores_stay_in_the_row():
    table = rows_table([(ANSWERS, [0.9, 0.1, 0.5])])
    table = table.append_column("judge_scores", pa.array([[1.0, 8.0, 5.0]], pa.list_(pa.float32())))
    by_reward = PairBuilder(PairsConfig())(table).to_pylist()[0]
    by_judge = PairBuilder(PairsConfig(rank_by="judge"))(table).to_pylist()[0]
    by_mix = PairBuilder(PairsConfig(rank_by="mix", judge_weight=0.25))(table).to_pylist()[0]
    assert (by_reward["chosen_model"], by_reward["rejected_model"]) == ("m1", "m2")
    assert (by_judge["chosen_model"], by_judge["rejected_model"]) == ("m2", "m1")
    assert by_judge["margin"] == pytest.approx(7.0)
    assert (by_mix["chosen_model"], by_mix["rejected_model"]) == ("m1", "m2")  # the reward model weighs 3:1
    for row in (by_reward, by_judge, by_mix):
        assert row["response_scores"] == pytest.approx([0.9, 0.1, 0.5]) and row["judge_scores"] == [1.0, 8.0, 5.0]


def test_rank_by_judge_needs_the_judge_section():
    from synthalign_ray.config import ConfigError, load_config
    from tests.conftest import REPO

    with pytest.raises(ConfigError, match="pairs.rank_by=judge needs a `judge` section"):
        load_config(REPO / "configs" / "tiny.yaml", ["pairs.rank_by=judge"])
