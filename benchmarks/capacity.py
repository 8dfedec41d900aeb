"""Capacity of the paper's pipeline on big GPU clusters, simulated here (`synthalign simulate`), in ratios.

(a) Scheduling efficiency. For 8, 64 and 256 fake GPUs, and for the plan's split (`synthalign plan`)
    and the naive equal split: `synthalign simulate` on the paper's config and profile. Achieved pairs/s
    is the steady state of the run: the slope of a least-squares line through (commit time, pairs
    committed so far) of the `pairs/` shards between 20% and 80% of the run's pairs (a shard is moved
    into place whole, so its file time is its commit time); the pipeline's fill (first blocks through
    every stage) and drain (last blocks) fall outside. It is scaled back to cluster time (x the time
    scale) and divided by the analytic bound of that split, min over stages of replicas x rows/s per
    replica (target >= 0.9). Also printed: plan bound / equal bound. Each run has `--waves` times as
    many blocks as its biggest pool has replicas, so every replica handles several blocks; the time
    scale is chosen so that a run lasts about `--target-seconds` and Ray Data gets at most
    `--max-blocks-per-s` blocks per second here (2 cores schedule all of its tasks).
(b) Memory. `synthalign simulate` in a subprocess on 10K and on 1M rows (8 GPUs, plan split, blocks of
    `--memory-block` rows, a time scale that makes the model stages negligible): the driver side's peak
    RSS and the object store's bytes in use (Ray's memory stats, polled every 0.5 s). Growth from 10K to
    1M rows (target < 20%). The driver side is the driver (getrusage in the subprocess, as
    benchmarks/pipeline.py (b) measures it) plus the biggest of its wave processes (each wave's Ray Data
    execution is driven by a process of its own, `runtime.run_in_wave_process`; its peak from the
    manifest): their sum bounds the two at any moment. Each is printed alone too.
    The object store's use is a spiky series held near the budget (blocks finishing together), whose
    peak grows with the time it is watched: an 80-minute run samples 100 times more of the same spikes
    than a 47 s one. So its growth is measured at equal watching time: the 1M run's samples are cut
    into stretches as long as the 10K run's, and the median peak of its last tenth's stretches (where
    growth with rows would show) is compared with the 10K run's peak. The whole-run peaks are printed too.
    Both runs set the two bounds a million-row run needs: `resources.object_store_memory` (Ray Data's
    budget: with model stages this fast the 2 cores' model-free stages are the bottleneck, and Ray
    Data's default budget, half of this machine's object store, would let every block queue ahead of
    them) and `resources.blocks_per_wave` (a wave's process keeps tens of KB per block of its execution).
    Waves of 100 blocks: waves of 400 (as long as a real run's: 100K rows are 7 h on 64 GPUs at the
    paper profile's rates) ran 30-45% slower here.
    8 GPUs, because the blocks in flight grow with the replicas (one or more per replica). 250-row blocks
    and a 4 MiB budget, so that the 10K run (40 blocks, ~13 MiB of simulated rows) is held at the budget
    like the 1M run, and the ratio measures growth with rows: with 1000-row blocks and 16 MiB, the 10K
    run's 10 blocks never filled the pipeline (12.8 MiB vs a steady 15-18 MiB median at 1M). The peak
    is of a spiky series (the run's log has a MEMORY_SAMPLE line every 10 s to see where). The
    model-free stages move ~250-450 rows/s on this machine's 2 cores, so 1M rows take over an hour
    here; `--memory-rows 10000 100000` is the short version.
(c) Cost. GPU-hours and spot / on-demand cost per 10K pairs from the profile: ideal (every GPU busy all
    the time: sum over stages of GPUs / rows/s), the plan at each GPU count (GPUs of the plan x time at
    its bound: replicas of faster stages idle part of the time), and as simulated in (a).

    python benchmarks/capacity.py [--gpus 8 64 256] [--memory-rows 10000 1000000] [--skip memory]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import REPO, run_driver, wave_process_peak_mib  # noqa: E402 (benchmarks/pipeline.py: the driver subprocess)

from synthalign_ray.config import load_config  # noqa: E402
from synthalign_ray.capacity.plan import load_profile, replicas_for_split, split_bound, split_gpus, stage_rates  # noqa: E402
from synthalign_ray.capacity.simulate import SIMULATION_DIR, SIMULATION_FILE  # noqa: E402

PAIRS_PER_TABLE = 10_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/paper.yaml")
    parser.add_argument("--profile", default="configs/profiles/paper_a100.yaml")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--splits", nargs="+", default=["plan", "equal"])
    parser.add_argument("--waves", type=int, default=6, help="(a): blocks per replica of the biggest pool")
    parser.add_argument("--target-seconds", type=float, default=60.0, help="(a): wanted length of a run here")
    parser.add_argument("--max-blocks-per-s", type=float, default=3.0, help="(a): Ray Data blocks per second here at most")
    parser.add_argument("--memory-rows", type=int, nargs=2, default=[10_000, 1_000_000], metavar=("SMALL", "LARGE"))
    parser.add_argument("--memory-gpus", type=int, default=8)
    parser.add_argument("--memory-block", type=int, default=250, help="(b): rows per block")
    parser.add_argument("--memory-budget-mib", type=float, default=4, help="(b): resources.object_store_memory")
    parser.add_argument("--memory-wave", type=int, default=100, help="(b): resources.blocks_per_wave")
    parser.add_argument("--skip", choices=["scheduling", "memory", "cost"], nargs="*", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-capacity-"))
    print(f"work folder: {work}", flush=True)
    cfg = load_config(REPO / args.config)
    profile = load_profile(REPO / args.profile)
    lines = [f"profile: {args.profile}: {profile.gpu}, {profile.source.kind}"]
    achieved: dict[int, float] = {}
    if "scheduling" not in args.skip:
        scheduling_lines, achieved = scheduling(args, cfg, profile, work)
        lines += scheduling_lines
    if "memory" not in args.skip:
        lines += memory(args, work)
    if "cost" not in args.skip:
        lines += cost(args, cfg, profile, achieved)
    print("\n".join(["", "=== benchmarks/capacity.py ===", *lines]))


def simulate(args, gpus: int, split: str, rows: int, time_scale: float, output: Path, sets: list[str] = ()):
    command = [
        "simulate", "--config", args.config, "--profile", args.profile, "--gpus", str(gpus), "--split", split,
        "--rows", str(rows), "--output", str(output), "--time-scale", f"{time_scale:.6g}",
    ]
    for item in sets:
        command += ["--set", item]
    run = run_driver(command, output.with_suffix(".log"))
    summary = json.loads((output / SIMULATION_DIR / SIMULATION_FILE).read_text())
    return run, summary


# --- (a) -------------------------------------------------------------------------------------------


def scheduling(args, cfg, profile, work: Path) -> tuple[list[str], dict[int, float]]:
    stages = stage_rates(cfg, profile)
    block = cfg.resources.rows_per_block
    lines = [
        f"(a) simulated clusters, {args.config}, blocks of {block} rows; achieved = steady-state pairs/s "
        "(least squares over shard commits, 20%-80% of the pairs), in cluster time"
    ]
    header = f"    {'GPUs':>5s} {'split':6s} {'rows':>6s} {'scale':>7s} {'wall s':>7s} {'bound/s':>8s} {'achieved/s':>10s} {'ratio':>6s}  replicas"
    lines.append(header)
    print(header, flush=True)
    achieved: dict[int, float] = {}
    bounds: dict[tuple[int, str], float] = {}
    for gpus in args.gpus:
        for split in args.splits:
            replicas = replicas_for_split(cfg, profile, gpus, split)
            bound = split_bound(stages, replicas)
            bounds[gpus, split] = bound
            rows = args.waves * block * max(replicas.values())
            # Cluster seconds of the run at its bound, squeezed into about target_seconds here, but never
            # more than max_blocks_per_s blocks per second for Ray Data to schedule on 2 cores.
            time_scale = max(args.target_seconds * bound / rows, bound / (block * args.max_blocks_per_s))
            run, summary = simulate(args, gpus, split, rows, time_scale, work / f"sim-{gpus}-{split}")
            steady = summary["steady_pairs_per_s"]
            ratio = summary["ratio"]
            if split == "plan" and steady is not None:
                achieved[gpus] = steady
            line = (
                f"    {gpus:5d} {split:6s} {rows:6d} {time_scale:7.4f} {run.seconds:7.1f} {bound:8.3f} "
                f"{'n/a' if steady is None else f'{steady:10.3f}':>10s} {'n/a' if ratio is None else f'{ratio:6.3f}':>6s}  "
                + " ".join(f"{n}" for n in replicas.values())
                + f"  (pairs {summary['counts']['pairs']}/{rows}, failed {summary['counts']['failed']})"
            )
            lines.append(line)
            print(line, flush=True)
    lines.append(f"    replicas in stage order: {', '.join(s.name for s in stages)}")
    for gpus in args.gpus:
        if (gpus, "plan") in bounds and (gpus, "equal") in bounds:
            lines.append(
                f"    {gpus} GPUs: plan bound / equal bound = {bounds[gpus, 'plan']:.3f} / {bounds[gpus, 'equal']:.3f} "
                f"= {bounds[gpus, 'plan'] / bounds[gpus, 'equal']:.2f}"
            )
    return lines, achieved


# --- (b) -------------------------------------------------------------------------------------------


def memory(args, work: Path) -> list[str]:
    small, large = args.memory_rows
    runs, waves = {}, {}
    for rows in (small, large):
        # The model stages take 1/10000 of their cluster time: the run is as fast as 2 cores move rows.
        run, summary = simulate(
            args, args.memory_gpus, "plan", rows, 1e-4, work / f"memory-{rows}",
            [
                f"resources.rows_per_block={args.memory_block}",
                f"resources.object_store_memory={int(args.memory_budget_mib * 2**20)}",
                f"resources.blocks_per_wave={args.memory_wave}",
            ],
        )
        runs[rows] = run
        waves[rows] = wave_process_peak_mib(work / f"memory-{rows}")
        print(
            f"  {rows} rows: driver peak RSS {run.peak_rss_mib:.0f} MiB + wave process {waves[rows]:.0f} MiB, "
            f"object store peak {run.object_store_peak_mib:.1f} MiB, {run.seconds:.0f} s, {summary['counts']['pairs']} pairs",
            flush=True,
        )

    def rss_line(label: str, small_mib: float, large_mib: float, target: str = "") -> str:
        return f"    {label}: {small} rows {small_mib:.0f} MiB, {large} rows {large_mib:.0f} MiB: growth {100 * (large_mib / small_mib - 1):+.1f}%{target}"

    small_peak = max(runs[small].object_store_peak_mib, 1e-9)
    store = runs[large].object_store_peak_mib / small_peak - 1
    width = len(runs[small].object_store_samples_mib)
    peaks = window_peaks(runs[large].object_store_samples_mib, width)
    late = statistics.median(peaks[-max(1, len(peaks) // 10):])
    return [
        f"(b) memory, simulate on {args.memory_gpus} fake GPUs (plan split), blocks of {args.memory_block} rows, "
        f"object store budget {args.memory_budget_mib:g} MiB, waves of {args.memory_wave} blocks:",
        rss_line("driver side's peak RSS (driver + wave process)", *(runs[n].peak_rss_mib + waves[n] for n in (small, large)), " (target < 20%)"),
        rss_line("  the driver alone", runs[small].peak_rss_mib, runs[large].peak_rss_mib),
        rss_line("  the wave process alone (the biggest wave's)", waves[small], waves[large]),
        f"    object store, peak of the {large}-row run's stretches as long as the {small}-row run ({len(peaks)} of {width} "
        f"samples): median {statistics.median(peaks):.1f} MiB, {late:.1f} MiB in its last tenth, vs {small_peak:.1f} MiB: "
        f"growth {100 * (late / small_peak - 1):+.1f}% (target < 20%)",
        f"    object store, whole-run peak: {small} rows {small_peak:.1f} MiB, {large} rows "
        f"{runs[large].object_store_peak_mib:.1f} MiB: {100 * store:+.1f}% (a longer run samples more of the same spikes)",
        f"    wall: {runs[small].seconds:.0f} s and {runs[large].seconds:.0f} s",
    ]


def window_peaks(samples: list[float], width: int) -> list[float]:
    """The peak of each consecutive stretch of `width` samples (a shorter last one dropped): the peaks a
    run as long as `width` samples would have seen, one after the other."""
    width = max(1, width)
    return [max(samples[start : start + width]) for start in range(0, max(1, len(samples) - width + 1), width)] if samples else [0.0]


# --- (c) -------------------------------------------------------------------------------------------


def cost(args, cfg, profile, achieved: dict[int, float]) -> list[str]:
    stages = stage_rates(cfg, profile)
    price = profile.gpu_hour_usd
    ideal = PAIRS_PER_TABLE * sum(s.gpus / s.rows_per_s for s in stages) / 3600

    def row(label: str, gpu_hours: float) -> str:
        return (
            f"    {label:44s} {gpu_hours:9.1f} {gpu_hours * price.spot:10.0f} {gpu_hours * price.on_demand:10.0f}"
        )

    lines = [
        f"(c) cost per {PAIRS_PER_TABLE} pairs, {profile.gpu} at ${price.spot}/GPU-h spot, ${price.on_demand}/GPU-h on demand "
        f"(profile: {profile.source.kind})",
        f"    {'':44s} {'GPU-hours':>9s} {'spot $':>10s} {'on-dem. $':>10s}",
        row("ideal: every GPU busy (sum of GPU-s per row)", ideal),
    ]
    for s in stages:
        lines.append(row(f"  of which {s.name}", PAIRS_PER_TABLE * s.gpus / s.rows_per_s / 3600))
    for gpus in args.gpus:
        replicas = replicas_for_split(cfg, profile, gpus, "plan")
        bound = split_bound(stages, replicas)
        used = split_gpus(stages, replicas)
        hours = PAIRS_PER_TABLE / bound / 3600
        lines.append(row(f"plan on {gpus} GPUs at its bound ({hours:.1f} h wall)", used * hours))
        if gpus in achieved:
            sim_hours = PAIRS_PER_TABLE / achieved[gpus] / 3600
            lines.append(row(f"plan on {gpus} GPUs as simulated ({sim_hours:.1f} h wall)", used * sim_hours))
    lines += [
        "    Assumptions: every row becomes a pair (ties and filters drop a few in practice: divide by the",
        "    pair yield); the profile's per-batch times hold at scale; GPUs are paid for the whole run, idle",
        "    or not; not counted: the CPU head node, storage and egress, model download and load time per",
        "    replica (minutes), autoscaler start-up, and the rows lost in flight when a spot node is preempted",
        "    (redone by a resume). Prices are the profile's list prices and vary by region and month.",
        f"    {'' if profile.source.kind == 'measured' else 'The per-stage numbers are ESTIMATES (see the profile file), not measurements.'}",
    ]
    return [line for line in lines if line.strip()]


if __name__ == "__main__":
    main()
