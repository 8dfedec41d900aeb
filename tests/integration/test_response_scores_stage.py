"""The response-scores stage on the zoo reward models (the ArmoRM twin, and a plain one-label
LlamaForSequenceClassification), called directly on pyarrow tables: no Ray."""

import json
import math
import shutil

import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError

from synthalign_ray import zoo
from synthalign_ray.stages.prompts import prompt_seed, prompts_table
from synthalign_ray.stages.response_scores import (
    ARMO_OBJECTIVES,
    DEFAULT_OBJECTIVES,
    ResponseScorer,
    ResponseScoresConfig,
)

ARMO = "zoo:armorm"
SEQCLS = "zoo:reward-seqcls"
RESPONSE_TYPE = pa.list_(
    pa.struct([("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())])
)


def answer(text, model="lvlm-a", finish_reason="stop", error=None):
    return {"model": model, "text": text, "finish_reason": finish_reason, "error": error}


def make_table(instructions, responses, failed=()):
    """Prompt rows plus `instruction` and `responses`; rows whose index is in `failed` failed earlier."""
    table = prompts_table(
        [
            {"id": f"p{i}", "category": "c", "t2i_prompt": "a dog", "seed": prompt_seed(0, f"p{i}"), "source_line": i}
            for i in range(len(instructions))
        ]
    )
    for name, values in (
        ("status", ["failed" if i in failed else "ok" for i in range(table.num_rows)]),
        ("error", ["RuntimeError: earlier" if i in failed else None for i in range(table.num_rows)]),
        ("failed_stage", ["responses" if i in failed else None for i in range(table.num_rows)]),
    ):
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values, pa.string()))
    table = table.append_column("instruction", pa.array(instructions, pa.string()))
    return table.append_column("responses", pa.array(responses, RESPONSE_TYPE))


INSTRUCTIONS = ["what is in the picture", "describe the scene in detail", "what color is the car"]
RESPONSES = [
    [
        answer("a dog in the park", "lvlm-a"),
        answer("   ", "lvlm-b"),
        answer("half an answer", "lvlm-c", error="timeout"),
    ],
    [
        answer("a busy street with a red bus", "lvlm-a"),
        answer("many people walking near the station in the evening", "lvlm-b", finish_reason="length"),
        answer("a partial answer", "lvlm-c", finish_reason="error"),
    ],
    [answer("red", "lvlm-a"), answer("blue", "lvlm-b")],
]
# Which answers are valid, per row; row 2 failed in an earlier stage.
VALID = [[True, False, False], [True, True, False], None]


@pytest.fixture(scope="module")
def scorers():
    return {
        ARMO: ResponseScorer(ResponseScoresConfig(model=ARMO)),
        SEQCLS: ResponseScorer(ResponseScoresConfig(model=SEQCLS)),
    }


@pytest.fixture(scope="module")
def table():
    return make_table(INSTRUCTIONS, RESPONSES, failed={2})


@pytest.mark.parametrize("ref", [ARMO, SEQCLS])
def test_schema_nulls_and_finite_scores(scorers, table, ref):
    out = scorers[ref](table)
    assert out.num_rows == 3 and out.column_names[: table.num_columns] == table.column_names
    assert out.schema.field("response_scores").type == pa.list_(pa.float32())
    objective_type = out.schema.field("response_objectives").type
    assert [f.name for f in objective_type.value_type] == DEFAULT_OBJECTIVES
    assert all(f.type == pa.float32() for f in objective_type.value_type)
    assert out.schema.field("reward_model").type == pa.string()

    rows = out.to_pylist()
    for row, valid in zip(rows[:2], VALID[:2]):
        assert row["status"] == "ok" and row["reward_model"] == ref
        assert len(row["response_scores"]) == len(valid)
        for score, ok in zip(row["response_scores"], valid):
            assert (score is not None and math.isfinite(score)) if ok else score is None
        if ref == ARMO:
            assert len(row["response_objectives"]) == len(valid)
            for objectives, ok in zip(row["response_objectives"], valid):
                if ok:
                    assert list(objectives) == DEFAULT_OBJECTIVES
                    assert all(math.isfinite(v) for v in objectives.values())
                else:
                    assert objectives is None
        else:  # a one-label model has no per-objective rewards
            assert row["response_objectives"] is None
    failed = rows[2]
    assert (failed["status"], failed["error"]) == ("failed", "RuntimeError: earlier")  # untouched
    assert failed["failed_stage"] == "responses"
    assert all(failed[c] is None for c in ("response_scores", "response_objectives", "reward_model"))
    scores = [s for row in rows[:2] for s in row["response_scores"] if s is not None]
    assert len(set(scores)) == len(scores)  # different answers, different scores


@pytest.mark.parametrize("ref", [ARMO, SEQCLS])
def test_deterministic_and_independent_of_batch(scorers, table, ref):
    scorer = scorers[ref]
    first = scorer(table).column("response_scores").to_pylist()
    assert scorer(table).column("response_scores").to_pylist() == first
    # Each valid answer scored alone (no padding, no neighbours) gives the score it got in the batch.
    for r, (instruction, responses) in enumerate(zip(INSTRUCTIONS[:2], RESPONSES[:2])):
        for a, response in enumerate(responses):
            if not VALID[r][a]:
                continue
            alone = scorer(make_table([instruction], [[response]])).column("response_scores").to_pylist()[0][0]
            assert alone == pytest.approx(first[r][a], abs=1e-5)
    # Micro-batches of one answer: same scores again.
    scorer.cfg = scorer.cfg.model_copy(update={"micro_batch_size": 1})
    try:
        one_by_one = scorer(table).column("response_scores").to_pylist()
    finally:
        scorer.cfg = scorer.cfg.model_copy(update={"micro_batch_size": 16})
    for got, want in zip(one_by_one[:2], first[:2]):
        assert got == pytest.approx(want, abs=1e-5)


def test_armo_scores_are_the_model_card_usage(scorers, table):
    """The stage's score and objectives equal ArmoRM's documented call: apply_chat_template, .score, .rewards."""
    scorer = scorers[ARMO]
    row = scorer(table).to_pylist()[0]
    messages = [
        {"role": "user", "content": INSTRUCTIONS[0]},
        {"role": "assistant", "content": RESPONSES[0][0]["text"]},
    ]
    inputs = scorer.tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    assert (inputs["input_ids"][0] == scorer.tokenizer.bos_token_id).sum() == 1  # one BOS, not two
    with torch.no_grad():
        output = scorer.model(**inputs)
    assert row["response_scores"][0] == pytest.approx(output.score[0].item(), abs=1e-5)
    for k, name in enumerate(DEFAULT_OBJECTIVES):  # helpsteer-* are ArmoRM's first five heads
        assert ARMO_OBJECTIVES[k] == f"helpsteer-{name}"
        assert row["response_objectives"][0][name] == pytest.approx(output.rewards[0, k].item(), abs=1e-5)


def test_seqcls_score_is_the_single_logit(scorers, table):
    scorer = scorers[SEQCLS]
    row = scorer(table).to_pylist()[1]
    messages = [
        {"role": "user", "content": INSTRUCTIONS[1]},
        {"role": "assistant", "content": RESPONSES[1][1]["text"]},
    ]
    inputs = scorer.tokenizer.apply_chat_template(messages, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = scorer.model(**inputs).logits
    assert logits.shape == (1, 1)
    assert row["response_scores"][1] == pytest.approx(logits[0, 0].item(), abs=1e-5)


def test_template_input_format():
    template = "Question: {instruction}\nAnswer: {answer}"
    scorer = ResponseScorer(ResponseScoresConfig(model=SEQCLS, input_format="template", template=template))
    out = scorer(make_table(INSTRUCTIONS[:1], RESPONSES[:1])).to_pylist()[0]
    text = template.format(instruction=INSTRUCTIONS[0], answer=RESPONSES[0][0]["text"])
    with torch.no_grad():
        want = scorer.model(**scorer.tokenizer(text, return_tensors="pt")).logits[0, 0].item()
    assert out["response_scores"][0] == pytest.approx(want, abs=1e-5) and out["response_scores"][1:] == [None, None]


def test_bad_rows_fail_alone_and_long_texts_are_truncated():
    scorer = ResponseScorer(ResponseScoresConfig(model=ARMO, max_length=48))
    long_answer = " ".join(["a dog runs in the park"] * 40)
    long_instruction = " ".join(["describe the image"] * 40)
    table = make_table(
        [INSTRUCTIONS[0], "", long_instruction, INSTRUCTIONS[1]],
        [[answer(long_answer)], [answer("a dog")], [answer("a dog")], [answer("a street"), answer("")]],
    )
    rows = scorer(table).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "ok"]
    assert "no instruction" in rows[1]["error"] and rows[1]["failed_stage"] == "response_scores"
    assert "response_scores.max_length" in rows[2]["error"]
    assert math.isfinite(rows[0]["response_scores"][0])  # truncated to 48 tokens, still scored
    assert math.isfinite(rows[3]["response_scores"][0]) and rows[3]["response_scores"][1] is None
    # A row with no valid answer at all: all nulls, the row itself is fine (selection drops it later).
    empty = scorer(make_table(["what is it"], [[answer(" "), answer("x", error="oom")]])).to_pylist()[0]
    assert empty["status"] == "ok" and empty["response_scores"] == [None, None]


def test_remote_code_needs_explicit_trust(tmp_path):
    """A folder with its own code (auto_map) is refused unless trusted; ArmoRM's is not its code's business."""
    folder = tmp_path / "custom-reward"
    shutil.copytree(zoo.build("reward-seqcls"), folder)
    config_json = json.loads((folder / "config.json").read_text())
    config_json["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"}
    (folder / "config.json").write_text(json.dumps(config_json))
    # At config time, once the folder is on disk...
    with pytest.raises(ValidationError, match=r"response_scores\.trust_remote_code"):
        ResponseScoresConfig(model=str(folder))
    unchecked = ResponseScoresConfig(model=str(folder), trust_remote_code=True).model_copy(
        update={"trust_remote_code": False}
    )
    with pytest.raises(ValueError, match=r"response_scores\.trust_remote_code"):
        unchecked.check_remote_code()  # e.g. again after the driver built the zoo models
    # ...and at load time, in the actor (e.g. a hub model fetched only there).
    with pytest.raises(ValueError, match=r"ships its own code.*response_scores\.trust_remote_code: true"):
        ResponseScorer(unchecked)
    # ArmoRM's folder names modeling_custom.py too, but loads into the project's module, untrusted.
    assert "auto_map" in json.loads((zoo.build("armorm") / "config.json").read_text())
    ResponseScoresConfig(model=ARMO).check_remote_code()


def test_multi_label_classifier_is_refused(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    source = zoo.build("reward-seqcls")
    config = AutoConfig.from_pretrained(source)
    config.num_labels = 2
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(source).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"logits of shape \(1, 2\).*num_labels=1"):
        ResponseScorer(ResponseScoresConfig(model=str(tmp_path)))
