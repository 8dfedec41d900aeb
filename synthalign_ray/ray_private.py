"""Every use of Ray's private API in synthalign-ray, in one module. Written against Ray 2.60.0.

Everywhere else the project uses public Ray only (`ray.data`, `ray.data.llm`, `ray.train`,
`ray.job_submission`). What those do not offer is reached here, each use with a contract test in
`tests/unit/test_ray_private.py` that fails when a Ray release changes what the use relies on. On a Ray
upgrade, run those tests first, then mend this module.

The private uses:
1. `submitted_job_env_vars`: the job config `ray job submit` hands its driver (`ray._private`).
2. `set_current_data_context`: a wave process takes the driver's Ray Data settings (`DataContext._set_current`).
3. `set_processor_stage_udf`: a `ray.data.llm` processor's stage gets another UDF (its `stages` dict).
4. `vllm_engine_udf` / `multi_sample_vllm_engine_udf`: subclasses of Ray's vLLM stage UDF
   (`ray.llm._internal`) that override `_generate_with_error_handling` and `udf`.
   `pinned_chat_template_udf`: a subclass of Ray's chat-template stage UDF that loads a pinned hub model's
   processor files (`org/name@REV`) at that revision.
5. `object_store_bytes_used`: the object store's bytes in use, for the pipeline benchmark (`ray._private`).
6. `RELAY_PREFIX`: the prefix Ray's driver prints before each line it relays from a worker
   (`ray._private.worker.print_worker_logs`), which the console sorts its output by.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

WRITTEN_AGAINST_RAY = "2.60.0"

# The prefix of a relayed worker line, colored or not, with the task or actor name as `source`:
# `(drive_wave pid=12)`, `(MapWorker(MapBatches(ImageGenerator)) pid=12, ip=10.0.0.2)`, `(pid=12)`,
# `(raylet)`, `(autoscaler +1s)`.
RELAY_PREFIX = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:(?P<source>.*?) )?(?:pid=[^)]*|raylet|autoscaler \+[^)]*)\)(?:\x1b\[[0-9;]*m)? ")

# Row keys that make up one vLLM engine request: those Ray's `vLLMEngineWrapper._prepare_llm_request`
# pops from a row.
VLLM_REQUEST_KEYS = (
    "prompt",
    "tokenized_prompt",
    "multimodal_data",
    "mm_processor_kwargs",
    "multimodal_uuids",
    "tokenization_kwargs",
    "sampling_params",
    "pooling_params",
)


def submitted_job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env `ray job submit` gave this driver (none outside a submitted job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job_config = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR, "{}"))
    return (job_config.get("runtime_env") or {}).get("env_vars") or {}


def set_current_data_context(context) -> None:
    """Make `context` (a `ray.data.DataContext` from another process) this process's current one."""
    import ray

    ray.data.DataContext._set_current(context)


def set_processor_stage_udf(processor, name: str, udf: type) -> None:
    """Give the `ray.data.llm` processor's stage `name` the UDF class `udf`.

    model_copy, not assignment: assigning a field re-runs the stage's validator, which then no longer sees
    the placement group (popped on the first run) and asks for a GPU.
    """
    stage = processor.get_stage_by_name(name)
    processor.stages[name] = stage.model_copy(update={"fn": udf})


@functools.cache
def vllm_engine_udf(prompt_token_ids: Callable[[str, Any], list[int] | None]) -> type:
    """Ray's vLLM stage UDF, sending a prompt as the token ids `prompt_token_ids(prompt, tokenizer)` gives
    where they are not None; everything else is Ray's. Built on first use: importing Ray's stage module
    imports torch and vLLM's helpers."""
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    class EngineUDF(vLLMEngineStageUDF):
        async def _generate_with_error_handling(self, row: dict[str, Any], batch_uuid):
            if row.get("prompt") and row.get("tokenized_prompt") is None:
                ids = prompt_token_ids(row["prompt"], self.llm.engine.get_tokenizer())
                if ids is not None:
                    # In place: Ray's request builder pops the request keys (the image too) from this row.
                    row["tokenized_prompt"] = ids
            return await super()._generate_with_error_handling(row, batch_uuid)

    return EngineUDF


@functools.cache
def pinned_chat_template_udf() -> type:
    """Ray's chat-template stage UDF for a hub model pinned as `org/name@REV` (the stage's `model`): the
    files of that revision but its weights are downloaded on the actor's node, and Ray's UDF loads the
    processor from that folder. Ray's own passes the model to `AutoProcessor.from_pretrained` with no
    revision, so it would render prompts with the default branch's chat template."""
    from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF

    from synthalign_ray.base import resolve_model_path

    class PinnedChatTemplateUDF(ChatTemplateUDF):
        def __init__(self, data_column: str, expected_input_keys: list[str], model: str, *args, **kwargs):
            super().__init__(data_column, expected_input_keys, resolve_model_path(model, weights=False), *args, **kwargs)

    return PinnedChatTemplateUDF


@functools.cache
def multi_sample_vllm_engine_udf(
    prompt_token_ids: Callable[[str, Any], list[int] | None],
    params_list_column: str,
    samples_column: str,
    sample: Callable[[Mapping[str, Any], int], dict[str, Any]],
) -> type:
    """`vllm_engine_udf`, answering each row once per entry of its `params_list_column` (a row without one:
    once, with its `sampling_params`) and returning `sample(output, max_tokens)` of each answer, in order,
    as the row's `samples_column`.

    Each request goes through the parent's `_generate_with_error_handling`, so engine errors, fatal-error
    restarts and `should_continue_on_error` behave exactly as in Ray's stage; only the fan-out is added here.
    """
    import asyncio
    import uuid

    from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list

    class MultiSampleEngineUDF(vllm_engine_udf(prompt_token_ids)):
        async def udf(self, batch: list[dict[str, Any]]):
            batch_uuid = uuid.uuid4()
            tasks = [asyncio.create_task(self._answer_row(row, batch_uuid)) for row in batch]
            for done in asyncio.as_completed(tasks):
                yield await done

        async def _answer_row(self, row: dict[str, Any], batch_uuid) -> dict[str, Any]:
            idx = row[self.IDX_IN_BATCH_COLUMN]
            # Popped so they do not travel on in the row (the image above all); the parent pops them too.
            request = {key: row.pop(key) for key in VLLM_REQUEST_KEYS if key in row}
            params_list = row.pop(params_list_column, None)
            params_list = [request["sampling_params"]] if params_list is None else list(params_list)
            params_list = [maybe_convert_ndarray_to_list(dict(params)) for params in params_list]
            outputs = await asyncio.gather(
                *(
                    self._generate_with_error_handling(
                        {**request, "sampling_params": dict(params), self.IDX_IN_BATCH_COLUMN: idx}, batch_uuid
                    )
                    for params in params_list
                )
            )
            return {
                self.IDX_IN_BATCH_COLUMN: idx,
                samples_column: [sample(output, params["max_tokens"]) for output, params in zip(outputs, params_list)],
            }

    return MultiSampleEngineUDF


def object_store_bytes_used(gcs_address: str, state=None):
    """(bytes in use in the cluster's object store, the GCS state to pass back in on the next call)."""
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = state or get_state_from_address(gcs_address)
    return get_memory_info_reply(state).store_stats.object_store_bytes_used, state
