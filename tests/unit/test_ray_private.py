"""Contract tests of `synthalign_ray.ray_private`, one per use of Ray's private API: each fails when a Ray
release changes what the use relies on. The processor is built exactly as a run builds it (Ray's
`build_processor`, through `build_engine_processor`); no engine starts."""

import ast
import copy
import inspect
import json
import textwrap

import numpy as np
import pytest
import ray

from synthalign_ray import ray_private
from synthalign_ray.engines import vllm_engine


def test_written_against_the_installed_ray():
    assert ray.__version__ == ray_private.WRITTEN_AGAINST_RAY, "Ray changed: run this file, mend ray_private.py"


@pytest.mark.parametrize(
    "source, fields",
    [
        ("drive_wave", {"task_name": "drive_wave"}),
        ("MapWorker(MapBatches(MultiSampleEngineUDF[llava-1.5]))", {"actor_name": "MapWorker(MapBatches(MultiSampleEngineUDF[llava-1.5]))", "ip": "10.0.0.2"}),
        (None, {}),
        (None, {"pid": "raylet"}),
    ],
)
@pytest.mark.parametrize("color", ["1", "0"])
def test_relay_prefix_matches_what_rays_driver_prints_before_a_worker_line(monkeypatch, source, fields, color):
    from io import StringIO

    from ray._private.worker import print_worker_logs

    monkeypatch.setenv("RAY_COLOR_PREFIX", color)
    printed = StringIO()
    print_worker_logs({"pid": 4242, "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["a line (with pid=3)"], **fields}, printed)
    match = ray_private.RELAY_PREFIX.match(printed.getvalue())
    assert match and match["source"] == source, printed.getvalue()
    assert printed.getvalue()[match.end() :] == "a line (with pid=3)\n"
    assert not ray_private.RELAY_PREFIX.match("a line of this tool (pid=3)")


def test_submitted_job_env_vars_reads_the_job_config_ray_job_submit_sets(monkeypatch):
    # The variable the job supervisor sets in a submitted driver's environment.
    monkeypatch.setenv(
        "RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"SYNTHALIGN_ZOO": "/zoo"}}})
    )
    assert ray_private.submitted_job_env_vars() == {"SYNTHALIGN_ZOO": "/zoo"}
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert ray_private.submitted_job_env_vars() == {}


def test_set_current_data_context_makes_it_current():
    previous = ray.data.DataContext.get_current()
    context = copy.deepcopy(previous)
    context.target_max_block_size = previous.target_max_block_size + 1
    try:
        ray_private.set_current_data_context(context)
        assert ray.data.DataContext.get_current() is context
    finally:
        ray_private.set_current_data_context(previous)


def test_vllm_request_keys_are_those_ray_pops_into_a_request():
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineWrapper

    tree = ast.parse(textwrap.dedent(inspect.getsource(vLLMEngineWrapper._prepare_llm_request)))
    popped = {
        node.args[0].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "pop"
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "row"
    }
    assert popped == set(ray_private.VLLM_REQUEST_KEYS)


def test_vllm_stage_udf_hooks_keep_their_shape():
    from ray.llm._internal.batch.stages.common import maybe_convert_ndarray_to_list
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF, vLLMEngineWrapper

    generate = vLLMEngineStageUDF._generate_with_error_handling
    assert inspect.iscoroutinefunction(generate)
    assert list(inspect.signature(generate).parameters) == ["self", "row", "batch_uuid"]
    assert inspect.isasyncgenfunction(vLLMEngineStageUDF.udf)
    assert list(inspect.signature(vLLMEngineStageUDF.udf).parameters) == ["self", "batch"]
    assert isinstance(vLLMEngineStageUDF.IDX_IN_BATCH_COLUMN, str)
    # The UDF reaches the tokenizer as self.llm.engine.get_tokenizer(): its engine wrapper and vLLM's engine.
    assert "self.llm = vLLMEngineWrapper(" in inspect.getsource(vLLMEngineStageUDF.__init__)
    assert "self.engine = " in inspect.getsource(vLLMEngineWrapper.__init__)
    assert maybe_convert_ndarray_to_list({"stop": np.array(["a", "b"])}) == {"stop": ["a", "b"]}


@pytest.fixture(scope="module")
def processor():
    """A multi-sample, labelled vLLM processor as the responses stage builds it (build_processor starts a
    local Ray)."""
    yield vllm_engine.build_engine_processor(
        "/nonexistent-model",
        preprocess=lambda row: row,
        postprocess=lambda row: row,
        pool=vllm_engine.VLLMPoolConfig(num_gpus=0),
        multi_sample=True,
        label="llava",
    )
    ray.shutdown()


def test_set_processor_stage_udf_swaps_the_udf_and_keeps_the_stage(processor):
    from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMEngineStageUDF

    names = processor.list_stage_names()
    engine_name = next(name for name in names if name.startswith("vLLMEngineStage"))
    engine = processor.get_stage_by_name(engine_name)
    assert issubclass(engine.fn, vLLMEngineStageUDF)
    assert [processor.get_stage_by_name(name).fn.__name__ for name in names][-1] == "MultiSampleEngineUDF[llava]"
    # What Ray's validator computed for the stage from the CPU placement group: a CPU actor, no GPU.
    assert engine.map_batches_kwargs["num_cpus"] == 1 and "num_gpus" not in engine.map_batches_kwargs
    before = processor.get_stage_by_name(engine_name)
    ray_private.set_processor_stage_udf(processor, engine_name, vllm_engine.labelled(before.fn, "again"))
    after = processor.get_stage_by_name(engine_name)
    assert after.fn.__name__ == "MultiSampleEngineUDF[llava][again]"
    assert after.map_batches_kwargs == before.map_batches_kwargs
    assert processor.list_stage_names() == names


def test_object_store_bytes_used_counts_a_put_object(processor):
    gcs = ray.get_runtime_context().gcs_address
    before, state = ray_private.object_store_bytes_used(gcs)
    ref = ray.put(np.zeros(4 * 2**20, dtype=np.uint8))  # 4 MiB: over the inline limit, so in the store
    used, _ = ray_private.object_store_bytes_used(gcs, state)
    assert used - before >= 4 * 2**20
    del ref


def test_private_ray_is_reached_from_ray_private_only():
    """No other module of the package or the benchmarks imports Ray's private modules or calls a private
    Ray attribute (`ray.<...>._name`)."""
    from tests.conftest import REPO

    private_modules = ("ray._private", "ray.llm._internal", "ray.data._internal", "ray._raylet")
    offenders = []
    for path in [*(REPO / "synthalign_ray").rglob("*.py"), *(REPO / "benchmarks").rglob("*.py"), *(REPO / "jobs").rglob("*.py")]:
        if path == REPO / "synthalign_ray" / "ray_private.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                chain, value = [node.attr], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id == "ray":
                    names = [".".join(["ray", *reversed(chain)])]
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {name}" for name in names
                          if name.startswith(private_modules) or (name.startswith("ray.") and "._" in name)]
    assert offenders == []


def test_pinned_chat_template_udf_hands_rays_udf_the_revisions_folder(tmp_path):
    """The subclass keeps Ray's constructor (data column, input keys, model, ...) and Ray's UDF loads the
    processor from the folder `resolve_model_path(model, weights=False)` gives: here a local one."""
    from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateStage, ChatTemplateUDF
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    assert list(inspect.signature(ChatTemplateUDF.__init__).parameters)[:4] == ["self", "data_column", "expected_input_keys", "model"]
    assert ChatTemplateStage.model_fields["fn"].default is ChatTemplateUDF
    pinned = ray_private.pinned_chat_template_udf()
    assert issubclass(pinned, ChatTemplateUDF)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", chat_template=template).save_pretrained(tmp_path)
    udf = pinned("__data", ["messages"], str(tmp_path))
    assert udf.processor.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<hi>"


def test_a_pinned_hub_model_reaches_vllm_as_repo_id_and_revision(processor, monkeypatch):
    """`org/name@v1`: Ray's processor gets the repo id, vLLM's engine args the revision (weights,
    tokenizer, remote code), and the chat-template stage the pinned reference and the pinned UDF. Ray's
    driver reads the model's config for its telemetry (non-fatal): offline, so that it asks no hub."""
    from ray.llm._internal.batch.stages.chat_template_stage import ChatTemplateUDF

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    pinned = vllm_engine.build_engine_processor(
        "org/public-model@v1",
        preprocess=lambda row: row,
        postprocess=lambda row: row,
        pool=vllm_engine.VLLMPoolConfig(num_gpus=0),
        label="pinned",
    )
    stages = {name.split("_")[0]: pinned.get_stage_by_name(name) for name in pinned.list_stage_names()}
    engine, chat = stages["vLLMEngineStage"], stages["ChatTemplateStage"]
    assert engine.fn_constructor_kwargs["model"] == "org/public-model"
    assert {key: engine.fn_constructor_kwargs["engine_kwargs"][key] for key in ("revision", "tokenizer_revision", "code_revision")} == {
        "revision": "v1", "tokenizer_revision": "v1", "code_revision": "v1"
    }
    assert chat.fn_constructor_kwargs["model"] == "org/public-model@v1"
    assert issubclass(chat.fn, ray_private.pinned_chat_template_udf()) and chat.fn.__name__ == "PinnedChatTemplateUDF[pinned]"

    # Unpinned (the fixture's processor): Ray's own chat-template UDF, no revision for vLLM.
    names = processor.list_stage_names()
    unpinned = {name.split("_")[0]: processor.get_stage_by_name(name) for name in names}
    assert "revision" not in unpinned["vLLMEngineStage"].fn_constructor_kwargs["engine_kwargs"]
    assert not issubclass(unpinned["ChatTemplateStage"].fn, ray_private.pinned_chat_template_udf())
    assert issubclass(unpinned["ChatTemplateStage"].fn, ChatTemplateUDF)

    with pytest.raises(ValueError, match=r"engine_kwargs.revision \('v2'\) differs from the model's @v1"):
        vllm_engine.build_engine_processor(
            "org/public-model@v1", preprocess=lambda row: row, postprocess=lambda row: row,
            pool=vllm_engine.VLLMPoolConfig(num_gpus=0), engine_kwargs={"revision": "v2"},
        )  # fmt: skip
