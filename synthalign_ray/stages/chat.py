"""One chat request per row, answered by a vLLM pool or by an OpenAI-compatible endpoint.

The LLM stages around the LVLM answers (topic prompts, LLM-written instructions, the image-aware judge)
each turn a row into one chat request and the reply into a few columns. `add_chat_stage` runs that over
a Ray Dataset with either backend, chosen per stage in the config (`ChatModelConfig.backend`):

- `vllm`: Ray's `ray.data.llm` processor (`vllm_engine.build_engine_processor`), whole rows carried
  through it with their types (`engines/carry.py`). Text-only models and VLMs alike: a request with an image
  sends it as `multimodal_data`.
- `openai`: any OpenAI-compatible chat endpoint (OpenAI, a `vllm serve` of your own, a gateway), through
  the `openai` client in an autoscaling pool of light actors; each actor sends its batch's requests
  concurrently. The key is read from the environment variable named by `api_key_env`, in the actor,
  and never stored in a config, manifest or log. Ray's own `HttpRequestProcessorConfig` is not used
  because a request that still fails after its retries raises out of the whole batch (and then fails
  the job); here such a row is recorded as failed with the endpoint's error and the run goes on.

Both backends give the same row semantics: a row whose status is not ok passes untouched (output
columns null); a request that fails, or an `output` function that raises on the reply, marks the row
failed with the error and the stage name (like every `RowStage`).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray.engines import carry
from synthalign_ray.engines.vllm_engine import (
    LIGHT_STAGE_CPUS,
    VLLMPoolConfig,
    build_engine_processor,
    finish_reason,
    labelled,
)
from synthalign_ray.base import SEED_MODULUS, STATUS_FAILED, STATUS_OK, StrictModel, check_model_ref, injected_faults
from synthalign_ray.hf_image import decode_image
from synthalign_ray.stages.common import RowStage

FINISH_ERROR = "error"


class ChatModelConfig(StrictModel):
    """The model behind one LLM stage: a vLLM engine pool, or an OpenAI-compatible endpoint."""

    backend: Literal["vllm", "openai"] = "vllm"
    model: str = Field(
        description="vllm: zoo:NAME, a local folder or a hub id (org/name[@REVISION]); openai: the model name the endpoint serves"
    )
    base_url: str | None = Field(None, description="openai: the endpoint's base URL, e.g. http://localhost:8000/v1")
    api_key_env: str | None = Field(
        None, description="openai: name of the environment variable holding the API key (None: no key)"
    )
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, description="base of the per-row sampling seeds; None: the run seed")
    pool: VLLMPoolConfig = Field(
        default_factory=VLLMPoolConfig,
        description="vllm: engine replicas and devices; openai: client actors, batch_size = requests in flight per actor",
    )
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="vllm: extra vllm.AsyncEngineArgs")
    max_retries: int = Field(3, ge=0, description="openai: retries of a failed request (with backoff) before the row fails")
    timeout_s: float = Field(120.0, gt=0, description="openai: seconds per request")

    @model_validator(mode="after")
    def _backend_settings(self):
        if self.backend == "vllm":
            check_model_ref(self.model)
            stray = [name for name in ("base_url", "api_key_env") if getattr(self, name) is not None]
            if stray:
                raise ValueError(f"{', '.join(stray)} only apply to backend=openai")
        else:
            if not self.base_url:
                raise ValueError("backend=openai needs base_url (e.g. http://localhost:8000/v1)")
            if self.engine_kwargs:
                raise ValueError("engine_kwargs only apply to backend=vllm")
            if self.pool.num_gpus:
                raise ValueError("pool.num_gpus: an endpoint client needs no GPU")
        return self

    def check_environment(self, field: str) -> None:
        """Fail before anything starts when the API key variable is not set (the key itself is never read here)."""
        if self.api_key_env is not None and not os.environ.get(self.api_key_env):
            raise ValueError(f"{field}.api_key_env: environment variable {self.api_key_env} is not set")


@dataclass(frozen=True)
class ChatRequest:
    """One chat request. `messages` are OpenAI-style; a content part `{"type": "image"}` stands for
    `image` (an HF datasets Image struct {bytes, path})."""

    messages: list[dict[str, Any]]
    image: Mapping[str, Any] | None = None
    seed: int | None = None  # the row's own seed, for reproducible sampling


@dataclass(frozen=True)
class ChatReply:
    text: str
    finish_reason: str  # "stop" | "length"


RequestFn = Callable[[dict[str, Any]], ChatRequest]
OutputFn = Callable[[dict[str, Any], ChatReply], dict[str, Any]]


def user_message(text: str, with_image: bool = False) -> dict[str, Any]:
    """A user message; text-only content stays a plain string, which every chat template accepts
    (Llama-3's trims `content` as a string)."""
    if not with_image:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}


def sampling_seed(base_seed: int, row_seed: int | None, stage: str) -> int | None:
    """A row's sampling seed in a stage: reproducible from the row, distinct across stages."""
    if row_seed is None:
        return None
    digest = hashlib.sha256(f"{stage}:{base_seed}:{row_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_MODULUS


def add_chat_stage(
    ds,
    cfg: ChatModelConfig,
    *,
    stage: str,
    request: RequestFn,
    output: OutputFn,
    output_fields: Sequence[pa.Field],
    run_seed: int,
    images: bool = False,
):
    """`ds` with `output_fields` added to each ok row from one chat request per row.

    `images`: requests may carry an image (the model must be a VLM); False for a text-only model.

    `request(row)` builds the request; `output(row, reply)` turns the reply into the values of
    `output_fields`. Either raising fails that row (status failed, `error`, `failed_stage = stage`).
    """
    job = _ChatJob(cfg, stage, request, output, list(output_fields), cfg.seed if cfg.seed is not None else run_seed, images)
    if cfg.backend == "openai":
        from ray.data import ActorPoolStrategy

        return ds.map_batches(
            labelled(EndpointChatStage, stage),
            fn_constructor_kwargs={"job": job},
            compute=ActorPoolStrategy(min_size=cfg.pool.min_actors, max_size=cfg.pool.max_actors),
            num_cpus=LIGHT_STAGE_CPUS,
            batch_size=cfg.pool.batch_size,
            batch_format="pyarrow",
            zero_copy_batch=True,
        )
    return _vllm_chat_stage(ds, job)


@dataclass(frozen=True)
class _ChatJob:
    cfg: ChatModelConfig
    stage: str
    request: RequestFn
    output: OutputFn
    output_fields: list[pa.Field]
    base_seed: int
    images: bool

    def build_request(self, row: dict[str, Any]) -> ChatRequest:
        if row["id"] in injected_faults(self.stage):
            raise RuntimeError(f"injected fault in {self.stage} for {row['id']}")
        request = self.request(row)
        if request.image is not None and not self.images:
            raise ValueError(f"{self.stage}: the request carries an image but the stage's model takes text only")
        return request

    def sampling_params(self, request: ChatRequest) -> dict[str, Any]:
        params = {"max_tokens": self.cfg.max_tokens, "temperature": self.cfg.temperature, "top_p": self.cfg.top_p}
        seed = sampling_seed(self.base_seed, request.seed, self.stage)
        if self.cfg.temperature > 0 and seed is not None:
            params["seed"] = seed
        return params

    def nulls(self) -> dict[str, Any]:
        return {field.name: None for field in self.output_fields}


def _vllm_chat_stage(ds, job: _ChatJob):
    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        if row["status"] != STATUS_OK:
            return {carry.INFERENCE_ERROR: carry.SKIPPED}
        try:
            request = job.build_request(row)
            engine_request = {"messages": request.messages, "sampling_params": job.sampling_params(request)}
            if request.image is not None:
                engine_request["multimodal_data"] = {"image": decode_image(request.image)}
        except Exception as error:  # this row fails, not the run
            return {carry.INFERENCE_ERROR: f"{type(error).__name__}: {error}"}
        # "" (no error) must be explicit: a key missing in some rows of a batch comes back as None.
        return {**engine_request, carry.INFERENCE_ERROR: ""}

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        reply = ChatReply(row["generated_text"], finish_reason(row["num_generated_tokens"], job.cfg.max_tokens))
        try:
            values = job.output(row, reply)
        except Exception as error:
            return {**carry.input_columns(row), **_failed(job, f"{type(error).__name__}: {error}")}
        return {**carry.input_columns(row), **values}

    def finish_row(row: dict[str, Any]) -> dict[str, Any]:
        """Rows that bypassed postprocess (skipped, or failed before or in the engine) are restored here."""
        error = row.get(carry.INFERENCE_ERROR) or ""
        if not error:
            return row
        if error == carry.SKIPPED:
            return {**carry.input_columns(row), **job.nulls()}
        return {**carry.input_columns(row), **_failed(job, error)}

    ds = carry.record_input_schema(ds, job.output_fields)
    processor = build_engine_processor(
        job.cfg.model,
        preprocess=preprocess,
        postprocess=postprocess,
        pool=job.cfg.pool,
        images_per_prompt=int(job.images),
        engine_kwargs=job.cfg.engine_kwargs,
        continue_on_error=True,
        label=job.stage,
    )
    ds = processor(ds).map(finish_row, num_cpus=LIGHT_STAGE_CPUS)
    return carry.restore_input_types(ds, job.output_fields)


def _failed(job: _ChatJob, error: str) -> dict[str, Any]:
    return {**job.nulls(), "status": STATUS_FAILED, "error": error, "failed_stage": job.stage}


class EndpointChatStage(RowStage):
    """The `openai` backend: one actor of the client pool."""

    def __init__(self, job: _ChatJob):
        from openai import OpenAI

        super().__init__(max_batch_retries=0)  # the client retries each request itself
        self.job, self.name, self.output_fields = job, job.stage, job.output_fields
        cfg = job.cfg
        api_key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else "not-needed"
        if not api_key:
            raise RuntimeError(f"environment variable {cfg.api_key_env} is not set on this Ray worker")
        self.client = OpenAI(base_url=cfg.base_url, api_key=api_key, max_retries=cfg.max_retries, timeout=cfg.timeout_s)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=min(len(rows), self.job.cfg.pool.batch_size) or 1) as threads:
            return list(threads.map(self._one, rows))

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            request = self.job.build_request(row)
            completion = self.client.chat.completions.create(
                model=self.job.cfg.model, messages=openai_messages(request), **self.job.sampling_params(request)
            )
            choice = completion.choices[0]
            return self.job.output(row, ChatReply(choice.message.content or "", choice.finish_reason or "stop"))
        except Exception as error:
            return self.fail(f"{type(error).__name__}: {error}", self.job.nulls())


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The request in the OpenAI wire format: the image placeholder becomes a PNG data URL."""
    url = None
    if request.image is not None:
        buffer = io.BytesIO()
        decode_image(request.image).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    def part(p: dict[str, Any]) -> dict[str, Any]:
        if p.get("type") != "image":
            return p
        if url is None:
            raise ValueError("the request has an image placeholder but no image")
        return {"type": "image_url", "image_url": {"url": url}}

    return [
        {**message, "content": [part(p) for p in message["content"]]} if isinstance(message["content"], list) else message
        for message in request.messages
    ]
