"""The accounting of a run: every valid input row in the output exactly once, as a pair, a drop or a
failure; the rows whose block Ray Data gave up on recorded failed; the counts the manifest and the
`generate` command report.

`pipeline.run_leased` calls it after the waves; the report's tests call `accounting` on any output.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from synthalign_ray import store
from synthalign_ray.base import STATUS_DROPPED, STATUS_FAILED, STATUS_OK, with_failures
from synthalign_ray.ids import IdSet, digests
from synthalign_ray.stages.prompts import INPUT_SCHEMA, PromptCheck

log = logging.getLogger(__name__)

# A row whose block Ray Data gave up on (resources.max_lost_blocks): its task failed past Ray's retries
# before any stage could record the row's own outcome.
LOST_STAGE = "ray"
LOST_ERROR = (
    "LostBlock: the block holding this row failed after Ray's retries; the Ray logs say why; a rerun tries it again"
)


# A row its node was refused to write (store.write_denied): the driver records it failed, with the node and cause.
WRITE_STAGE = "write"


class AccountingError(RuntimeError):
    """The output does not hold every input row exactly once: a bug, never a user error."""


def failed_fraction(counts: dict[str, Any]) -> float:
    """Failed rows over the rows of the run's input (0 for no rows)."""
    return counts["failed"] / counts["rows"] if counts["rows"] else 0.0


def failure_report(counts: dict[str, Any], failures: dict[str, dict[str, Any]], max_fraction: float) -> list[str]:
    """What `generate` prints when more than `max_fraction` of the rows failed: the totals, then per stage its
    rows and most common errors."""
    lines = [
        f"{counts['failed']} of {counts['rows']} rows failed ({failed_fraction(counts):.1%}), more than "
        f"resources.max_failed_fraction ({max_fraction:.1%}). Every row is written; a rerun retries the failed ones."
    ]
    for stage, summary in failures.items():
        lines.append(f"  {stage}: {summary['rows']} rows")
        lines += [f"    {rows} x {message}" for message, rows in summary["errors"]]
    return lines


def lost_rows(prompts, written: IdSet | store.Outcomes, denied: Mapping[str, str] | None = None):
    """The rows of `prompts` (a block of the pipeline's input) with no shard in the output, as failed rows: by
    `write` with the error of a row in `denied` (id -> message), else as lost with their block."""
    denied = denied or {}
    prompts = prompts.select(INPUT_SCHEMA.names)  # without a group's `checkpoint:` columns
    lost = prompts.filter(~written.contains(digests(prompts["id"].to_pylist())))
    ids = dict(enumerate(lost["id"].to_pylist()))
    errors = {n: denied.get(row_id, LOST_ERROR) for n, row_id in ids.items()}
    return with_failures(lost, errors, {n: WRITE_STAGE if row_id in denied else LOST_STAGE for n, row_id in ids.items()})


def record_lost_rows(output: str, prompts_uris: list[str], written: store.Outcomes, denied: Mapping[str, list[str]]) -> int:
    """Writes to `failed/` the rows of this run that are in no shard: those whose node was refused the write
    (`denied`: message -> ids, from store.StatusSplitDatasink) and those Ray gave up on (their block was lost).
    Their count."""
    by_id = {row_id: message for message, ids in denied.items() for row_id in ids}
    for message, ids in denied.items():
        log.warning("%d rows could not be written and are recorded failed: %s", len(ids), message)
    total = 0
    for block in (block for uri in prompts_uris for block in store.read_blocks(uri)):
        lost = lost_rows(block, written, by_id)
        if lost.num_rows:
            with_block = [i for i in lost["id"].to_pylist() if i not in by_id]
            if with_block:
                log.warning("%d rows were lost with their block and are recorded failed, e.g. %s", len(with_block), with_block[:5])
            store.write_table(store.join(output, store.FOLDERS[STATUS_FAILED], store.shard_name(lost)), store.with_hf_features(lost))
            total += lost.num_rows
    return total


def accounting(output: str, check: PromptCheck, outcomes: store.Outcomes, this_run: dict, input_ids: Iterable[str]) -> dict[str, Any]:
    """Counts over the whole output (all runs of it), checked: every valid input id (`check.ids`, which
    `outcomes` is counted against) there exactly once. `input_ids` (lazy: read only to name rows with no
    outcome) are those ids."""
    if outcomes.input_ids != check.ids:
        raise ValueError("accounting needs the outcomes counted against the check's ids: store.output_counts(output, check.ids)")
    if outcomes.duplicates:
        raise AccountingError(f"{output}: ids written more than once: {outcomes.duplicates[:10]}")
    missing = outcomes.missing()
    if missing:
        examples = (i for i in input_ids if not outcomes.contains(digests([i]))[0])
        raise AccountingError(f"{output}: {missing} input rows have no outcome, e.g. {list(itertools.islice(examples, 10))}")
    status = outcomes.counts["status"]
    return {
        "input_rows": check.rows + len(check.bad),
        "rejected_input_rows": len(check.bad),
        "rows": check.rows,
        "pairs": status.get(STATUS_OK, 0),
        "dropped": status.get(STATUS_DROPPED, 0),
        "failed": status.get(STATUS_FAILED, 0),
        "dropped_by_reason": outcomes.counts["drop_reason"],
        "failed_by_stage": outcomes.counts["failed_stage"],
        # Rows of earlier runs of this output whose prompts are not in this input (e.g. a lower limit).
        "outside_input": len(outcomes.outside_input),
        "processed_this_run": sum(this_run["status"].values()),
    }
