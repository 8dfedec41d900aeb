"""One stage list (`stages.graph.build`): the method's stages in order, their names and declared columns, and
the runners that derive from it (the pipeline, simulate, plan's GPU pools) seeing exactly those stages."""

import dataclasses

import pytest

from synthalign_ray import pipeline
from synthalign_ray.capacity import simulate
from synthalign_ray.capacity.plan import gpu_pools
from synthalign_ray.config import load_config
from synthalign_ray.stages import graph
from tests.conftest import REPO

CONFIGS = ["tiny.yaml", "paper.yaml", "paper_tiny.yaml"]


def config(name, *overrides):
    return load_config(REPO / "configs" / name, list(overrides))


def test_the_tiny_config_names_the_methods_stages():
    assert [stage.name for stage in graph.build(config("tiny.yaml"))] == [
        "images", "image_scores", "select_image", "instructions",
        "responses[llava-1.5]", "responses[llava-next]", "response_scores", "pairs",
    ]


def test_the_paper_twin_config_has_the_paper_configs_stages():
    paper, twin = (graph.build(config(name)) for name in ("paper.yaml", "paper_tiny.yaml"))
    assert [(s.name, s.kind, s.reads, s.writes, s.pool_path) for s in paper] == [
        (s.name, s.kind, s.reads, s.writes, s.pool_path) for s in twin
    ]
    assert [s.name for s in paper][4:7] == [
        "responses[llava-v1.6-mistral-7b]", "responses[llava-v1.6-vicuna-13b]", "responses[llava-v1.6-vicuna-7b]",
    ]


def test_optional_stages_and_kinds_follow_the_config():
    stages = {s.name: s for s in graph.build(config("tiny.yaml", "judge={model: {model: zoo:lvlm-llava}}", "pairs.rank_by=mix"))}
    assert list(stages)[-2:] == ["judge", "pairs"]
    assert stages["judge"].kind == "chat" and stages["judge"].profile_name == "judge"
    assert {"response_scores", "judge_scores"} <= set(stages["pairs"].reads)
    llm = graph.build(config("tiny.yaml", "instructions={source: llm, llm: {model: zoo:chat-llm}}"))
    assert [(s.kind, s.profile_name) for s in llm if s.name == "instructions"] == [("chat", "instructions")]
    endpoint = graph.build(config(
        "tiny.yaml", "instructions={source: llm, llm: {backend: openai, base_url: 'http://localhost:1/v1', model: m}}"
    ))
    assert [(s.kind, s.profile_name) for s in endpoint if s.name == "instructions"] == [("chat", None)]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_column_is_written_once_and_read_after_it_is_written(name):
    """The data contract, stage by stage: no stage writes a column another already wrote (the answerers
    append to `responses`), and each reads only the prompt's columns or columns written before it."""
    written = {"id", "category", "t2i_prompt", "seed", "source_line", "status", "error", "failed_stage", "drop_reason"}
    for stage in graph.build(config(name)):
        assert set(stage.reads) <= written, f"{stage.name} reads {set(stage.reads) - written} before any stage writes it"
        appends = stage.name.startswith("responses[") and "responses" in written
        assert appends or not set(stage.writes) & written, f"{stage.name} writes {set(stage.writes) & written} again"
        written |= set(stage.writes)


@pytest.mark.parametrize("name", CONFIGS)
def test_plan_sizes_the_graphs_gpu_stages(name):
    cfg = config(name)
    assert [(ref.name, ref.path) for ref in gpu_pools(cfg)] == [
        (s.profile_name, s.pool_path) for s in graph.build(cfg) if s.profile_name is not None
    ]


class RecordingDataset:
    """Stands for a Ray Dataset where only the order of what is applied matters."""

    def __init__(self, steps=()):
        self.steps = list(steps)

    def then(self, step):
        return RecordingDataset([*self.steps, step])

    def map_batches(self, fn, **kwargs):
        return self.then(f"simulated:{kwargs['fn_constructor_kwargs']['stage']}")


def recording(stages):
    return [dataclasses.replace(s, apply=lambda ds, name=s.name: ds.then(name)) for s in stages]


@pytest.mark.parametrize("name", CONFIGS)
def test_the_pipeline_and_simulate_apply_the_graph_in_order(name, monkeypatch):
    cfg = config(name)
    stages = graph.build(cfg)
    monkeypatch.setattr(graph, "build", lambda _cfg: recording(stages))
    monkeypatch.setattr(pipeline, "prompt_blocks", lambda prompts: RecordingDataset())
    assert pipeline.build_dataset(cfg, None).steps == [s.name for s in stages]

    pools = [simulate.SimulatedPool(ref.name, "any", 1, 1, 1, 1.0, 1, 1.0) for ref in gpu_pools(cfg)]
    simulated = simulate.build_simulated_dataset(cfg, None, pools=pools, time_scale=1.0, record_dir="unused").steps
    assert simulated == [f"simulated:{s.profile_name}" if s.profile_name else s.name for s in stages]
