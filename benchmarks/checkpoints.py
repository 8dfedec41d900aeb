"""What stage checkpoints save: a rerun after a reward-model change against the full run it follows.

`synthalign generate` (as a user runs it: `python -m synthalign_ray.cli generate`, a subprocess in the
repository root) runs --config into a fresh output, then again on that output with
`--set response_scores.model=zoo:reward-seqcls`. The rerun restores images, image scores and every
model's answers from the stage store (`OUTPUT/stages/`) and computes only `response_scores` and the
pairs. Both runs are measured in this one run of the script (the machine is shared and noisy: only
ratios within one run count). Printed for each run and as rerun / full:

- command wall s: the whole command, start-up included (Python, Ray, the wave process, model actors
  and vLLM engines). A rerun starts no actor for a restored stage: no image model, no vLLM engine.
- Ray Data execution s: the manifest's `execution_seconds`, Ray Data's time of the dataset's
  execution, in which the model actors and engines start (they start with it, in parallel).
- task time s, the measure WITHOUT start-up: the sum of the manifest's `operators[].busy_s`
  (`progress.run_stats`), the summed wall time of the run's Ray Data tasks, each timed by Ray Data
  from its start to its end on the worker. An actor loads its model (a vLLM engine starts) in its
  constructor, never in a task, so start-up is not in it by construction; nor is any wait (for an
  actor, for input, for backpressure). It is the time the run spent on its rows: what it would take
  with its stages run one after another on actors already up, one task at a time.
  Why not "execution time minus the time until each model stage's actors are ready": neither the
  manifest nor any log records when an actor is ready. Ray Data's stats and its log have each
  operator's first task start, which is max(actor ready, first input), not readiness; and in the full
  run the image stages do their work while the vLLM engines are still starting (on tiny, ~40 s of the
  ~45 s execution is engine start-up), so any wall-clock span "after the last engine is up" hides the
  very work a rerun saves. Caveat: on shared cores a task that runs beside an engine's start-up runs
  slower, which counts in the full run's image stages.
  Also printed: the task time per stage of the method (the manifest's `stages` table).
- the rerun's `checkpoints` (rows computed / reused per committed stage). The script stops (exit
  message) if the full run reused anything, a run failed rows, or the rerun computed a row of images,
  image scores or answers, or none of response_scores: then it would measure something else.

The issue's expectation: rerun / full well under 0.5 without start-up.

Planning (only with --planning-rows): the driver's memory for planning a run's first wave
(`checkpoints.plan_todo`, as `pipeline.write_todo_prompts` calls it): for each row to do and each
committed stage, the shard of the stage store holding its entry, then one prompt file per group of rows
(`todo/<n>.arrow`). The design: the driver holds 16 bytes (a row key) and an int32 shard number per
committed stage per row, never rows, so it grows by a few tens of MB at 1M rows. For SMALL and LARGE
rows, in a temp folder: prompts (`simulate.write_prompts`), --config on them with template instructions
and `resources.rows_per_block` = --planning-block, and a stage store as a previous run left it: every
committed stage has entries for 90% of the rows (all but every tenth), written with `write_entries` in
shards of rows_per_block rows (real Parquet shards: `id`, `key` as `keys_of` computes it, and one int8
stand-in column; the planner reads only `key` and a shard's schema), in the folders of the config's
fingerprints. Then, in a subprocess per size (so peaks don't mix): load the config, check the prompts,
build the graph (the driver's state before planning), reset the process's peak RSS
(/proc/self/clear_refs), and plan. Printed per size: RSS before planning, peak RSS during it
(getrusage ru_maxrss), their difference (the planning delta), the process's absolute peak (the prompt
check's included), Arrow's pool peak, planning s; the plan's groups (2: 10% compute every committed
stage, 90% restore all) and per-stage computed / reused, checked against the setup; and LARGE / SMALL
of the planning delta and of the absolute peak.

    python benchmarks/checkpoints.py [--config configs/tiny.yaml]
    python benchmarks/checkpoints.py --planning-rows 10000 1000000 [--skip rerun]
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from synthalign_ray import store
from synthalign_ray.config import load_config
from synthalign_ray.stages import graph

REPO = Path(__file__).resolve().parents[1]
CHANGE = "response_scores.model=zoo:reward-seqcls"
# The only committed stage the change runs again (pairs, model-free, always runs).
RECOMPUTED = "response_scores"


@dataclass
class Run:
    seconds: float  # the whole command's wall time
    manifest: dict
    log: Path

    @property
    def execution_s(self) -> float:
        return self.manifest["execution_seconds"]

    @property
    def task_s(self) -> float:
        return sum(operator["busy_s"] for operator in self.manifest["operators"])

    def task_s_by_stage(self) -> dict[str, float]:
        """Summed task time per row of the stage table (over the groups of rows, if several)."""
        by_stage: dict[str, float] = {}
        for row in self.manifest["stages"]:
            by_stage[row["stage"]] = by_stage.get(row["stage"], 0.0) + row["busy_s"]
        return by_stage


def generate(config: str, output: Path, log: Path, sets: list[str] = ()) -> Run:
    """`synthalign generate` in a subprocess, its output and errors to `log`."""
    command = [sys.executable, "-m", "synthalign_ray.cli", "generate", "--config", config, "--output", str(output)]
    for item in sets:
        command += ["--set", item]
    started = time.perf_counter()
    with open(log, "w") as file:
        done = subprocess.run(command, cwd=REPO, stdout=file, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"synthalign generate {' '.join(sets)} failed (exit {done.returncode}); see {log}")
    return Run(seconds, json.loads((output / store.MANIFEST).read_text()), log)


def check(full: Run, rerun: Run, committed: list[str]) -> None:
    """Stops the benchmark where the runs did not do what it measures."""
    for name, run in (("full run", full), ("rerun", rerun)):
        if run.manifest["counts"]["failed"]:
            raise SystemExit(f"the {name} failed {run.manifest['counts']['failed']} rows (they skip stages); see {run.log}")
    reused = {stage: c["reused"] for stage, c in full.manifest["checkpoints"].items() if c["reused"]}
    if reused:
        raise SystemExit(f"the full run reused rows from the stage store ({reused}): its output was not fresh")
    checkpoints = rerun.manifest["checkpoints"]
    if checkpoints["images"]["computed"] != 0:
        raise SystemExit(f"the rerun computed {checkpoints['images']['computed']} rows of images instead of restoring them: "
                         f"this benchmark would measure the wrong thing (checkpoints: {checkpoints}; log {rerun.log})")
    computed = {stage: checkpoints[stage]["computed"] for stage in committed if stage != RECOMPUTED and checkpoints[stage]["computed"]}
    if computed:
        raise SystemExit(f"the rerun computed rows of stages it should restore ({computed}; log {rerun.log})")
    if not checkpoints[RECOMPUTED]["computed"]:
        raise SystemExit(f"the rerun computed no rows of {RECOMPUTED}: the change {CHANGE} did not take effect")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--planning-rows", type=int, nargs=2, metavar=("SMALL", "LARGE"),
                        help="also measure the driver's memory for planning (off unless given), at these row counts")
    parser.add_argument("--planning-block", type=int, default=250, help="planning: rows per block and per stage-store shard")
    parser.add_argument("--skip", choices=["rerun", "planning"], nargs="*", default=[])
    parser.add_argument("--measure-planning", help=argparse.SUPPRESS)  # the planning section's subprocess
    args = parser.parse_args()
    if args.measure_planning:
        measure_planning(Path(args.measure_planning))
        return
    planning = args.planning_rows is not None and "planning" not in args.skip
    if "rerun" not in args.skip:
        rerun_section(args)
    if planning:
        planning_section(args)
    elif "rerun" in args.skip:
        parser.error("nothing to run: --skip rerun runs only the planning section, which needs --planning-rows")


def rerun_section(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-checkpoints-"))
    print(f"work folder: {work}", flush=True)
    committed = [stage.name for stage in graph.build(load_config(REPO / args.config)) if stage.committed]
    output = work / "output"

    full = generate(args.config, output, work / "full.log")
    print(f"  full run: {full.seconds:.1f} s", flush=True)
    rerun = generate(args.config, output, work / "rerun.log", [CHANGE])
    print(f"  rerun: {rerun.seconds:.1f} s", flush=True)
    check(full, rerun, committed)

    rows = sum(rerun.manifest["checkpoints"][committed[0]][kind] for kind in ("computed", "reused"))
    full_stages, rerun_stages = full.task_s_by_stage(), rerun.task_s_by_stage()

    def ratio_line(name: str, a: float, b: float, note: str) -> str:
        return f"    {name:30s} {a:8.2f} {b:8.2f} {b / a:11.2f}   {note}"

    lines = [
        f"{args.config}: {rows} rows; a full run into a fresh output, then a rerun on it with --set {CHANGE}",
        f"    {'':30s} {'full':>8s} {'rerun':>8s} {'rerun/full':>11s}",
        ratio_line("command wall s", full.seconds, rerun.seconds, "WITH start-up (Python, Ray, actors, vLLM engines)"),
        ratio_line("Ray Data execution s", full.execution_s, rerun.execution_s, "actor and engine start-up included"),
        ratio_line("task time s", full.task_s, rerun.task_s, "WITHOUT start-up: summed task time (operators' busy_s)"),
        "    task time by stage, s (full, rerun; a row names the stages of fused operators):",
        *(
            f"      {full_stages.get(stage, 0.0):8.2f} {rerun_stages.get(stage, 0.0):8.2f}  {stage}"
            for stage in dict.fromkeys([*full_stages, *rerun_stages])
        ),
        "    target (the issue): rerun/full well under 0.5 without start-up",
        "  rerun's checkpoints (rows per committed stage):",
        *(
            f"    {stage:30s} computed {c['computed']:4d}  reused {c['reused']:4d}  ({c['fingerprint']})"
            for stage in committed
            for c in [rerun.manifest["checkpoints"][stage]]
        ),
    ]
    print("\n".join(["", "=== benchmarks/checkpoints.py ===", *lines]))


# --- planning: the driver's memory for planning a run ----------------------------------------------

TEMPLATE_INSTRUCTIONS = ["instructions.source=template"]  # as benchmarks/pipeline.py: no instruction file
STORED_EVERY = 10  # the setup leaves no entry for every tenth row: 90% stored, 10% to compute
RESULT_PREFIX = "PLANNING_RESULT="


def planning_sets(prompts: Path, rows_per_block: int) -> list[str]:
    return [f"prompts.path={prompts}", *TEMPLATE_INSTRUCTIONS, f"resources.rows_per_block={rows_per_block}"]


def build_stage_store(cfg, output: str) -> dict[str, int]:
    """A stage store as a previous run would have left it: every committed stage's entries for every row
    but each STORED_EVERY-th, in shards of `rows_per_block` rows. Returns rows, stored, shards per stage."""
    import numpy as np
    import pyarrow as pa

    from synthalign_ray.checkpoints import fingerprints, keys_of
    from synthalign_ray.ids import IdSet
    from synthalign_ray.pipeline import todo_rows
    from synthalign_ray.stages.prompts import check_prompts
    from synthalign_ray.store.stage_store import key_array, stage_folder, write_entries

    stages = graph.build(cfg)
    found = fingerprints(stages, cfg.seed)
    folders = [stage_folder(output, stage.name, found[stage.name]) for stage in stages if stage.committed]
    block = cfg.resources.rows_per_block
    rows = stored = shards = 0
    pending: list[pa.Table] = []

    def flush(table: pa.Table) -> int:
        for folder in folders:
            write_entries(folder, table.append_column("stand_in", pa.array(np.zeros(table.num_rows, np.int8))))
        return 1

    for table in todo_rows(cfg, check_prompts(cfg.prompts), IdSet()):
        keep = (np.arange(rows, rows + table.num_rows) % STORED_EVERY) != STORED_EVERY - 1
        rows += table.num_rows
        kept = table.filter(pa.array(keep))
        stored += kept.num_rows
        pending.append(pa.table({"id": kept["id"], "key": key_array(keys_of(kept))}))
        entries = pa.concat_tables(pending)
        while entries.num_rows >= block:
            shards += flush(entries.slice(0, block))
            entries = entries.slice(block)
        pending = [entries]
    leftover = pa.concat_tables(pending) if pending else None
    if leftover is not None and leftover.num_rows:
        shards += flush(leftover)
    return {"rows": rows, "stored": stored, "shards": shards, "stages": len(folders)}


def current_rss_kib() -> int:
    return int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmRSS")))


def measure_planning(spec_path: Path) -> None:
    """The subprocess: the driver's state before planning, then `plan_todo` with its peak RSS alone."""
    import pyarrow as pa

    from synthalign_ray import checkpoints
    from synthalign_ray.ids import IdSet
    from synthalign_ray.pipeline import todo_rows
    from synthalign_ray.stages.prompts import INPUT_SCHEMA, check_prompts

    spec = json.loads(spec_path.read_text())
    cfg = load_config(REPO / spec["config"], spec["sets"])
    check = check_prompts(cfg.prompts)
    stages = graph.build(cfg)
    found = checkpoints.fingerprints(stages, cfg.seed)
    gc.collect()
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:  # the peak so far (the prompt check's) must not hide planning's: reset it (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    before = current_rss_kib()
    started = time.perf_counter()
    plan = checkpoints.plan_todo(spec["output"], stages, found, lambda: todo_rows(cfg, check, IdSet()), INPUT_SCHEMA, cfg.resources.rows_per_block)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "before_kib": before,
        "peak_kib": peak,
        "absolute_peak_kib": max(peak, setup_peak),
        "peak_reset": reset,
        "after_kib": current_rss_kib(),
        "arrow_pool_peak_bytes": pa.default_memory_pool().max_memory(),
        "seconds": seconds,
        "groups": [{"restored": list(group.restored), "rows": group.rows} for group in plan.groups],
        "stages": plan.stages,
    }
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def check_plan(result: dict, setup: dict, committed: list[str]) -> None:
    """Stops the benchmark where the plan is not the one the setup implies: it would measure something else."""
    computed = setup["rows"] - setup["stored"]
    want_groups = sorted([((), computed), (tuple(committed), setup["stored"])])
    groups = sorted((tuple(group["restored"]), group["rows"]) for group in result["groups"])
    if groups != want_groups:
        raise SystemExit(f"planning: groups {groups}, expected {want_groups}")
    counts = {name: (c["computed"], c["reused"]) for name, c in result["stages"].items()}
    want = {name: (computed, setup["stored"]) for name in committed}
    if counts != want:
        raise SystemExit(f"planning: per-stage (computed, reused) {counts}, expected {want}")


def plan_in_subprocess(args, work: Path, rows: int) -> tuple[dict, dict, float]:
    """Sets up `rows` rows and a stage store in `work`, then plans them in a subprocess: its result, the
    setup's counts, and the setup's seconds."""
    from synthalign_ray.capacity.simulate import write_prompts

    started = time.perf_counter()
    prompts = write_prompts(work / "prompts.jsonl", rows)
    sets = planning_sets(prompts, args.planning_block)
    output = str(work / "output")
    setup = build_stage_store(load_config(REPO / args.config, sets), output)
    setup_s = time.perf_counter() - started
    spec = work / "spec.json"
    spec.write_text(json.dumps({"config": args.config, "sets": sets, "output": output}))
    log = work / "plan.log"
    with open(log, "w") as file:
        done = subprocess.run([sys.executable, __file__, "--measure-planning", str(spec)], cwd=REPO, stdout=file, stderr=subprocess.STDOUT)
    text = log.read_text()
    if done.returncode != 0:
        raise SystemExit(f"planning {rows} rows failed (exit {done.returncode}); see {log}:\n{text[-2000:]}")
    line = next(line for line in text.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):]), setup, setup_s


def planning_section(args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-planning-"))
    print(f"planning work folder: {work}", flush=True)
    committed: list[str] = []
    results: dict[int, dict] = {}
    lines = [
        f"{args.config}: planning a run (checkpoints.plan_todo) in a subprocess per size; a stage store with every "
        f"committed stage's entries for 90% of the rows, in {args.planning_block}-row shards",
    ]
    for rows in args.planning_rows:
        folder = work / f"rows-{rows}"
        result, setup, setup_s = plan_in_subprocess(args, folder, rows)
        if not committed:
            committed = [stage.name for stage in graph.build(load_config(REPO / args.config, planning_sets(folder / "prompts.jsonl", args.planning_block))) if stage.committed]
        check_plan(result, setup, committed)
        results[rows] = result
        shutil.rmtree(folder)
        mib = {key: result[key] / 1024 for key in ("before_kib", "peak_kib", "absolute_peak_kib", "after_kib")}
        # What the design says the driver holds: a row key and a shard number per committed stage per row.
        design_mib = rows * (16 + 4 * len(committed)) / 2**20
        lines += [
            f"  {rows} rows: setup {setup_s:.1f} s ({setup['shards']} shards x {setup['stages']} stages, {setup['stored']} entries each); "
            f"planning {result['seconds']:.1f} s",
            f"    RSS before planning {mib['before_kib']:8.1f} MiB   peak during planning {mib['peak_kib']:8.1f} MiB   "
            f"planning delta {mib['peak_kib'] - mib['before_kib']:7.1f} MiB"
            + ("" if result["peak_reset"] else "  (peak not reset: includes the prompt check's)"),
            f"    absolute peak {mib['absolute_peak_kib']:8.1f} MiB   RSS after {mib['after_kib']:8.1f} MiB   "
            f"Arrow pool peak {result['arrow_pool_peak_bytes'] / 2**20:.1f} MiB   keys + shard numbers (design) {design_mib:.1f} MiB",
            "    groups: " + "; ".join(f"{g['rows']} rows restore [{', '.join(g['restored']) or 'none'}]" for g in result["groups"]),
            "    per stage: " + "; ".join(f"{name} computed {c['computed']} reused {c['reused']}" for name, c in result["stages"].items()),
        ]
    small, large = (results[rows] for rows in args.planning_rows)

    def delta(result: dict) -> float:
        return (result["peak_kib"] - result["before_kib"]) / 1024

    lines += [
        f"  {args.planning_rows[1]} / {args.planning_rows[0]} rows:",
        f"    planning delta: {delta(large):.1f} / {delta(small):.1f} MiB = {delta(large) / max(delta(small), 1e-9):.2f}x "
        f"(+{delta(large) - delta(small):.1f} MiB)",
        f"    absolute peak: {large['absolute_peak_kib'] / 1024:.1f} / {small['absolute_peak_kib'] / 1024:.1f} MiB = "
        f"{large['absolute_peak_kib'] / small['absolute_peak_kib']:.2f}x",
        "    the design: the driver grows by a few tens of MB at 1M rows (16 bytes and an int32 per committed stage per row)",
    ]
    shutil.rmtree(work)
    print("\n".join(["", "=== benchmarks/checkpoints.py: planning ===", *lines]), flush=True)


if __name__ == "__main__":
    main()
