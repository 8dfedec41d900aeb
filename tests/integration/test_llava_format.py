"""LLaVA / PDS-DPO JSON export and import: a round trip keeps ids, instructions, answers and image bytes."""

import json

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from synthalign_ray import store
from synthalign_ray.formats.llava_json import (
    IMPORT_SCHEMA,
    LlavaFormatError,
    export_llava,
    image_file_name,
    import_llava,
)
from synthalign_ray.stages.pairs import PAIR_FIELDS, PairBuilder, PairsConfig
from synthalign_ray.stages.prompts import prompts_table

RESPONSE_TYPE = pa.struct(
    [("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())]
)
IDS = ["p0", "p1", "odd/id with spaces", "p3"]


def built_pairs(system_prompt=None) -> pa.Table:
    n = len(IDS)
    table = prompts_table(
        [{"id": row_id, "category": "c", "t2i_prompt": "t", "seed": i, "source_line": i + 1} for i, row_id in enumerate(IDS)]
    )
    images = [store.encode_image(Image.new("RGB", (12, 10), (40 * i, 200 - 40 * i, 7))) for i in range(n)]
    table = table.append_column(pa.field("image", store.IMAGE_TYPE), pa.array(images, store.IMAGE_TYPE))
    table = table.append_column("image_index", pa.array([0] * n, pa.int32()))
    instructions = [f"What is in image {i}?\nAnswer in detail." for i in range(n)]
    table = table.append_column("instruction", pa.array(instructions, pa.string()))
    responses = [
        [{"model": f"m{k}", "text": f"answer {k} to prompt {i}, ünïcode ✓", "finish_reason": "stop", "error": None} for k in range(3)]
        for i in range(n)
    ]
    table = table.append_column("responses", pa.array(responses, pa.list_(RESPONSE_TYPE)))
    scores = [[0.1, 0.9, -0.3], [2.0, 1.0, 3.0], [1.0, 1.0, 1.0], [None, 0.5, 0.4]]  # row 2 is a tie
    table = table.append_column("response_scores", pa.array(scores, pa.list_(pa.float32())))
    return PairBuilder(PairsConfig(system_prompt=system_prompt))(table)


def test_round_trip_keeps_ids_instructions_texts_and_image_bytes(tmp_path):
    pairs = built_pairs()
    result = export_llava(pairs, str(tmp_path / "llava"))
    assert (result.pairs, result.skipped) == (3, 1)  # the tie row is not exported

    entries = json.loads((tmp_path / "llava" / "llava_pairs.json").read_text())
    assert [e["id"] for e in entries] == ["p0", "p1", "p3"]
    first = entries[0]
    assert first["image"] == "p0.png" and (tmp_path / "llava" / "images" / "p0.png").is_file()
    assert first["conversations"] == [
        {"from": "human", "value": "<image>\nWhat is in image 0?\nAnswer in detail."},
        {"from": "gpt", "value": "answer 1 to prompt 0, ünïcode ✓"},
    ]
    assert first["rejected_conversations"] == [
        {"from": "human", "value": "<image>\nWhat is in image 0?\nAnswer in detail."},
        {"from": "gpt", "value": "answer 2 to prompt 0, ünïcode ✓"},
    ]

    imported = import_llava(result.json_path, result.images_dir)
    assert imported.schema == IMPORT_SCHEMA
    ok = pairs.filter(pc.equal(pairs.column("status"), "ok")).to_pylist()
    back = imported.to_pylist()
    assert [r["id"] for r in back] == [r["id"] for r in ok]
    for original, row in zip(ok, back):
        assert row["instruction"] == original["instruction"]
        assert (row["chosen_text"], row["rejected_text"]) == (original["chosen_text"], original["rejected_text"])
        assert row["image"]["bytes"] == original["image"]["bytes"]
        for column in ("images", "prompt", "chosen", "rejected"):
            assert row[column] == original[column]
        assert row["status"] == "ok" and row["drop_reason"] is None
        assert row["margin"] is None and row["chosen_model"] is None and row["category"] is None


def test_export_reads_a_run_folder_and_names_unsafe_ids_safely(tmp_path):
    pairs = built_pairs()
    # as the pipeline writes it: pair rows in pairs/, dropped rows elsewhere
    ok = pairs.filter(pc.equal(pairs.column("status"), "ok"))
    store.write_table(str(tmp_path / "run" / "pairs" / "part-0.parquet"), store.with_hf_features(ok.slice(0, 2)))
    store.write_table(str(tmp_path / "run" / "pairs" / "part-1.parquet"), store.with_hf_features(ok.slice(2)))
    result = export_llava(str(tmp_path / "run"), str(tmp_path / "out"))
    assert result.pairs == 3
    assert [r["id"] for r in import_llava(result.json_path).to_pylist()] == ["p0", "p1", "p3"]

    name = image_file_name("odd/id with spaces")
    assert "/" not in name and " " not in name and name.endswith(".png")
    assert name != image_file_name("odd_id_with_spaces")


def test_import_with_a_system_prompt_and_hf_loading(tmp_path):
    import datasets

    result = export_llava(built_pairs(), str(tmp_path / "llava"))
    table = import_llava(result.json_path, result.images_dir, system_prompt="Be precise.")
    assert table.column("prompt").to_pylist()[0][0] == {"role": "system", "content": [{"type": "text", "text": "Be precise."}]}
    store.write_table(str(tmp_path / "pairs" / "part-0.parquet"), store.with_hf_features(table))
    ds = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs" / "*.parquet"), split="train")
    assert ds.features["images"] == datasets.List(datasets.Image())
    assert ds[0]["images"][0].size == (12, 10)


def test_export_skips_non_pairs_and_rejects_duplicate_ids(tmp_path):
    pairs = built_pairs()
    with pytest.raises(ValueError, match="duplicate id 'p0'"):
        export_llava([pairs, pairs], str(tmp_path / "dup"))
    assert not list((tmp_path / "dup").glob("*.json"))  # no half-written JSON left behind


def write_json(path, entries):
    path.write_text(json.dumps(entries))
    return str(path)


def good_entry(row_id, image="a.png"):
    human = {"from": "human", "value": "<image>\nq"}
    return {
        "id": row_id,
        "image": image,
        "conversations": [human, {"from": "gpt", "value": "good"}],
        "rejected_conversations": [human, {"from": "gpt", "value": "bad"}],
    }


def test_import_reports_malformed_entries_by_index_and_missing_images_by_path(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.png")
    no_gpt = good_entry("e2")
    no_gpt["conversations"] = no_gpt["conversations"][:1]
    swapped = good_entry("e3")
    swapped["rejected_conversations"] = list(reversed(swapped["rejected_conversations"]))
    other_question = good_entry("e4")
    other_question["rejected_conversations"][0] = {"from": "human", "value": "<image>\nanother"}
    entries = [
        good_entry("e0"),
        "not an object",
        no_gpt,
        swapped,
        other_question,
        {"id": "e5", "image": "a.png"},
        good_entry("e6", image="missing.png"),
        good_entry("e0"),
        good_entry(7),
    ]
    with pytest.raises(LlavaFormatError) as info:
        import_llava(write_json(tmp_path / "data.json", entries), str(images))
    problems = info.value.problems
    assert len(problems) == 7
    assert problems[0].startswith("entry 1: entry must be an object")
    assert problems[1].startswith("entry 2 (id 'e2'): `conversations` must have 2 turns")
    assert problems[2].startswith("entry 3 (id 'e3'): `rejected_conversations` turns must be")
    assert problems[3] == "entry 4 (id 'e4'): `conversations` and `rejected_conversations` ask different questions"
    assert problems[4] == "entry 5 (id 'e5'): missing key(s) conversations, rejected_conversations"
    assert problems[5] == f"entry 6 (id 'e6'): image file not found: {images / 'missing.png'}"
    assert problems[6] == "entry 7 (id 'e0'): duplicate id, first seen at entry 0"
    assert "7 problem(s)" in str(info.value)


def test_import_accepts_integer_ids_and_image_token_variants(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (4, 4)).save(images / "a.png")
    entry = good_entry(42)
    for conversation in ("conversations", "rejected_conversations"):
        entry[conversation][0] = {"from": "human", "value": "Describe it.\n<image>"}
    table = import_llava(write_json(tmp_path / "data.json", [entry]))
    row = table.to_pylist()[0]
    assert row["id"] == "42" and row["instruction"] == "Describe it."
    assert row["image"]["bytes"] == (images / "a.png").read_bytes()


def test_import_rejects_non_list_json(tmp_path):
    with pytest.raises(LlavaFormatError, match="top level must be a list"):
        import_llava(write_json(tmp_path / "data.json", {"id": 1}), str(tmp_path))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(LlavaFormatError, match="not valid JSON"):
        import_llava(str(tmp_path / "broken.json"), str(tmp_path))


def test_import_schema_contains_every_pair_column():
    for field in PAIR_FIELDS:
        assert IMPORT_SCHEMA.field(field.name).type == field.type
