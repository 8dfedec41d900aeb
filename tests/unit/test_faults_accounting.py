"""Model-free parts of fault handling: idempotent shard names, rows of lost blocks, pool placement."""


from synthalign_ray import store
from synthalign_ray.ids import IdSet
from synthalign_ray.pipeline import LOST_STAGE, lost_rows
from synthalign_ray.stages.common import ActorPoolConfig
from synthalign_ray.stages.prompts import prompts_table


def prompts(ids):
    return prompts_table([{"id": i, "category": "c", "t2i_prompt": "p", "seed": 0, "source_line": n} for n, i in enumerate(ids)])


def test_shard_name_is_a_function_of_the_rows_ids():
    # A write that Ray runs again (its node died after the move) lands on the same file, not a second one.
    assert store.shard_name(prompts(["a", "b"])) == store.shard_name(prompts(["a", "b"]))
    assert store.shard_name(prompts(["a", "b"])) != store.shard_name(prompts(["a", "c"]))
    assert store.shard_name(prompts(["a"])).startswith("part-") and store.shard_name(prompts(["a"])).endswith(".parquet")


def test_lost_rows_are_the_inputs_with_no_shard_recorded_failed():
    lost = lost_rows(prompts(["a", "b", "c", "d"]), written=IdSet.of(["a", "c", "z"]))
    assert lost.column("id").to_pylist() == ["b", "d"]
    assert set(lost.column("status").to_pylist()) == {"failed"}
    assert set(lost.column("failed_stage").to_pylist()) == {LOST_STAGE}
    assert all(e.startswith("LostBlock") for e in lost.column("error").to_pylist())
    assert lost.schema == prompts(["x"]).schema  # the same columns as any input row
    assert lost_rows(prompts(["a"]), written=IdSet.of(["a"])).num_rows == 0


def test_pool_placement_reaches_ray_data():
    pool = ActorPoolConfig(num_gpus=1, accelerator_type="A100", resources={"diffusion_node": 1})
    kwargs = pool.map_batches_kwargs()
    assert kwargs["accelerator_type"] == "A100" and kwargs["resources"] == {"diffusion_node": 1}
    plain = ActorPoolConfig().map_batches_kwargs()
    assert "accelerator_type" not in plain and "resources" not in plain  # Ray's own defaults
    # Ray Data's own retry policy stays: a replica lost with its node is resubmitted without limit.
    assert "max_task_retries" not in plain and "max_restarts" not in plain


def test_run_resources_reach_ray_data():
    from ray.data import DataContext

    from synthalign_ray.config import ResourcesConfig
    from synthalign_ray.pipeline import configure_data_context

    context = DataContext()
    configure_data_context(context, ResourcesConfig(max_lost_blocks=3, object_store_memory=64 * 2**20))
    assert context.max_errored_blocks == 3
    assert context.execution_options.resource_limits.object_store_memory == 64 * 2**20
    default = DataContext()
    configure_data_context(default, ResourcesConfig())
    assert default.execution_options.resource_limits == DataContext().execution_options.resource_limits  # Ray's own
