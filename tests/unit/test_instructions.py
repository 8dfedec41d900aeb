import pytest
from pydantic import ValidationError

from synthalign_ray.stages.instructions import InstructionsConfig, InstructionWriter, missing_instructions
from synthalign_ray.stages.prompts import InputFileError, prompts_table


def table(ids):
    return prompts_table(
        [{"id": i, "category": "art", "t2i_prompt": f"prompt of {i}", "seed": 1, "source_line": n} for n, i in enumerate(ids, 1)]
    )


def test_template_formats_row_fields():
    cfg = InstructionsConfig(template="[{category}] Is this a faithful picture of: {t2i_prompt}?")
    rows = InstructionWriter(cfg)(table(["a", "b"])).to_pylist()
    assert rows[1]["instruction"] == "[art] Is this a faithful picture of: prompt of b?"
    assert rows[1]["instruction_source"] == "template"


def test_template_with_unknown_field_is_refused():
    with pytest.raises(ValidationError, match=r"unknown field\(s\) \['caption'\]"):
        InstructionsConfig(template="Describe {caption}")
    with pytest.raises(ValidationError, match="not a valid format string"):
        InstructionsConfig(template="Describe {t2i_prompt")


def test_file_is_joined_by_id_not_by_line_order(tmp_path):
    path = tmp_path / "instructions.jsonl"
    path.write_text('{"id": "b", "instruction": "question about b"}\n{"id": "a", "instruction": "question about a"}\n')
    cfg = InstructionsConfig(source="file", path=str(path))
    rows = InstructionWriter(cfg)(table(["a", "b", "c"])).to_pylist()
    assert [r["instruction"] for r in rows] == ["question about a", "question about b", None]
    assert [r["status"] for r in rows] == ["ok", "ok", "dropped"]
    assert rows[2]["drop_reason"] == "no_instruction"
    assert missing_instructions(cfg, ["a", "b", "c"]) == ["c"]


def test_bad_instruction_lines_are_listed(tmp_path):
    path = tmp_path / "instructions.jsonl"
    path.write_text(
        '{"id": "a", "instruction": "q"}\n{"id": "a", "instruction": "again"}\n{"instruction": "no id"}\n{"id": "c", "instruction": ""}\nnot json\n'
    )
    cfg = InstructionsConfig(source="file", path=str(path))
    with pytest.raises(InputFileError) as err:
        InstructionWriter(cfg)
    message = str(err.value)
    for expected in ["line 2: duplicate id 'a'", "line 3: missing 'id'", "line 4: empty or missing 'instruction'", "line 5: malformed JSON"]:
        assert expected in message


def test_file_source_needs_an_existing_path(tmp_path):
    with pytest.raises(ValidationError, match="source=file needs instructions.path"):
        InstructionsConfig(source="file")
    with pytest.raises(ValidationError, match="does not exist"):
        InstructionsConfig(source="file", path=str(tmp_path / "missing.jsonl"))
