"""Pure rules of the response-scores stage: which answers are scored, templates, objective names,
and the trust_remote_code refusal (no model is loaded here)."""

import json

import pytest
from pydantic import ValidationError

from synthalign_ray.stages.response_scores import (
    ARMO_OBJECTIVES,
    DEFAULT_OBJECTIVES,
    ResponseScoresConfig,
    answer_is_valid,
    chat_messages,
    check_remote_code,
    check_template,
    model_objective_names,
    render_template,
    resolve_objectives,
    scatter,
)

AUTO_MAP = {"AutoModelForSequenceClassification": "modeling_custom.CustomRewardModel"}


def answer(text="a dog in a park", finish_reason="stop", error=None):
    return {"model": "m", "text": text, "finish_reason": finish_reason, "error": error}


@pytest.mark.parametrize(
    "response, valid",
    [
        (answer(), True),
        (answer(finish_reason="length"), True),  # truncated, but an answer: the reward model judges it
        (answer(finish_reason=None), True),
        (answer(text=""), False),
        (answer(text="  \n\t "), False),
        (answer(text=None), False),
        (answer(error="timeout"), False),
        (answer(finish_reason="error"), False),
        ({"model": "m", "text": "fine"}, True),  # no error / finish_reason keys at all
        (None, False),
        ({}, False),
    ],
)
def test_answer_validity(response, valid):
    assert answer_is_valid(response) is valid


def test_template_needs_answer_and_only_known_fields():
    assert check_template("Q: {instruction}\nA: {answer}")
    assert check_template("{answer}")  # the instruction is optional
    rendered = render_template("Q: {instruction} A: {answer} {{json}}", "what {x}?", "it {is}")
    assert rendered == "Q: what {x}? A: it {is} {json}"  # braces in the texts are not re-parsed
    with pytest.raises(ValueError, match=r"must contain \{answer\}"):
        check_template("Q: {instruction}")
    with pytest.raises(ValueError, match="only"):
        check_template("{instruction} {answer} {image}")
    with pytest.raises(ValueError, match="only"):
        check_template("{0} {answer}")
    with pytest.raises(ValueError, match="not a valid format string"):
        check_template("{answer} {")


def test_template_config_validation(tmp_path):
    folder = tmp_path / "rm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    cfg = ResponseScoresConfig(model=str(folder), input_format="template", template="{instruction}\n{answer}")
    assert cfg.template == "{instruction}\n{answer}"
    with pytest.raises(ValidationError, match=r"response_scores.template must contain \{answer\}"):
        ResponseScoresConfig(model=str(folder), input_format="template", template="{instruction}")
    with pytest.raises(ValidationError, match="input_format=template needs response_scores.template"):
        ResponseScoresConfig(model=str(folder), input_format="template")
    with pytest.raises(ValidationError, match="only used with input_format=template"):
        ResponseScoresConfig(model=str(folder), template="{answer}")
    with pytest.raises(ValidationError, match="Extra inputs"):
        ResponseScoresConfig(model=str(folder), trust_remote=True)
    with pytest.raises(ValidationError, match="distinct"):
        ResponseScoresConfig(model=str(folder), objectives=["helpfulness", "helpfulness"])


def test_defaults():
    fields = ResponseScoresConfig.model_fields
    assert fields["trust_remote_code"].default is False
    assert fields["input_format"].default == "chat"
    assert fields["objectives"].default_factory() == DEFAULT_OBJECTIVES
    assert DEFAULT_OBJECTIVES == ["helpfulness", "correctness", "coherence", "complexity", "verbosity"]


def test_chat_messages():
    assert chat_messages("what is it", "a dog") == [
        {"role": "user", "content": "what is it"},
        {"role": "assistant", "content": "a dog"},
    ]


def test_objective_mapping_prefers_helpsteer_and_accepts_full_names():
    names = ARMO_OBJECTIVES
    assert resolve_objectives(DEFAULT_OBJECTIVES, names) == [0, 1, 2, 3, 4]
    assert resolve_objectives(["ultrafeedback-helpfulness", "is_safe", "helpsteer-verbosity"], names) == [9, 10, 4]
    assert resolve_objectives([], names) == []
    with pytest.raises(ValueError, match="no objective 'fluency'"):
        resolve_objectives(["fluency"], names)
    with pytest.raises(ValueError, match="ambiguous"):
        resolve_objectives(["complexity"], ["code-complexity", "math-complexity"])


def test_model_objective_names():
    assert model_objective_names({"objective_names": ["a-x", "b-y"]}, 2) == ["a-x", "b-y"]
    with pytest.raises(ValueError, match="2 objective_names but the model gives 3"):
        model_objective_names({"objective_names": ["a-x", "b-y"]}, 3)
    # The released ArmoRM's config.json has no names: its model card's list applies.
    armo = {"architectures": ["LlamaForRewardModelWithGating"]}
    assert model_objective_names(armo, 19) == ARMO_OBJECTIVES
    assert model_objective_names(armo, 7) is None
    assert model_objective_names({"architectures": ["SomethingElse"]}, 19) is None


def test_scatter_puts_nulls_at_invalid_answers():
    assert scatter([True, False, True, False], [1.0, 2.0]) == [1.0, None, 2.0, None]
    assert scatter([False, False], []) == [None, None]
    assert scatter([], []) == []
    with pytest.raises(ValueError):
        scatter([True], [1.0, 2.0])
    with pytest.raises(ValueError):
        scatter([True, True], [1.0])


def test_remote_code_is_refused_unless_trusted():
    check_remote_code({"model_type": "llama"}, False, "m")  # no custom code: nothing to trust
    check_remote_code({"auto_map": AUTO_MAP}, True, "m")
    with pytest.raises(ValueError, match=r"response_scores\.trust_remote_code: true") as error:
        check_remote_code({"auto_map": AUTO_MAP}, False, "org/custom-reward")
    assert "modeling_custom.CustomRewardModel" in str(error.value)
    assert "org/custom-reward" in str(error.value)
    # ArmoRM's folder has an auto_map too, but the project's own module loads it: nothing to trust.
    check_remote_code({"auto_map": AUTO_MAP, "architectures": ["LlamaForRewardModelWithGating"]}, False, "m")


def test_config_refuses_a_folder_with_remote_code(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "auto_map": AUTO_MAP}))
    with pytest.raises(ValidationError, match=r"response_scores\.trust_remote_code"):
        ResponseScoresConfig(model=str(folder))
    assert ResponseScoresConfig(model=str(folder), trust_remote_code=True).trust_remote_code
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not ResponseScoresConfig(model=str(plain)).trust_remote_code
