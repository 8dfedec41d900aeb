import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthalign_ray.stages.prompts import (
    InputFileError,
    NoPromptsError,
    PromptsConfig,
    check_prompts,
    content_id,
    image_seed,
    prompt_rows,
    prompt_seed,
    prompts_table,
    read_prompts,
    valid_ids,
)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_jsonl_rows_keep_ids_categories_and_get_seeds(tmp_path):
    path = write(
        tmp_path,
        "p.jsonl",
        '{"id": "a", "category": "art", "prompt": " a red boat "}\n\n{"id": 7, "prompt": "a dog"}\n',
    )
    rows, bad = read_prompts(PromptsConfig(path=path), run_seed=3)
    assert bad == []
    assert [(r["id"], r["category"], r["t2i_prompt"], r["source_line"]) for r in rows] == [
        ("a", "art", "a red boat", 1),
        ("7", "uncategorized", "a dog", 3),
    ]
    assert rows[0]["seed"] == prompt_seed(3, "a") != prompt_seed(4, "a")


def test_bad_rows_are_reported_with_line_numbers(tmp_path):
    path = write(
        tmp_path,
        "p.jsonl",
        "\n".join(
            [
                '{"id": "a", "prompt": "one"}',
                '{"id": "b", "prompt": "  "}',
                '{"id": "a", "prompt": "two"}',
                "{not json",
                '["a list"]',
                '{"id": "c", "prompt": "three"}',
            ]
        ),
    )
    with pytest.raises(InputFileError) as err:
        read_prompts(PromptsConfig(path=path), run_seed=0)
    message = str(err.value)
    assert "4 bad row(s)" in message and "on_bad_rows=skip" in message
    for expected in ["line 2: empty", "line 3: duplicate id 'a' (first seen on line 1)", "line 4: malformed JSON", "line 5: expected a JSON object"]:
        assert expected in message
    rows, bad = read_prompts(PromptsConfig(path=path, on_bad_rows="skip"), run_seed=0)
    assert [r["id"] for r in rows] == ["a", "c"]
    assert [b.line for b in bad] == [2, 3, 4, 5]


def test_txt_ids_are_stable_content_hashes(tmp_path):
    first = read_prompts(PromptsConfig(path=write(tmp_path, "a.txt", "a cat\na dog\n")), run_seed=0)[0]
    shifted = read_prompts(PromptsConfig(path=write(tmp_path, "b.txt", "new line\n\na dog\na cat\n")), run_seed=0)[0]
    ids = {r["t2i_prompt"]: r["id"] for r in first}
    assert ids == {r["t2i_prompt"]: r["id"] for r in shifted if r["t2i_prompt"] in ids}
    assert ids["a cat"] == content_id("a cat") != ids["a dog"]


def test_txt_duplicate_prompt_is_a_duplicate_id(tmp_path):
    rows, bad = read_prompts(PromptsConfig(path=write(tmp_path, "a.txt", "a cat\na cat\n"), on_bad_rows="skip"), 0)
    assert len(rows) == 1 and bad[0].line == 2 and "duplicate id" in bad[0].reason


def test_csv_with_custom_columns_and_ragged_row(tmp_path):
    path = write(tmp_path, "p.csv", 'key,text,topic\nk1,"a boat, on a lake",art\nk2,a dog,animals,extra\nk3,a bus,\n')
    cfg = PromptsConfig(path=path, id_field="key", prompt_field="text", category_field="topic", on_bad_rows="skip")
    rows, bad = read_prompts(cfg, 0)
    assert [(r["id"], r["t2i_prompt"], r["category"]) for r in rows] == [
        ("k1", "a boat, on a lake", "art"),
        ("k3", "a bus", "uncategorized"),
    ]
    assert bad[0].line == 3 and "malformed CSV row" in bad[0].reason


def test_csv_without_prompt_column_is_refused(tmp_path):
    path = write(tmp_path, "p.csv", "id,caption\n1,a dog\n")
    with pytest.raises(InputFileError, match="no 'prompt' column"):
        read_prompts(PromptsConfig(path=path), 0)


def test_parquet_source(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"id": ["x", "y"], "prompt": ["a", None], "category": ["c", "c"]}), path)
    rows, bad = read_prompts(PromptsConfig(path=str(path), on_bad_rows="skip"), 0)
    assert [r["id"] for r in rows] == ["x"] and bad[0].line == 2


def test_limit_and_format_detection(tmp_path):
    path = write(tmp_path, "p.data", "a\nb\nc\n")
    cfg = PromptsConfig(path=path, limit=2)
    assert cfg.resolved_format() == "txt"
    assert len(read_prompts(cfg, 0)[0]) == 2
    assert PromptsConfig(path=path, format="jsonl").resolved_format() == "jsonl"


def test_missing_prompt_file_is_a_validation_error(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        PromptsConfig(path=str(tmp_path / "nope.jsonl"))


def test_image_seeds_are_distinct_per_k_and_reproducible():
    seed = prompt_seed(0, "art-0001")
    seeds = [image_seed(seed, k) for k in range(4)]
    assert len(set(seeds)) == 4 and seeds == [image_seed(seed, k) for k in range(4)]
    assert all(0 <= s < 2**31 for s in seeds)


def test_prompts_table_has_status_columns():
    table = prompts_table([{"id": "a", "category": "c", "t2i_prompt": "p", "seed": 1, "source_line": 1}])
    assert table.column("status").to_pylist() == ["ok"]
    assert table.schema.field("error").type == pa.string()
    assert json.loads(json.dumps(table.to_pylist()))[0]["failed_stage"] is None


def test_check_in_small_chunks_finds_what_one_chunk_finds(tmp_path):
    # duplicates across chunk borders keep their first line; the limit cuts mid-chunk
    lines = ['{"id": "a", "prompt": "x"}', "{bad", '{"id": "b", "prompt": ""}', '{"id": "c", "prompt": "y"}',
             '{"id": "a", "prompt": "z"}', '{"id": "d", "prompt": "w"}', '{"id": "c", "prompt": "v"}', '{"id": "e", "prompt": "u"}']  # fmt: skip
    path = write(tmp_path, "p.jsonl", "\n".join(lines))
    for limit in (None, 1, 3, 4):
        cfg = PromptsConfig(path=path, on_bad_rows="skip", limit=limit)
        whole = check_prompts(cfg)
        for chunk_rows in (1, 2, 3):
            small = check_prompts(cfg, chunk_rows=chunk_rows)
            assert small.bad == whole.bad and small.ids == whole.ids and small.last_line == whole.last_line
        rows = [row for table in prompt_rows(cfg, 0, whole, batch_rows=2) for row in table.to_pylist()]
        assert [r["id"] for r in rows] == ["a", "c", "d", "e"][:limit]
        assert list(valid_ids(cfg, whole)) == [r["id"] for r in rows]
    whole = check_prompts(PromptsConfig(path=path, on_bad_rows="skip"))
    assert [str(b) for b in whole.bad if "duplicate" in b.reason] == [
        "line 5: duplicate id 'a' (first seen on line 1)",
        "line 7: duplicate id 'c' (first seen on line 4)",
    ]
    # with a limit, bad rows after the last row taken are not reported (nor refused)
    assert [b.line for b in check_prompts(PromptsConfig(path=path, on_bad_rows="skip", limit=1)).bad] == []
    assert [b.line for b in check_prompts(PromptsConfig(path=path, on_bad_rows="skip", limit=2)).bad] == [2, 3]


def test_text_lines_end_where_the_file_says_and_bom_is_dropped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat\r\na dog\rthird\n".encode())
    rows, bad = read_prompts(PromptsConfig(path=str(path)), 0)
    assert [(r["t2i_prompt"], r["source_line"]) for r in rows] == [("a cat", 1), ("a dog", 2), ("third", 3)]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.jsonl", "", r"empty.jsonl: no prompt to generate from \(the file has no rows\)$"),
        ("blank.txt", "\n  \n", r"blank.txt: no prompt to generate from \(the file has no rows\)$"),
        ("bad.jsonl", '{"id": "a"}\n{"id": "b", "prompt": " "}\n', r"bad.jsonl: no prompt to generate from: all 2 row\(s\) are bad \(first: line 1: "),
    ],
)
def test_a_file_without_a_valid_prompt_is_an_error(tmp_path, name, text, message):
    """A run of it would write nothing and exit 0, as if it had succeeded."""
    with pytest.raises(NoPromptsError, match=message):
        check_prompts(PromptsConfig(path=write(tmp_path, name, text), on_bad_rows="skip"))
