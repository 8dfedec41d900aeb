"""The per-stage summary of a finished run, from Ray Data's own execution stats.

While a run goes, Ray Data prints one progress line per operator (rows, rate, actors); this module
turns its end-of-run stats (`Dataset.get_stats_summary()`, a `DatasetStatsSummary`: one entry per
physical operator, chained through `parents` from the source to the sink) into rows of a table:

    stage                                   rows in  rows out   wall s   busy s   rows/s  % of run
    MapBatches(ImageGenerator)                    6         6     9.81     9.20     0.61      14.0

- stage: Ray Data's operator name. Ray fuses consecutive task-based maps into one operator
  (`A->B->Write`), and a `ray.data.llm` processor is several operators (chat template, tokenize,
  vLLM engine, detokenize, ...).
- wall s: first task start to last task end of the operator. Actor start-up (model loading, a vLLM
  engine's ~20 s on a CPU) happens before an actor's first task, so it is not in here.
- busy s: the summed wall time of the operator's tasks (can exceed `wall s` when an actor runs several
  batches at once, as a vLLM engine does).
- rows/s: rows out / wall s, Ray Data's own "Ray Data throughput" of the operator.
- % of run: wall s / the execution time of the whole dataset. Stages stream side by side, so these
  overlap and do not add up to 100.

A write operator's own output is one small result row per write task, not data rows; its rows are the
rows it wrote, so for it `rows out` is its input rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterator

# Ray Data names the operator of `Dataset.write_datasink` "Write"; fused, it ends in "->Write".
WRITE_OPERATOR = "Write"


@dataclass(frozen=True)
class StageStats:
    stage: str
    rows_in: int | None  # None for a source operator (it reads, it has no input rows)
    rows_out: int
    wall_s: float
    busy_s: float
    rows_per_s: float
    share_of_run: float  # wall_s / execution time of the whole dataset, 0..1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stage_stats(summary) -> list[StageStats]:
    """One StageStats per operator of a `DatasetStatsSummary`, source first."""
    run_s = summary.time_total_s
    stages = []
    for operator, is_source in _operators(summary):
        rows_out = operator.output_num_rows.sum if operator.output_num_rows else 0
        # A read operator is not at the root of the chain (Ray Data gives it an input of 0 rows), but first.
        rows_in = None if is_source or not stages else (operator.total_input_num_rows or 0)
        if is_write(operator.operator_name):
            rows_out = rows_in or 0
        wall_s = operator.time_total_s or 0.0
        stages.append(
            StageStats(
                stage=operator.operator_name,
                rows_in=rows_in,
                rows_out=rows_out,
                wall_s=round(wall_s, 3),
                busy_s=round(operator.wall_time.sum if operator.wall_time else 0.0, 3),
                rows_per_s=round(rows_out / wall_s, 3) if wall_s > 0 else 0.0,
                share_of_run=round(wall_s / run_s, 4) if run_s > 0 else 0.0,
            )
        )
    return stages


def is_write(operator_name: str) -> bool:
    return operator_name.split("->")[-1] == WRITE_OPERATOR


def _operators(summary, seen: set[str] | None = None) -> Iterator[tuple[Any, bool]]:
    """(operator summary, is a source) over a stats chain, parents first; each operator once (a dataset
    used twice, e.g. by a union, is a parent twice)."""
    seen = set() if seen is None else seen
    for parent in summary.parents:
        yield from _operators(parent, seen)
    for operator in summary.operators_stats:
        key = f"{summary.dataset_uuid}/{summary.number}/{operator.operator_name}"
        if key in seen:
            continue
        seen.add(key)
        yield operator, not summary.parents


def run_stats(dataset) -> dict[str, Any]:
    """The manifest's record of a finished dataset's execution: its time and its stage rows."""
    # `get_stats_summary` (a DeveloperAPI of Dataset) follows a dataset consumed by `write_datasink` to
    # the executed write plan, whose operators are the whole pipeline's.
    summary = dataset.get_stats_summary()
    return {
        "execution_seconds": round(summary.time_total_s, 2),
        "stages": [stage.to_dict() for stage in stage_stats(summary)],
    }


def add_run_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `run_stats` of executions of the same graph one after the other (waves), as one: times and
    rows add up per stage, rates and shares are of the sums. No execution: nothing ran."""
    if len(runs) == 1:
        return runs[0]
    seconds = sum(run["execution_seconds"] for run in runs)
    stages = []
    for per_wave in zip(*(run["stages"] for run in runs)):
        rows_in = None if per_wave[0]["rows_in"] is None else sum(s["rows_in"] for s in per_wave)
        rows_out = sum(s["rows_out"] for s in per_wave)
        wall_s = sum(s["wall_s"] for s in per_wave)
        stage = StageStats(
            stage=per_wave[0]["stage"],
            rows_in=rows_in,
            rows_out=rows_out,
            wall_s=round(wall_s, 3),
            busy_s=round(sum(s["busy_s"] for s in per_wave), 3),
            rows_per_s=round(rows_out / wall_s, 3) if wall_s > 0 else 0.0,
            share_of_run=round(wall_s / seconds, 4) if seconds > 0 else 0.0,
        )
        stages.append(stage.to_dict())
    return {"execution_seconds": round(seconds, 2), "stages": stages}


def format_table(stages: list[StageStats], run_s: float | None = None) -> str:
    """The stage table as aligned text, one line per stage (and the run's execution time, if given)."""
    header = ("stage", "rows in", "rows out", "wall s", "busy s", "rows/s", "% of run")
    lines = [
        (
            s.stage,
            "-" if s.rows_in is None else str(s.rows_in),
            str(s.rows_out),
            f"{s.wall_s:.2f}",
            f"{s.busy_s:.2f}",
            f"{s.rows_per_s:.2f}",
            f"{100 * s.share_of_run:.1f}",
        )
        for s in stages
    ]
    rows = [header, *lines]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def render(cells) -> str:
        return "  ".join([cells[0].ljust(widths[0]), *(cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))])

    text = [render(row) for row in rows]
    if run_s is not None:
        text.append(f"execution time of the whole dataset: {run_s:.2f} s (stages overlap: they stream)")
    return "\n".join(text)
