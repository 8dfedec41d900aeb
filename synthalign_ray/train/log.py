"""The training log: one JSON line per logged optimizer step (loss and DPO rewards), and a loss plot.

Built from the trainer's `state.log_history` at the end of a run. A resumed run restores that history
from its checkpoint, so the log covers every step once, whatever restarts happened in between.
"""

from __future__ import annotations

import io
import json
from typing import Any

from synthalign_ray import store

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss.png"
# What TRL's DPOTrainer logs per step, besides the loss (trl 1.16 names).
STEP_KEYS = (
    "step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "num_tokens",
)  # fmt: skip


def step_records(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-step training entries of a log history (the final summary entry has no `loss`), one per
    step: a step logged twice (before and after a restart) keeps its last entry."""
    by_step: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            by_step[int(entry["step"])] = {key: entry[key] for key in STEP_KEYS if key in entry}
    return [by_step[step] for step in sorted(by_step)]


def write_log(records: list[dict[str, Any]], uri: str) -> None:
    """JSON lines to a local path or URI, written whole (temp file + move)."""
    text = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
    _write_bytes(uri, text.encode())


def read_log(uri: str) -> list[dict[str, Any]]:
    fs, path = store.filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return [json.loads(line) for line in stream.read().decode().splitlines() if line.strip()]


def plot_loss(records: list[dict[str, Any]], uri: str, title: str = "DPO training") -> None:
    """Loss and reward accuracy per step as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(steps, [r["loss"] for r in records], marker=".", color="tab:blue", label="loss")
    loss_axis.axhline(0.6931471805599453, color="tab:gray", linestyle=":", linewidth=1, label="ln 2 (start)")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("DPO loss")
    if any("rewards/accuracies" in r for r in records):
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot(
            steps, [r.get("rewards/accuracies") for r in records], color="tab:orange", alpha=0.6, label="reward accuracy"
        )
        accuracy_axis.set_ylabel("reward accuracy")
        accuracy_axis.set_ylim(-0.05, 1.05)
    loss_axis.legend(loc="upper right")
    loss_axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    _write_bytes(uri, buffer.getvalue())


def _write_bytes(uri: str, payload: bytes) -> None:
    import uuid

    fs, path = store.filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as out:
        out.write(payload)
    fs.move(tmp, path)
