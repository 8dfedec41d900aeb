"""vLLM behind Ray Data: a `ray.data.llm` processor that answers a text prompt about an image.

    processor = build_vision_language_processor("zoo:lvlm-llava", max_tokens=32)  # or a local/hub model
    answers = processor(ds)  # ds rows: {"id", "image": {"bytes", "path"}, "instruction"}
    # -> rows: {"id", "text", "finish_reason", "token_ids"}

Everything model-facing is Ray's own `ray.data.llm` (Ray 2.60): its chat-template stage renders the
model's chat template from OpenAI-style messages (an image placeholder plus the prompt), and its vLLM
stage runs the engine in an autoscaling actor pool. This module only adds what a Ray Dataset of images
needs around it:

- decoding the HF datasets Image struct (`{"bytes": PNG, "path": ...}`) to a PIL image that goes to vLLM
  as `multimodal_data`. Ray's own multimodal prepare stage is left off: it imports
  `vllm.entrypoints.chat_utils`, which vLLM 0.32 moved.
- a `finish_reason` column ("stop" or "length"), which Ray's vLLM stage does not return (see
  `_finish_reason`).
- CPU defaults: without a GPU in the cluster the engine actor asks for one CPU instead of one GPU (Ray's
  default bundle waits forever for a GPU), runs eagerly (no torch.compile on CPU) and gets a fixed KV
  cache size (`VLLM_CPU_KVCACHE_SPACE`, GiB).

Tokenization and detokenization run inside the vLLM engine (Ray's separate tokenize/detokenize stages are
off): vLLM must see the image placeholder of each prompt to expand it into image tokens anyway, and two
fewer actor pools fit small machines.

Scripts that run this on CPU need an `if __name__ == "__main__":` guard: vLLM's engine starts its core in
a spawned process that re-imports the main module.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from synthalign_ray import zoo
from synthalign_ray.store import decode_image

# GiB of KV cache per CPU engine when neither the caller's runtime_env nor the driver's environment sets
# VLLM_CPU_KVCACHE_SPACE: plenty for tiny models, and small enough that several engines share a node.
DEFAULT_CPU_KVCACHE_GIB = "1"
# CPUs reserved by each light worker (pre/postprocess tasks, the chat-template actor). Ray Data's default
# of one CPU each deadlocks a 2-CPU node: the engine and chat-template actors hold both CPUs for the
# whole run and the postprocess tasks never start.
LIGHT_STAGE_CPUS = 0.25


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
        model: a local model folder, a hub id, or `zoo:NAME`.
        prompt_column / image_column: input columns; the image is an HF datasets Image struct
            (`{"bytes": ..., "path": ...}`, bytes preferred, path read when bytes are missing).
        carry_columns: input columns copied to the output rows (e.g. the row id).
        max_tokens, temperature, top_p, seed: vLLM sampling parameters, the same for every row;
            `seed` makes sampled (temperature > 0) answers reproducible.
        batch_size: rows per batch sent to an engine; concurrency: engine replicas (int or (min, max)).
        use_gpu: one GPU per engine; None means "if the Ray cluster has GPUs". Without, one CPU each.
        engine_kwargs: extra `vllm.AsyncEngineArgs` (dtype, max_model_len, ...) over the defaults.
        runtime_env: Ray runtime env of the processor's actors (e.g. `env_vars`).

    Returns a Processor whose output rows hold `carry_columns`, `text`, `finish_reason` and `token_ids`
    (the generated ids: exact where `text` depends on detokenization, e.g. partial UTF-8 at the end).
    """
    import ray
    from ray.data.llm import vLLMEngineProcessorConfig, build_processor

    if use_gpu is None:
        # Connects to the job's cluster (or starts a local one) to read its resources; build_processor
        # would init Ray anyway.
        ray.init(ignore_reinit_error=True)
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0

    engine = {"limit_mm_per_prompt": {"image": 1}}
    env = dict((runtime_env or {}).get("env_vars", {}))
    placement_group_config = None
    if not use_gpu:
        engine["enforce_eager"] = True
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB))
        placement_group_config = {"bundles": [{"CPU": 1}]}
    engine.update(engine_kwargs or {})

    config = vLLMEngineProcessorConfig(
        model_source=zoo.resolve(model),
        engine_kwargs=engine,
        batch_size=batch_size,
        concurrency=concurrency,
        runtime_env={**(runtime_env or {}), "env_vars": env},
        placement_group_config=placement_group_config,
        # True needs ray[serve] and a metrics port; batch jobs read Ray Data's own stats instead.
        log_engine_metrics=False,
        prepare_multimodal_stage=False,
        chat_template_stage={"num_cpus": LIGHT_STAGE_CPUS},
        tokenize_stage=False,
        detokenize_stage=False,
    )
    sampling_params = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
    if seed is not None:
        sampling_params["seed"] = seed

    def preprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **{name: row[name] for name in carry_columns},
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "image"}, {"type": "text", "text": row[prompt_column]}],
                }
            ],
            "multimodal_data": {"image": decode_image(row[image_column])},
            "sampling_params": sampling_params,
        }

    def postprocess(row: dict[str, Any]) -> dict[str, Any]:
        return {
            **{name: row[name] for name in carry_columns},
            "text": row["generated_text"],
            "finish_reason": _finish_reason(row["num_generated_tokens"], max_tokens),
            "token_ids": [int(token) for token in row["generated_tokens"]],
        }

    return build_processor(
        config,
        preprocess=preprocess,
        postprocess=postprocess,
        preprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
        postprocess_map_kwargs={"num_cpus": LIGHT_STAGE_CPUS},
    )


def _finish_reason(num_generated_tokens: int, max_tokens: int) -> str:
    """OpenAI/vLLM finish reason from the token count, as Ray's vLLM stage drops vLLM's own.

    "length" when the answer used all `max_tokens`, else "stop" (EOS, a stop token or string). One
    ambiguity: an answer whose EOS is exactly its max_tokens-th token counts as "length".
    """
    return "length" if num_generated_tokens >= max_tokens else "stop"
