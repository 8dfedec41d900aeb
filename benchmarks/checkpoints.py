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

    python benchmarks/checkpoints.py [--config configs/tiny.yaml]
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
