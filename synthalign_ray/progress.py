"""The per-stage summary of a finished run, from Ray Data's own execution stats.

While a run goes, Ray Data prints one progress line per operator (rows, rate, actors); this module
turns its end-of-run stats (`Dataset.get_stats_summary()`, a `DatasetStatsSummary`: one entry per
physical operator, chained through `parents` from the source to the sink) into rows of a table, first
one per Ray Data operator (`run_stats`, the manifest's `operators`), then one per stage of the method
(`method_stage_rows`, the manifest's `stages`, the table `generate` prints):

    stage                  rows in  rows out   wall s   busy s   rows/s  % of run
    images                       6         6     9.81     9.20     0.61      14.0
    responses[llava-1.5]         6         6     0.69     0.92     8.70       1.0

- stage: the method's stage (`stages.graph`). Ray fuses consecutive task-based maps into one operator
  (`A->B->Write`); where it fused the maps of two stages, the row names both (`select_image +
  instructions`). A `ray.data.llm` processor is several operators (chat template, tokenize, vLLM
  engine, ...), one row.
- wall s: first task start to last task end of the stage's longest operator. Actor start-up (model
  loading, a vLLM engine's ~20 s on a CPU) happens before an actor's first task, so it is not in here.
- busy s: the summed wall time of the stage's tasks (can exceed `wall s` when an actor runs several
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
        "operators": [stage.to_dict() for stage in stage_stats(summary)],
    }


def add_run_stats(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The `run_stats` of executions of the same graph one after the other (waves), as one: times and
    rows add up per stage, rates and shares are of the sums. No execution: nothing ran."""
    if len(runs) == 1:
        return runs[0]
    seconds = sum(run["execution_seconds"] for run in runs)
    stages = []
    for per_wave in zip(*(run["operators"] for run in runs)):
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
    return {"execution_seconds": round(seconds, 2), "operators": stages}


def grouped_run_stats(runs_by_group: list[list[dict[str, Any]]], stages: list[tuple[str, tuple[str, ...]]]) -> dict[str, Any]:
    """The `run_stats` of a run whose rows went in groups of different graphs (`checkpoints.plan_todo`:
    the stages each group restores), the waves of each group one after the other: per group its operators
    (`add_run_stats`) and its stage table (`method_stage_rows`), each row with its group's number."""
    operators, table, seconds = [], [], 0.0
    for number, runs in enumerate(runs_by_group):
        if not runs:
            continue
        run = add_run_stats(runs)
        seconds += run["execution_seconds"]
        operators += [{**row, "group": number} for row in run["operators"]]
        table += [{**row, "group": number} for row in method_stage_rows(run["operators"], stages)]
    return {"execution_seconds": round(seconds, 2), "operators": operators, "stages": table}


# The row of the operator that reads the run's prompts file (Ray Data's source).
PROMPTS_ROW = "prompts"


def operator_udf(piece: str) -> str:
    """The function or class a Ray Data operator runs: `MapBatches(ImageGenerator)` -> `ImageGenerator`;
    an operator with no UDF (`ReadBlockFile`, `Write`) is its own name."""
    return piece[piece.index("(") + 1 : -1] if piece.endswith(")") and "(" in piece else piece


def claims(operators: tuple[str, ...], udf: str) -> bool:
    """Whether a stage that declares `operators` runs `udf`: its name, or a `[label]` suffix (the name of
    each operator `engines.vllm_engine.labelled` made for it)."""
    return udf in operators or any(name.startswith("[") and udf.endswith(name) for name in operators)


def stage_labels(operators: list[str], stages: list[tuple[str, tuple[str, ...]]]) -> list[str]:
    """The method's stage of each Ray Data operator (Ray's names, in pipeline order), given the pipeline's
    stages as (name, the operators it declares), in order.

    Each piece of a fused operator (`A->B->C`) names the stage that claims it, looking forward from the
    last stage named; a piece no stage claims (Ray's and the carry's glue maps, `Write`) belongs to the
    last stage named (before any: the read of the prompts). An operator is labelled by the stages its
    pieces name, joined by ` + ` where Ray fused maps of two stages into one."""
    labels = []
    current = None
    for operator in operators:
        named: list[str] = []
        for piece in operator.split("->"):
            udf = operator_udf(piece)
            start = 0 if current is None else current
            index = next((i for i in range(start, len(stages)) if claims(stages[i][1], udf)), None)
            if index is not None:
                current = index
                if stages[index][0] not in named:
                    named.append(stages[index][0])
        if not named:
            named = [PROMPTS_ROW if current is None else stages[current][0]]
        labels.append(" + ".join(named))
    return labels


def method_stage_rows(operators: list[dict[str, Any]], stages: list[tuple[str, tuple[str, ...]]]) -> list[dict[str, Any]]:
    """The stage table in the method's words, from the operator rows of `run_stats` and the pipeline's
    stages (`stage_labels`). Consecutive operators of one stage are one row: rows in of the first, rows
    out of the last, the longest wall time (the operator that bounds the stage's rate), the summed busy
    time."""
    rows: list[dict[str, Any]] = []
    for label, row in zip(stage_labels([row["stage"] for row in operators], stages), operators):
        if rows and rows[-1]["stage"] == label:
            merged = rows[-1]
            merged["rows_out"] = row["rows_out"]
            merged["wall_s"] = max(merged["wall_s"], row["wall_s"])
            merged["busy_s"] = round(merged["busy_s"] + row["busy_s"], 3)
            merged["share_of_run"] = max(merged["share_of_run"], row["share_of_run"])
            merged["rows_per_s"] = round(merged["rows_out"] / merged["wall_s"], 3) if merged["wall_s"] > 0 else 0.0
        else:
            rows.append({**row, "stage": label})
    return rows


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
