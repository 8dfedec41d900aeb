"""ResponsesConfig validation and the pure helpers of the responses stage (no Ray, no vLLM)."""

from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from synthalign_ray.engines import carry
from synthalign_ray.engines.vllm_engine import VLLMPoolConfig
from synthalign_ray.stages import responses as rs
from synthalign_ray.stages.responses import ResponseModelConfig, ResponsesConfig, default_model_name

LLAVA = "zoo:lvlm-llava"
NEXT = "zoo:lvlm-llava-next"


def test_defaults():
    model = ResponseModelConfig(model=LLAVA)
    assert model.name == "lvlm-llava"
    assert (model.max_tokens, model.temperature, model.top_p, model.samples, model.seed) == (256, 0.0, 1.0, 1, None)
    assert model.pool == VLLMPoolConfig()
    assert (model.pool.min_actors, model.pool.max_actors, model.pool.num_gpus) == (1, 1, None)
    assert (model.pool.tensor_parallel_size, model.pool.batch_size) == (1, 16)
    assert model.engine_kwargs == {}
    cfg = ResponsesConfig(models=[{"model": LLAVA}, {"model": NEXT}])
    assert cfg.continue_on_error is True
    assert [m.name for m in cfg.models] == ["lvlm-llava", "lvlm-llava-next"]


@pytest.mark.parametrize(
    "ref, name",
    [
        ("zoo:lvlm-llava", "lvlm-llava"),
        ("llava-hf/llava-v1.6-mistral-7b-hf", "llava-v1.6-mistral-7b-hf"),
        ("/models/my-lvlm/", "my-lvlm"),
    ],
)
def test_default_name_from_model_ref(ref, name):
    assert default_model_name(ref) == name


def test_explicit_name_wins():
    assert ResponseModelConfig(name="llava-1.5", model=LLAVA).name == "llava-1.5"


def test_duplicate_names_are_refused_by_name():
    with pytest.raises(ValidationError, match="duplicate model name 'lvlm-llava'"):
        ResponsesConfig(models=[{"model": LLAVA}, {"model": LLAVA, "temperature": 0.7}])
    with pytest.raises(ValidationError, match="duplicate model name 'a'"):
        ResponsesConfig(models=[{"name": "a", "model": LLAVA}, {"name": "a", "model": NEXT}])
    # The same model twice is fine under two names.
    ResponsesConfig(models=[{"model": LLAVA}, {"name": "llava-hot", "model": LLAVA, "temperature": 1.0}])


def test_at_least_one_model():
    with pytest.raises(ValidationError, match="models"):
        ResponsesConfig(models=[])


def test_several_samples_need_temperature():
    with pytest.raises(ValidationError, match="samples=3 with temperature=0"):
        ResponseModelConfig(model=LLAVA, samples=3)
    assert ResponseModelConfig(model=LLAVA, samples=3, temperature=0.7).samples == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"samples": 0},
        {"temperature": -0.1},
        {"top_p": 0},
        {"seed": -1},
        {"name": " "},
        {"max_tokes": 8},  # typo: unknown keys are errors
        {"pool": {"min_actors": 3, "max_actors": 2}},
        {"pool": {"num_gpus": 2}},  # more GPUs than tensor-parallel workers
        {"model": "./no/such/model"},
    ],
)
def test_bad_values(bad):
    with pytest.raises(ValidationError):
        ResponseModelConfig(**{"model": LLAVA, **bad})


def test_pool_accepts_fractions_and_tensor_parallel():
    assert VLLMPoolConfig(num_gpus=0.5).num_gpus == 0.5
    assert VLLMPoolConfig(num_gpus=2, tensor_parallel_size=2).tensor_parallel_size == 2


def test_sampling_params_greedy_unseeded_sampled_seeded_per_row_and_sample():
    greedy = ResponseModelConfig(model=LLAVA, max_tokens=8)
    assert rs.sampling_params(greedy, row_seed=5, run_seed=0) == [{"max_tokens": 8, "temperature": 0.0, "top_p": 1.0}]

    sampled = ResponseModelConfig(model=LLAVA, samples=3, temperature=0.7)
    params = rs.sampling_params(sampled, row_seed=5, run_seed=0)
    seeds = [p["seed"] for p in params]
    assert len(set(seeds)) == 3
    assert params == rs.sampling_params(sampled, row_seed=5, run_seed=0)  # reruns reproduce
    assert seeds != [p["seed"] for p in rs.sampling_params(sampled, row_seed=6, run_seed=0)]
    assert seeds != [p["seed"] for p in rs.sampling_params(sampled, row_seed=5, run_seed=1)]
    # An explicit model seed replaces the run seed.
    pinned = sampled.model_copy(update={"seed": 9})
    assert rs.sampling_params(pinned, 5, run_seed=0) == rs.sampling_params(pinned, 5, run_seed=1)


def test_reserved_input_columns_are_refused():
    assert carry.clashing_columns(["id", "responses", "messages"], [rs.RESPONSES_FIELD]) == ["messages", "responses"]
    assert carry.clashing_columns(["id", "image"], [rs.RESPONSES_FIELD]) == []


def test_restore_input_types_round_trip():
    """What ray.data.llm's Python round trip does to types is undone after the last model."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    original = pa.table(
        {
            "id": pa.array(["a", "b"]),
            "scores": pa.array([[0.5], None], pa.list_(pa.float32())),
            "image": pa.array([{"bytes": b"x", "path": None}, None], image),
        }
    )
    schema = original.schema.serialize().to_pybytes()
    recorded = original.append_column(carry.SCHEMA_COLUMN, pa.array([schema] * 2, pa.binary()))
    rows = recorded.to_pylist()
    rows[0]["responses"] = [{"model": "m", "text": "hi", "finish_reason": "stop", "error": None}]
    rows[1]["responses"] = None
    drifted = pa.Table.from_pylist(rows)  # float64 scores, null-typed path, null-typed error
    assert drifted.schema.field("scores").type != pa.list_(pa.float32())
    restored = carry.restore_batch(drifted, [rs.RESPONSES_FIELD], {"responses": []})
    assert restored.schema == original.schema.append(pa.field("responses", rs.RESPONSES_TYPE))
    assert restored.drop_columns(["responses"]).equals(original)
    assert restored.column("responses").to_pylist()[1] == []


def test_engine_kwargs_must_not_repeat_what_the_config_owns():
    with pytest.raises(ValidationError, match="pool.tensor_parallel_size"):
        ResponseModelConfig(model=LLAVA, engine_kwargs={"tensor_parallel_size": 2})
    with pytest.raises(ValidationError, match="set model instead"):
        ResponseModelConfig(model=LLAVA, engine_kwargs={"model": "other"})
    kwargs = {"max_model_len": 256, "dtype": "float32"}
    assert ResponseModelConfig(model=LLAVA, engine_kwargs=kwargs).engine_kwargs == kwargs


@pytest.mark.parametrize(
    "num_gpus, workers, bundles, engine",
    [
        (0, 1, [{"CPU": 1}], {"enforce_eager": True, "async_scheduling": False, "enable_chunked_prefill": False}),  # CPU: never Ray's GPU bundle
        (0, 2, [{"CPU": 1}, {"CPU": 1}], {"enforce_eager": True, "async_scheduling": False, "enable_chunked_prefill": False}),
        (1, 1, None, {}),  # one whole GPU per worker: Ray's default bundles
        (2, 2, None, {}),
        (0.5, 1, [{"CPU": 1, "GPU": 0.5}], {"gpu_memory_utilization": 0.45}),  # two engines share a GPU
        (1, 2, [{"CPU": 1, "GPU": 0.5}, {"CPU": 1, "GPU": 0.5}], {"gpu_memory_utilization": 0.45}),
    ],
)
def test_engine_devices(num_gpus, workers, bundles, engine):
    from synthalign_ray.engines.vllm_engine import engine_devices

    placement, defaults = engine_devices(num_gpus, workers)
    assert (placement and placement["bundles"]) == bundles
    assert defaults == engine
