"""Stage checkpoints without Ray: which stages a config change invalidates (fingerprints), entries that
round-trip through the stage store, the plan that groups rows by the stages they restore, and the
generations of a run folder. The runs themselves are in tests/integration/test_generate.py."""

import shutil

import pyarrow as pa
import pytest

from synthalign_ray import checkpoints, store
from synthalign_ray.config import load_config
from synthalign_ray.generations import GENERATIONS_DIR, collect_garbage, start_generation
from synthalign_ray.stages import graph
from synthalign_ray.stages.prompts import INPUT_SCHEMA, PROMPT_SCHEMA, with_status_columns
from synthalign_ray.stages.responses import RESPONSES_TYPE
from synthalign_ray.store.stage_store import stage_folder
from tests.conftest import REPO

ANSWERERS = ["responses[llava-1.5]", "responses[llava-next]"]


def fingerprints(*overrides, config="tiny.yaml"):
    cfg = load_config(REPO / "configs" / config, list(overrides))
    return checkpoints.fingerprints(graph.build(cfg), cfg.seed)


def changed(*overrides) -> list[str]:
    before, after = fingerprints(), fingerprints(*overrides)
    return [name for name in after if before.get(name) != after[name]]


def test_a_change_invalidates_its_stage_and_those_that_read_from_it():
    assert changed("response_scores.model=zoo:reward-seqcls") == ["response_scores", "pairs"]
    assert changed("pairs.min_margin=0.5") == ["pairs"]
    assert changed("images.steps=2") == [
        "images", "image_scores", "select_image", *ANSWERERS, "response_scores", "pairs",
    ]  # fmt: skip
    assert changed("image_scores.select_by=clip") == ["select_image", *ANSWERERS, "response_scores", "pairs"]
    # Instructions from a file are read by id: the images never reach them.
    assert "instructions" not in changed("images.steps=2")
    assert changed("seed=1") == list(fingerprints())


def test_an_added_answerer_leaves_the_others_and_reruns_what_reads_every_answer():
    third = "{name: third, model: zoo:lvlm-llava, max_tokens: 8}"
    models = "responses.models=[{name: llava-1.5, model: zoo:lvlm-llava, max_tokens: 24}, %s, {name: llava-next, model: zoo:lvlm-llava-next, max_tokens: 24}]"
    assert changed(models % third) == ["responses[third]", "response_scores", "pairs"]


def test_pools_do_not_change_a_fingerprint_and_a_moved_file_is_the_same_input(tmp_path):
    assert changed("images.pool.max_actors=4", "response_scores.pool.batch_size=1", "resources.rows_per_block=3") == []
    moved = tmp_path / "instructions.jsonl"
    shutil.copy(REPO / "configs/prompts/tiny_instructions.jsonl", moved)
    assert changed(f"instructions.path={moved}") == []
    moved.write_text(moved.read_text().replace('"instruction": "', '"instruction": "Now: ', 1))
    assert changed(f"instructions.path={moved}") == ["instructions", *ANSWERERS, "response_scores", "pairs"]


def prompts(ids, prompt="a red fox"):
    table = pa.table(
        {"id": ids, "category": ["c"] * len(ids), "t2i_prompt": [f"{prompt} {i}" for i in ids], "seed": range(len(ids)), "source_line": range(len(ids))},
        schema=PROMPT_SCHEMA,
    )
    return with_status_columns(table)


def answers(*models):
    return [{"model": m, "text": f"from {m}", "finish_reason": "stop", "error": None} for m in models]


def with_status(table, statuses):
    return table.set_column(table.schema.get_field_index("status"), "status", pa.array(statuses, pa.string()))


@pytest.fixture
def tiny():
    cfg = load_config(REPO / "configs/tiny.yaml", [])
    stages = graph.build(cfg)
    return stages, checkpoints.fingerprints(stages, cfg.seed)


def commit_answers(output, fps, table, answerer):
    folder = stage_folder(output, f"responses[{answerer}]", fps[f"responses[{answerer}]"])
    checkpoints.CommitEntries(("responses",), answerer, folder)(table)


def test_an_answerers_entries_are_its_own_answers_of_rows_ok_after_it_and_restore_after_those_before(tmp_path, tiny):
    stages, fps = tiny
    output = str(tmp_path)
    done = prompts(["a", "b", "c"]).append_column("responses", pa.array([answers("llava-1.5", "llava-next")] * 3, RESPONSES_TYPE))
    commit_answers(output, fps, with_status(done, ["ok", "ok", "failed"]), "llava-next")

    plan = checkpoints.plan_todo(output, stages, fps, lambda: [prompts(["a", "b", "c", "d"])], INPUT_SCHEMA, rows_per_block=2)
    assert plan.stages["responses[llava-next]"] == {"fingerprint": fps["responses[llava-next]"], "computed": 2, "reused": 2}
    assert plan.stages["images"]["computed"] == 4
    groups = {group.restored: group for group in plan.groups}
    assert sorted(groups) == [(), ("responses[llava-next]",)] and groups[()].rows == 2

    group = groups[("responses[llava-next]",)]
    block = pa.concat_tables(store.read_blocks(group.uri))
    assert block["id"].to_pylist() == ["a", "b"]
    # The first answerer ran in this group: the restored answers go after its own.
    block = block.append_column("responses", pa.array([answers("llava-1.5")] * 2, RESPONSES_TYPE))
    commits = plan.commits(group)
    restore = checkpoints.RestoreEntries("responses[llava-next]", ("responses",), "llava-next", commits.folder("responses[llava-next]"), commits.schemas["responses[llava-next]"])
    restored = restore(block)
    assert restored.schema == done.schema
    assert restored["responses"].to_pylist() == [answers("llava-1.5", "llava-next")] * 2


def test_a_row_whose_entry_is_gone_fails_naming_the_stage(tmp_path, tiny):
    stages, fps = tiny
    output = str(tmp_path)
    table = prompts(["a", "b"]).append_column("responses", pa.array([answers("llava-next")] * 2, RESPONSES_TYPE))
    commit_answers(output, fps, table, "llava-next")
    plan = checkpoints.plan_todo(output, stages, fps, lambda: [prompts(["a", "b"])], INPUT_SCHEMA, rows_per_block=2)
    (group,) = plan.groups
    block = pa.concat_tables(store.read_blocks(group.uri))
    folder = plan.commits(group).folder("responses[llava-next]")
    # Another prompt text under the same id is another row: its entry no longer matches.
    block = block.set_column(block.schema.get_field_index("t2i_prompt"), "t2i_prompt", pa.array(["a red fox a", "edited"]))
    restored = checkpoints.RestoreEntries("responses[llava-next]", ("responses",), "llava-next", folder, plan.schemas["responses[llava-next]"])(block)
    assert restored["status"].to_pylist() == ["ok", "failed"]
    assert restored["failed_stage"].to_pylist() == [None, "responses[llava-next]"]
    assert restored["error"][1].as_py().startswith("CheckpointMissing: the responses[llava-next] entry of this row is gone")


def test_an_edited_prompt_is_planned_afresh(tmp_path, tiny):
    stages, fps = tiny
    output = str(tmp_path)
    table = prompts(["a", "b"]).append_column("responses", pa.array([answers("llava-next")] * 2, RESPONSES_TYPE))
    commit_answers(output, fps, table, "llava-next")
    plan = checkpoints.plan_todo(output, stages, fps, lambda: [prompts(["a", "b"], prompt="a blue fox")], INPUT_SCHEMA, rows_per_block=2)
    assert plan.stages["responses[llava-next]"]["reused"] == 0


def write_generation(output, fingerprint, ids):
    store.write_json(store.join(output, store.MANIFEST), {"config_fingerprint": fingerprint, "checkpoints": {}})
    store.write_table(store.join(output, "pairs", "part-1.parquet"), pa.table({"id": ids}))


def test_another_config_moves_the_generation_aside_and_its_own_comes_back(tmp_path):
    output = str(tmp_path)
    write_generation(output, "aaaa", ["a"])
    assert start_generation(output, "aaaa", overwrite=False) is None
    assert start_generation(output, "bbbb", overwrite=False) == "aaaa"
    assert not (tmp_path / "pairs").exists() and not (tmp_path / "manifest.json").exists()
    assert (tmp_path / GENERATIONS_DIR / "aaaa" / "pairs" / "part-1.parquet").is_file()
    write_generation(output, "bbbb", ["b"])
    assert start_generation(output, "aaaa", overwrite=False) == "bbbb"
    assert store.read_json(str(tmp_path / "manifest.json"))["config_fingerprint"] == "aaaa"
    assert store.committed_ids(output) == store.IdSet.of(["a"])
    assert (tmp_path / GENERATIONS_DIR / "bbbb" / "pairs" / "part-1.parquet").is_file()
    assert sorted(p.name for p in (tmp_path / GENERATIONS_DIR).iterdir()) == ["bbbb"]


class Killed(BaseException):
    """The driver killed between two steps of a switch of generations."""


def two_generations(tmp_path):
    """Config aaaa's generation current, with a report, and config bbbb's archived."""
    output = str(tmp_path)
    write_generation(output, "bbbb", ["b"])
    start_generation(output, "aaaa", overwrite=False)
    write_generation(output, "aaaa", ["a"])
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "index.html").write_text("aaaa")
    return output


def files(tmp_path):
    return {str(path.relative_to(tmp_path)): path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}


def killed_after(monkeypatch, steps, action):
    """Runs `action` with the store's writing steps counted; the driver dies before step `steps` (if any)."""
    done = []

    def counted(name, step):
        def wrapper(*args, **kwargs):
            if len(done) == steps:
                raise Killed(name)
            done.append(name)
            return step(*args, **kwargs)

        return wrapper

    with monkeypatch.context() as patch:
        for name in ("move_tree", "write_json", "remove_folder", "delete_file"):
            patch.setattr(store, name, counted(name, getattr(store, name)))
        try:
            action()
        except Killed:
            pass
    return len(done)


def test_a_switch_of_generations_killed_at_any_step_is_finished_by_the_next_run_or_gc(tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    two_generations(reference)
    steps = killed_after(monkeypatch, None, lambda: start_generation(str(reference), "bbbb", overwrite=False))
    switched = files(reference)
    assert store.read_json(str(reference / "manifest.json"))["config_fingerprint"] == "bbbb"
    assert switched["generations/aaaa/report/index.html"] == b"aaaa" and "generations/switch.json" not in switched
    for step in range(steps):
        output = tmp_path / str(step)
        two_generations(output)
        killed_after(monkeypatch, step, lambda: start_generation(str(output), "bbbb", overwrite=False))
        assert start_generation(str(output), "bbbb", overwrite=False) == "aaaa", step
        assert files(output) == switched, step
    # gc, too, finishes a switch before it reads the current generation: else it would remove the half of
    # the current one that had already moved to generations/.
    two_generations(tmp_path / "gc")
    killed_after(monkeypatch, 3, lambda: start_generation(str(tmp_path / "gc"), "bbbb", overwrite=False))
    assert collect_garbage(str(tmp_path / "gc")) == {"generations": 3, "stage_entries": 0}
    assert store.committed_ids(str(tmp_path / "gc")) == store.IdSet.of(["b"])


def test_gc_keeps_the_current_generation_and_the_stage_folders_it_uses(tmp_path, tiny):
    stages, fps = tiny
    output = str(tmp_path)
    table = prompts(["a"]).append_column("responses", pa.array([answers("llava-next")], RESPONSES_TYPE))
    commit_answers(output, fps, table, "llava-next")
    stale = stage_folder(output, "responses[llava-next]", "0" * 16)
    checkpoints.CommitEntries(("responses",), "llava-next", stale)(table)
    write_generation(output, "aaaa", ["a"])
    start_generation(output, "bbbb", overwrite=False)
    store.write_json(str(tmp_path / "manifest.json"), {"config_fingerprint": "bbbb", "checkpoints": {"responses[llava-next]": {"fingerprint": fps["responses[llava-next]"]}}})
    assert collect_garbage(output) == {"generations": 2, "stage_entries": 1}
    assert not (tmp_path / GENERATIONS_DIR).exists() and not (tmp_path / "stages" / "responses[llava-next]" / ("0" * 16)).exists()
    assert store.list_shards(stage_folder(output, "responses[llava-next]", fps["responses[llava-next]"]))


def test_keys_ending_in_zero_bytes_commit_and_restore(tmp_path, tiny):
    """numpy's bytes items drop a digest's trailing zero bytes (1 key in 256): keys go to Arrow and back byte for byte."""
    stages, fps = tiny
    candidates = prompts([f"row-{n}" for n in range(3000)])
    keys = checkpoints.keys_of(candidates).tobytes()
    ids = [row for n, row in enumerate(candidates["id"].to_pylist()) if keys[16 * n + 15] == 0][:3]
    assert len(ids) == 3
    table = prompts(ids).append_column("responses", pa.array([answers("llava-next")] * 3, RESPONSES_TYPE))
    commit_answers(str(tmp_path), fps, table, "llava-next")
    plan = checkpoints.plan_todo(str(tmp_path), stages, fps, lambda: [prompts(ids)], INPUT_SCHEMA, rows_per_block=3)
    (group,) = plan.groups
    assert group.restored == ("responses[llava-next]",)
    folder = plan.commits(group).folder("responses[llava-next]")
    block = pa.concat_tables(store.read_blocks(group.uri))
    restored = checkpoints.RestoreEntries("responses[llava-next]", ("responses",), "llava-next", folder, plan.schemas["responses[llava-next]"])(block)
    assert restored["status"].to_pylist() == ["ok"] * 3 and restored["responses"].to_pylist() == [answers("llava-next")] * 3


def test_stage_folders_are_valid_in_an_s3_uri():
    """pyarrow parses no brackets in an s3:// path: an answerer's folder name has none."""
    from pyarrow import fs as pafs

    folder = stage_folder("s3://bucket/run?endpoint_override=localhost:1&scheme=http", "responses[llava-1.5]", "0" * 16)
    assert folder == f"s3://bucket/run/stages/responses.llava-1.5/{'0' * 16}?endpoint_override=localhost:1&scheme=http"
    assert pafs.FileSystem.from_uri(folder)[1] == f"bucket/run/stages/responses.llava-1.5/{'0' * 16}"
