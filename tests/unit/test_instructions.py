import pickle

import pytest
from pydantic import ValidationError

from synthalign_ray.stages.instructions import InstructionsConfig, InstructionWriter, missing_instructions, read_instruction_file, worker_instructions
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
    # the driver's streaming check and the workers' loader refuse the same lines
    for check in (lambda: missing_instructions(cfg, ["a"]), lambda: read_instruction_file(cfg)):
        with pytest.raises(InputFileError) as err:
            check()
        message = str(err.value)
        for expected in ["line 2: duplicate id 'a' (first seen on line 1)", "line 3: missing 'id'", "line 4: empty or missing 'instruction'", "line 5: malformed JSON"]:
            assert expected in message


def test_file_source_needs_an_existing_path(tmp_path):
    with pytest.raises(ValidationError, match="source=file needs instructions.path"):
        InstructionsConfig(source="file")
    with pytest.raises(ValidationError, match="does not exist"):
        InstructionsConfig(source="file", path=str(tmp_path / "missing.jsonl"))


def test_the_file_is_read_in_the_worker_and_checked_in_chunks_on_the_driver(tmp_path):
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(f'{{"id": "p{i}", "instruction": "question {i}"}}\n' for i in range(0, 5000, 2)))
    cfg = InstructionsConfig(source="file", path=str(path))
    writer = InstructionWriter(cfg)
    assert len(pickle.dumps(writer)) < 10_000  # no mapping shipped with the stage
    assert [r["instruction"] for r in writer(table(["p2", "p3"])).to_pylist()] == ["question 2", None]
    # read once per process: a later task (a fresh copy of the stage) finds it read
    assert worker_instructions(cfg) is worker_instructions(cfg.model_copy())
    ids = [f"p{i}" for i in range(5000)]  # more than one chunk of ids
    assert missing_instructions(cfg, iter(ids)) == [f"p{i}" for i in range(1, 5000, 2)]
