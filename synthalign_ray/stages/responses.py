"""Responses: M open LVLMs answer each row's instruction about its kept image (paper step 5).

Paper section 3.2: several open LVLMs answer the same instruction about the same synthetic image, and
the reward model later ranks their answers (response_scores.py, pairs.py). The official code uses three
LLaVA-v1.6 models (mistral-7b, vicuna-13b, vicuna-7b); the paper also names llama3-llava-next-8b,
InternVL2.5-8B and Mini-InternVL-4B. Here every model in `responses.models` gets its own vLLM engine
pool (Ray's `ray.data.llm`, built by `engines/vllm_engine.py`), so each pool autoscales on its own and a
13B model can have more replicas than a 7B one.

Data flow, all row-local (no groupby, no join):

    ds -> [record input schema] -> model 1 processor -> ... -> model M processor -> [restore types]

- Each processor runs over the WHOLE row: ray.data.llm carries every input column through its stages;
  preprocess adds the chat request, postprocess keeps the input columns and appends this model's
  answers to `responses`, a list of {model, text, finish_reason, error} (created by the first model).
- `samples` > 1 sends one vLLM request per sample to the same engine; each becomes its own answer. A
  sample's seed derives from (`seed`, else the run seed) and the row's `seed`, so reruns reproduce.
- A row whose `status` is not "ok" never reaches an engine: preprocess marks it with Ray's
  `__inference_error__`, which makes every ray.data.llm stage pass it through untouched. Postprocess is
  bypassed too (Ray returns such rows with every helper field still in them), so a map after the
  processor (`finish_row`) restores them to their input columns, with an empty `responses` list.
- With `continue_on_error`, a request the engine refuses (e.g. a prompt longer than `max_model_len`) or
  a row whose image cannot be read becomes an answer with finish_reason "error" and the error text; its
  neighbours are answered normally. Later stages never rank such answers.
- Rows go through Python dicts inside ray.data.llm, which loses Arrow types (float32 lists come back as
  float64, an all-null string as type null, ...). The input schema is therefore recorded per row before
  the first model and restored after the last, so every other column comes out exactly as it went in,
  and `responses` has exactly `RESPONSES_TYPE`.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from synthalign_ray.engines import carry
from synthalign_ray.engines.vllm_engine import (
    LIGHT_STAGE_CPUS,
    SAMPLES,
    SAMPLING_PARAMS_LIST,
    VLLMPoolConfig,
    build_engine_processor,
    image_chat_request,
)
from synthalign_ray.base import STATUS_OK, ModelRef, StrictModel
from synthalign_ray.base import SEED_MODULUS

RESPONSE_TYPE = pa.struct(
    [("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())]
)
RESPONSES_TYPE = pa.list_(RESPONSE_TYPE)
RESPONSES_FIELD = pa.field("responses", RESPONSES_TYPE)
FINISH_ERROR = "error"


class ResponseModelConfig(StrictModel):
    """One answering LVLM: its vLLM engine pool and sampling settings."""

    name: str = Field(description="label stored with each answer; default: derived from the model reference")
    model: ModelRef = Field(description="LVLM served by vLLM: zoo:NAME, local folder or hub id (org/name[@REVISION])")
    max_tokens: int = Field(256, ge=1, description="answer length limit, in tokens")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    samples: int = Field(1, ge=1, description="answers per row from this model, each its own vLLM request")
    seed: int | None = Field(
        None, ge=0, description="base of the per-row sampling seeds; None: the run seed (answers always reproduce)"
    )
    pool: VLLMPoolConfig = Field(default_factory=VLLMPoolConfig)
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vllm.AsyncEngineArgs, e.g. dtype, max_model_len"
    )

    @model_validator(mode="before")
    @classmethod
    def _default_name(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("name") is None and isinstance(data.get("model"), str):
            data = {**data, "name": default_model_name(data["model"])}
        return data

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, name: str) -> str:
        if not name.strip():
            raise ValueError("name must not be blank")
        return name

    @field_validator("engine_kwargs")
    @classmethod
    def _no_engine_kwargs_owned_elsewhere(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        owned = {"model": "model", "tensor_parallel_size": "pool.tensor_parallel_size"}
        clash = [f"{key} (set {owned[key]} instead)" for key in owned if key in kwargs]
        if clash:
            raise ValueError(f"engine_kwargs must not set {', '.join(clash)}")
        return kwargs

    @model_validator(mode="after")
    def _samples_need_sampling(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError(
                f"samples={self.samples} with temperature=0: greedy decoding gives the same answer every time; "
                "set temperature > 0 (e.g. 0.7) or samples: 1"
            )
        return self


class ResponsesConfig(StrictModel):
    models: list[ResponseModelConfig] = Field(min_length=1, description="the answering LVLMs, in answer order")
    continue_on_error: bool = Field(
        True, description="a request that fails becomes an answer with finish_reason 'error' instead of failing the run"
    )

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ResponseModelConfig]) -> list[ResponseModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.name in seen:
                raise ValueError(
                    f"duplicate model name {model.name!r}: answers are labelled by name, give each model its own `name`"
                )
            seen.add(model.name)
        return models


def default_model_name(ref: str) -> str:
    """`zoo:lvlm-llava` -> `lvlm-llava`, `llava-hf/llava-v1.6-mistral-7b-hf` -> `llava-v1.6-mistral-7b-hf`,
    `/models/my-lvlm/` -> `my-lvlm`."""
    return ref.rstrip("/").rsplit("/", 1)[-1].removeprefix("zoo:")


def response_seed(base_seed: int, row_seed: int, sample: int) -> int:
    """Sampling seed of answer `sample` to a row: reproducible from the row alone, distinct per sample."""
    digest = hashlib.sha256(f"{base_seed}:{row_seed}:{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def sampling_params(model: ResponseModelConfig, row_seed: int | None, run_seed: int) -> list[dict[str, Any]]:
    """vLLM sampling params of each of the model's answers to a row (seeded unless greedy)."""
    base = {"max_tokens": model.max_tokens, "temperature": model.temperature, "top_p": model.top_p}
    if model.temperature == 0 or row_seed is None:
        return [dict(base) for _ in range(model.samples)]
    base_seed = run_seed if model.seed is None else model.seed
    return [{**base, "seed": response_seed(base_seed, int(row_seed), j)} for j in range(model.samples)]


def add_responses(ds, cfg: ResponsesConfig, *, run_seed: int):
    """`ds` with a `responses` column: every model's answers to each ok row, in `cfg.models` order."""
    for index in range(len(cfg.models)):
        ds = add_model_responses(ds, cfg, index, run_seed=run_seed)
    return ds


def add_model_responses(ds, cfg: ResponsesConfig, index: int, *, run_seed: int):
    """`ds` with the answers of `cfg.models[index]` appended to each ok row's `responses`: the first model
    adds the column ([] where a row is not ok), each later one appends to what the rows carry."""
    new_fields = [RESPONSES_FIELD] if index == 0 else []  # later models get `responses` as an input column
    ds = carry.record_input_schema(ds, new_fields)
    ds = _answer_with(ds, cfg.models[index], continue_on_error=cfg.continue_on_error, run_seed=run_seed)
    return carry.restore_input_types(ds, new_fields, defaults={"responses": []})


def _answer_with(ds, model: ResponseModelConfig, *, continue_on_error: bool, run_seed: int):
    """One ray.data.llm processor: appends `model`'s answers to each ok row's `responses`."""

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != STATUS_OK:
            return {carry.INFERENCE_ERROR: carry.SKIPPED}
        try:
            if row.get("image") is None:
                raise ValueError("the row has no image")
            request = image_chat_request(row["instruction"], row["image"])
        except Exception as error:  # a missing or unreadable image fails this row's answers, not the run
            if not continue_on_error:
                raise
            return {carry.INFERENCE_ERROR: f"{type(error).__name__}: {error}"}
        params = sampling_params(model, row.get("seed"), run_seed)
        # "" (no error) must be explicit: a key missing in some rows of a batch comes back as None,
        # which Ray's stages would take for an error.
        return {**request, "sampling_params": params[0], SAMPLING_PARAMS_LIST: params, carry.INFERENCE_ERROR: ""}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        answers = [
            {"model": model.name, "text": s["text"], "finish_reason": s["finish_reason"], "error": s["error"]}
            for s in row[SAMPLES]
        ]
        return {**carry.input_columns(row), "responses": _responses(row) + answers}

    def finish_row(row: dict[str, Any]) -> dict[str, Any]:
        """After the processor: rows that bypassed postprocess (skipped or failed) are restored here."""
        error = row.get(carry.INFERENCE_ERROR) or ""
        out = {**carry.input_columns(row), "responses": _responses(row)}
        if error and error != carry.SKIPPED:
            out["responses"] += [_error_answer(model.name, error)] * model.samples
        return out

    processor = build_engine_processor(
        model.model,
        preprocess=preprocess,
        postprocess=postprocess,
        pool=model.pool,
        engine_kwargs=model.engine_kwargs,
        continue_on_error=continue_on_error,
        multi_sample=True,
        label=model.name,
    )
    return processor(ds).map(finish_row, num_cpus=LIGHT_STAGE_CPUS)


def _error_answer(model_name: str, error: str) -> dict[str, Any]:
    return {"model": model_name, "text": "", "finish_reason": FINISH_ERROR, "error": error}


def _responses(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The answers of the models before this one (none before the first)."""
    previous = row.get("responses")
    return [] if previous is None else list(previous)
