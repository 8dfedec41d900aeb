"""The GPU split planner: optimality against brute force, the equal split, the bound, profile errors,
and a planned config that loads back with load_config."""

import itertools
import random

import pytest
import yaml

from synthalign_ray.config import load_config
from synthalign_ray.capacity.plan import (
    ClusterNodes,
    PlanError,
    StageRate,
    best_split,
    equal_split,
    gpu_pools,
    launcher_nodes,
    load_profile,
    make_plan,
    replicas_for_split,
    split_bound,
    split_for_cluster,
    split_gpus,
    unplaced_stage,
    write_planned_config,
)
from tests.conftest import REPO

PAPER = REPO / "configs" / "paper.yaml"
PAPER_PROFILE = REPO / "configs" / "profiles" / "paper_a100.yaml"
TINY = REPO / "configs" / "tiny.yaml"


def brute_force(stages, gpus):
    """(best bound, fewest GPUs reaching it) over every split with n_s >= 1 fitting in `gpus`."""
    ranges = [range(1, int(gpus // s.gpus) + 1) for s in stages]
    best = (-1.0, 0.0)
    for counts in itertools.product(*ranges):
        replicas = {s.name: n for s, n in zip(stages, counts)}
        used = split_gpus(stages, replicas)
        if used > gpus + 1e-9:
            continue
        bound = split_bound(stages, replicas)
        if bound > best[0] + 1e-12 or (abs(bound - best[0]) <= 1e-12 and used < best[1]):
            best = (bound, used)
    return best


def random_stages(rng):
    return [
        StageRate(f"s{i}", rng.choice([0.5, 1, 1, 2]), rng.choice([0.07, 0.3, 1.0, 2.5, 1 / 3, 8.0, rng.uniform(0.05, 5)]))
        for i in range(rng.randint(1, 4))
    ]


def test_best_split_matches_brute_force():
    rng = random.Random(7)
    checked = 0
    while checked < 300:
        stages = random_stages(rng)
        gpus = rng.randint(1, 12)
        if sum(s.gpus for s in stages) > gpus:
            with pytest.raises(PlanError):
                best_split(stages, gpus)
            continue
        replicas = best_split(stages, gpus)
        assert all(n >= 1 for n in replicas.values())
        assert split_gpus(stages, replicas) <= gpus + 1e-9
        bound, fewest = brute_force(stages, gpus)
        assert split_bound(stages, replicas) == pytest.approx(bound, rel=1e-12), (stages, gpus, replicas)
        assert split_gpus(stages, replicas) == pytest.approx(fewest), (stages, gpus, replicas)
        checked += 1


def test_equal_rates_tie_is_exact():
    # Rates whose candidates coincide (n * r equal across stages, float error included) must not be
    # taken for infeasible.
    stages = [StageRate("a", 1, 0.1), StageRate("b", 1, 0.3), StageRate("c", 1, 0.7)]
    replicas = best_split(stages, 21)
    assert split_bound(stages, replicas) == pytest.approx(brute_force(stages, 21)[0])
    assert replicas == {"a": 14, "b": 5, "c": 2}  # 1.4 = 14 * 0.1, 5 * 0.3 = 1.5, 2 * 0.7 = 1.4


def test_slow_stage_gets_the_gpus():
    stages = [StageRate("images", 1, 0.1), StageRate("scores", 1, 10.0)]
    assert best_split(stages, 10) == {"images": 9, "scores": 1}
    assert split_bound(stages, {"images": 9, "scores": 1}) == pytest.approx(0.9)


def test_equal_split_and_its_bound():
    stages = [StageRate("a", 1, 0.1), StageRate("b", 2, 1.0), StageRate("c", 1, 2.0)]
    # 10 GPUs over 3 stages: shares 4, 3, 3 (remainder to the first); b's 3 GPUs hold one 2-GPU replica.
    assert equal_split(stages, 10) == {"a": 4, "b": 1, "c": 3}
    assert split_bound(stages, equal_split(stages, 10)) == pytest.approx(0.4)
    assert split_bound(stages, best_split(stages, 10)) >= split_bound(stages, equal_split(stages, 10))
    with pytest.raises(PlanError, match="stage 'b'"):
        equal_split([StageRate("a", 1, 1.0), StageRate("b", 2, 1.0)], 3)  # b's share of 1 GPU < 2


def test_too_few_gpus_names_the_stage():
    stages = [StageRate("images", 1, 0.1), StageRate("llava-13b", 2, 1.0), StageRate("reward", 1, 5.0)]
    with pytest.raises(PlanError, match="none left for stage 'llava-13b'"):
        best_split(stages, 2)
    with pytest.raises(PlanError, match="none left for stage 'reward'"):
        best_split(stages, 3.5)


def test_paper_profile_plan_beats_equal_split():
    cfg = load_config(PAPER)
    profile = load_profile(PAPER_PROFILE)
    assert [p.name for p in gpu_pools(cfg)] == [
        "images", "image_scores", "llava-v1.6-mistral-7b", "llava-v1.6-vicuna-13b", "llava-v1.6-vicuna-7b", "response_scores",
    ]
    for gpus in (8, 64, 256):
        plan = make_plan(cfg, profile, gpus)
        assert plan.used_gpus <= gpus
        assert plan.bound >= plan.equal_bound
        assert plan.replicas["images"] == max(plan.replicas.values())  # SD3 is the slow stage
        assert plan.replicas == replicas_for_split(cfg, profile, gpus, "plan")
        assert plan.equal == replicas_for_split(cfg, profile, gpus, "equal")
    assert "<- bottleneck" in make_plan(cfg, profile, 64).table()


def test_a_launcher_file_holds_its_node_types_up_to_its_max_workers(tmp_path):
    aws, gcp = launcher_nodes(REPO / "cluster" / "aws.yaml"), launcher_nodes(REPO / "cluster" / "gcp.yaml")
    # 24 workers at most in all; each type up to its own max_workers, the larger nodes first.
    assert (aws.gpus, len(aws.nodes), aws.nodes[0], aws.nodes[-1]) == (32, 20, ("gpu_4x", 4), ("gpu_1x", 1))
    assert (gcp.gpus, len(gcp.nodes), gcp.nodes[0]) == (24, 20, ("gpu_2x", 2))
    assert aws.describe().endswith("32 GPUs on 20 GPU nodes: 4 x gpu_4x (4 GPUs), 16 x gpu_1x (1 GPU)")
    types = {
        "head": {"resources": {"CPU": 8, "GPU": 8}, "node_config": {}},  # the head is no worker
        "cpu": {"resources": {"CPU": 16}, "max_workers": 9, "node_config": {}},
        "small": {"resources": {"GPU": 1}, "max_workers": 5, "node_config": {}},
        "big": {"resources": {"GPU": 4}, "max_workers": 2, "node_config": {}},
    }
    capped = write(tmp_path, {"max_workers": 3, "head_node_type": "head", "available_node_types": types}, "cluster.yaml")
    assert launcher_nodes(capped).nodes == [("big", 4.0), ("big", 4.0), ("small", 1.0)]  # 3 workers in all
    with pytest.raises(PlanError, match="no available_node_types"):
        launcher_nodes(write(tmp_path, {"max_workers": 3}, "not-a-cluster.yaml"))


def test_a_plan_on_a_cluster_file_stays_within_what_it_holds():
    cfg, profile = load_config(PAPER), load_profile(PAPER_PROFILE)
    aws = launcher_nodes(REPO / "cluster" / "aws.yaml")
    with pytest.raises(PlanError, match=r"--gpus 64: .*cluster/aws.yaml holds at most 32 GPUs"):
        make_plan(cfg, profile, 64, aws)
    plan = make_plan(cfg, profile, None, aws)  # all it holds
    assert plan.gpus == 32 and plan.used_gpus <= 32 and plan.replicas == make_plan(cfg, profile, 32).replicas
    with pytest.raises(PlanError, match="give --gpus, --cluster, or both"):
        make_plan(cfg, profile, None)


def test_replicas_are_placed_on_whole_nodes():
    stages = [StageRate("a", 2, 10.0), StageRate("b", 3, 1.0)]
    nodes = ClusterNodes("two 4-GPU nodes", [("n", 4.0), ("n", 4.0)])
    # 8 GPUs would be one "a" and two "b": 3 + 3 + 2 on two nodes of 4 leaves "a" no room.
    assert best_split(stages, 8) == {"a": 1, "b": 2}
    assert unplaced_stage(stages, {"a": 1, "b": 2}, [4.0, 4.0]) == "a"
    assert split_for_cluster(stages, nodes, None) == (7, {"a": 1, "b": 1})
    with pytest.raises(PlanError, match="stage 'b' takes 3 GPUs per replica, more than the largest node of c"):
        split_for_cluster(stages, ClusterNodes("c", [("n", 2.0)] * 4), None)


def write(tmp_path, data, name="profile.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


GOOD = {
    "gpu": "A100",
    "gpu_hour_usd": {"on_demand": 4.0, "spot": 1.5},
    "source": {"kind": "estimate", "how": "by hand"},
    "stages": [{"name": "images", "seconds_per_batch": 2.0, "batch_size": 2, "num_gpus": 1}],
}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda d: d["stages"][0].update(seconds_per_batch=0), "stages.0.seconds_per_batch: Input should be greater than 0"),
        (lambda d: d["stages"][0].update(batch_size=0), "stages.0.batch_size"),
        (lambda d: d["stages"][0].update(num_gpus=1.5), "stages.0.num_gpus: .*fraction of one GPU or a whole number"),
        (lambda d: d["stages"][0].pop("name"), "stages.0.name: required, but missing"),
        (lambda d: d["stages"][0].update(speed=3), "stages.0.speed: unknown key"),
        (lambda d: d["gpu_hour_usd"].pop("spot"), "gpu_hour_usd.spot: required, but missing"),
        (lambda d: d["source"].update(kind="guess"), "source.kind: Input should be 'estimate' or 'measured'"),
        (lambda d: d["stages"].append(dict(d["stages"][0])), "stages: .*'images'.* named more than once"),
        (lambda d: d.update(stages=[]), "stages: List should have at least 1 item"),
    ],
)
def test_profile_errors_name_the_field(tmp_path, change, message):
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    change(data)
    path = write(tmp_path, data)
    with pytest.raises(PlanError, match=f"{path}: {message}"):
        load_profile(path)


def test_profile_file_errors(tmp_path):
    with pytest.raises(PlanError, match="cannot read profile"):
        load_profile(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("stages: [")
    with pytest.raises(PlanError, match="not valid YAML"):
        load_profile(tmp_path / "bad.yaml")


def test_profile_missing_a_config_stage(tmp_path):
    cfg = load_config(TINY)
    with pytest.raises(PlanError, match=r"profile has no stage 'image_scores' \(config: image_scores\)"):
        make_plan(cfg, load_profile(write(tmp_path, GOOD)), 8)


def tiny_profile(tmp_path):
    stages = [
        {"name": "images", "seconds_per_batch": 10.0, "batch_size": 2, "num_gpus": 1},
        {"name": "image_scores", "seconds_per_batch": 1.0, "batch_size": 8, "num_gpus": 0.5},
        {"name": "llava-1.5", "seconds_per_batch": 4.0, "batch_size": 16, "num_gpus": 1},
        {"name": "llava-next", "seconds_per_batch": 8.0, "batch_size": 16, "num_gpus": 2},
        {"name": "response_scores", "seconds_per_batch": 1.0, "batch_size": 8, "num_gpus": 1},
    ]
    return write(tmp_path, {**GOOD, "stages": stages})


def test_planned_config_round_trips(tmp_path):
    profile_path = tiny_profile(tmp_path)
    profile = load_profile(profile_path)
    cfg = load_config(TINY)
    plan = make_plan(cfg, profile, 16)
    out = tmp_path / "sub" / "planned.yaml"
    out.parent.mkdir()
    write_planned_config(TINY, cfg, profile, str(profile_path), plan, out)
    text = out.read_text()
    assert text.startswith("# Planned by `synthalign plan") and "bottleneck" in text
    planned = load_config(out)  # relative prompt / instruction paths still resolve from the new folder
    assert planned.prompts.path.endswith("tiny.jsonl") and planned.instructions.path.endswith("tiny_instructions.jsonl")
    pools = {ref.name: ref.pool for ref in gpu_pools(planned)}
    for stage in profile.stages:
        pool = pools[stage.name]
        assert pool.min_actors == pool.max_actors == plan.replicas[stage.name]
        assert pool.num_gpus == stage.num_gpus and pool.batch_size == stage.batch_size
    assert planned.responses.models[1].pool.tensor_parallel_size == 2  # llava-next: 2 GPUs per replica
    assert planned.responses.models[0].max_tokens == cfg.responses.models[0].max_tokens  # the rest untouched
    assert planned.resources == cfg.resources
    # The plan read back from the planned config is the same plan: the config split is the plan split.
    assert replicas_for_split(planned, profile, 16, "config") == plan.replicas


def test_config_split_over_budget(tmp_path):
    cfg = load_config(TINY, ["images.pool.max_actors=30"])
    with pytest.raises(PlanError, match="max_actors take 34.5 GPUs, more than 16"):
        replicas_for_split(cfg, load_profile(tiny_profile(tmp_path)), 16, "config")


def test_measured_profile_from_stage_rates():
    from synthalign_ray.capacity.calibrate import StageRate as Measured
    from synthalign_ray.capacity.calibrate import profile_from_rates, single_replica
    from synthalign_ray.capacity.plan import GpuPrice

    cfg = single_replica(load_config(TINY, ["images.pool.max_actors=3"]))
    assert all(ref.pool.min_actors == ref.pool.max_actors == 1 for ref in gpu_pools(cfg))
    rates = [
        Measured("images", 12, "MapBatches(ImageGenerator)", 0.5, "MapBatches(ImageGenerator)", 0.5),
        Measured("image_scores", 12, "MapBatches(ImageScorer)", 3.0, "MapBatches(ImageScorer)", 3.0),
        Measured("select_image", 12, "MapBatches(ImageSelector)", 100.0),
        Measured("instructions", 12, "MapBatches(InstructionWriter)", 100.0),
        Measured("responses[llava-1.5]", 12, "Map(finish_row)", 400.0, "vLLMEngineStage", 1.0),
        Measured("responses[llava-next]", 12, "Map(finish_row)", 700.0, "vLLMEngineStage", 2.0),
        Measured("response_scores", 12, "MapBatches(ResponseScorer)", 4.0, "MapBatches(ResponseScorer)", 4.0),
        Measured("pairs", 12, "Write", 50.0),
    ]
    profile = profile_from_rates(cfg, rates, gpu="cpu", price=GpuPrice(on_demand=0, spot=0), on_gpu=False, prompts=12)
    assert profile.source.kind == "measured" and "CPU" in profile.source.how
    by_name = {s.name: s for s in profile.stages}
    assert list(by_name) == ["images", "image_scores", "llava-1.5", "llava-next", "response_scores"]  # file instructions: no pool
    assert by_name["images"].seconds_per_batch == pytest.approx(cfg.images.pool.batch_size / 0.5)
    assert by_name["llava-next"].rows_per_s == pytest.approx(2.0)  # the engine's rate, not the map after it
    assert all(s.num_gpus == 1 for s in profile.stages)  # CPU replicas: one device each
    assert make_plan(load_config(TINY), profile, 8).replicas["images"] >= 2  # the measured profile plans
