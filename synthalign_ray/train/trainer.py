"""The driver side of DPO training: check everything, then run the workers on Ray Train.

    result = train(load_train_config("configs/train_tiny.yaml"), data="runs/tiny", output="runs/tiny-dpo")

1. Before any worker starts: the config is validated (by its loader), the base model's processor is
   loaded and every pair is checked with it (`data.check_pairs`), and the LoRA targets are matched
   against the model's module names on the meta device (no weights loaded, so this is instant for 7B).
   On a Ray cluster of several nodes, a local OUTPUT or `run.storage_path` is refused unless
   `run.shared_filesystem` says every node mounts it.
2. A TorchTrainer runs `dpo.train_worker` on `scaling.num_workers` workers. Its RunConfig gives the run
   a name and a storage path (default OUTPUT/ray) where checkpoints go, and a FailureConfig: a worker
   that dies restarts the group from the latest checkpoint. Rerunning the same command finds the same
   run in storage and resumes it (Train V2: `ray.train.get_checkpoint()` in the workers); a changed
   config on an existing output is refused unless `overwrite`.
3. OUTPUT gets `adapter/` (or `model/` for full fine-tuning), `merged/`, `train_log.jsonl`, `loss.png`
   from rank 0, and `train_summary.json` (config, data counts, versions, final metrics, timings, and
   each attempt's first and last step with the steps a restart ran again: `train_attempts.json`, which
   rank 0 rewrites after every step).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from pyarrow import fs as pafs

from synthalign_ray import store
from synthalign_ray.base import model_source, pretrained_source
from synthalign_ray.errors import UserError
from synthalign_ray.train import data as train_data
from synthalign_ray.train.config import TrainConfig
from synthalign_ray.train.dpo import ATTEMPTS_FILE, WORKER_RESULT_FILE, lora_targets, train_worker

log = logging.getLogger(__name__)

CONFIG_FILE = "train_config.json"
SUMMARY_FILE = "train_summary.json"


class TrainRunError(UserError, ValueError):
    """A training run that cannot start as asked (e.g. an existing output with another config)."""


@dataclass
class TrainResult:
    output: str
    data: train_data.DataReport
    metrics: dict[str, Any]
    checkpoint: str | None
    seconds: float
    worker: dict[str, Any]  # rank 0's last attempt: global_step, resumed_from_step (None: from scratch)


def _output_uri(output: str) -> str:
    return output if "://" in output else os.path.abspath(os.path.expanduser(output))


def storage_path(cfg: TrainConfig, output: str) -> str:
    path = cfg.run.storage_path or store.join(_output_uri(output), "ray")
    return path if "://" in path else os.path.abspath(os.path.expanduser(path))


def check_lora_on_meta(model_path: str, cfg: TrainConfig) -> list[str]:
    """LoRA target modules of the model (a folder, or a hub id pinned or not: only its config is read),
    matched on an empty (meta-device) instance of its architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    source, pinned = pretrained_source(model_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(source, **pinned))
    return lora_targets(model, cfg)


def _claim_output(cfg: TrainConfig, data: str, output: str, overwrite: bool) -> None:
    """Record the run's config in OUTPUT; an existing run with another config or data is refused."""
    uri = store.join(_output_uri(output), CONFIG_FILE)
    wanted = {"config": cfg.model_dump(mode="json"), "data": data}
    fs, path = store.filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound and not overwrite:
        existing = store.read_json(uri)
        if existing != json.loads(json.dumps(wanted)):
            raise TrainRunError(
                f"{output} holds a training run with another config or data ({CONFIG_FILE}); "
                "use another output, or --overwrite to start afresh"
            )
    if overwrite:
        run_folder = store.join(storage_path(cfg, output), cfg.run.name)
        run_fs, run_path = store.filesystem(run_folder)
        if run_fs.get_file_info(run_path).type == pafs.FileType.Directory:
            run_fs.delete_dir(run_path)
        store.delete_file(store.join(_output_uri(output), ATTEMPTS_FILE))  # the discarded run's attempts
    store.write_json(uri, wanted)


def prepare(cfg: TrainConfig, data: str) -> tuple[str, train_data.DataReport]:
    """Everything checked before workers start; returns the model path or hub id (`org/name@REV` where
    pinned) and the data report. Only the processor and config files are read here, at the pinned
    revision: the driver never downloads the weights."""
    from transformers import AutoProcessor

    model_path = model_source(cfg.model)
    source, pinned = pretrained_source(model_path)
    processor = AutoProcessor.from_pretrained(source, **pinned)
    report = train_data.check_pairs(
        data, processor, cfg.model, cfg.trl_args()["max_length"], cfg.too_long, cfg.prompt_format
    )
    if report.skipped_too_long:
        log.warning(
            "%s: skipping %d of %d pairs longer than trl.max_length %d",
            data, len(report.skipped_too_long), report.rows, cfg.trl_args()["max_length"],
        )  # fmt: skip
    if cfg.finetune == "lora":
        check_lora_on_meta(model_path, cfg)
    return model_path, report


def train(
    cfg: TrainConfig, data: str, output: str, *, overwrite: bool = False, max_steps: int | None = None
) -> TrainResult:
    """Train on DATA's pairs into OUTPUT (see the module docstring). `max_steps` overrides the config's
    (the benchmark and tests stop runs early with it without changing the run's identity)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    started = time.monotonic()
    worker_env = cfg.run.worker_env()  # a missing secret fails here, before anything is written
    model_path, report = prepare(cfg, data)
    if not ray.is_initialized():
        ray.init(address=cfg.run.ray_address)
    for label, location in (("--output", _output_uri(output)), ("run.storage_path", cfg.run.storage_path)):
        if location is not None:
            store.check_seen_by_every_node(
                location, cfg.run.shared_filesystem, label=label, shared_field="run.shared_filesystem",
                written="checkpoints and adapter",
            )  # fmt: skip
    _claim_output(cfg, data, output, overwrite)
    worker_result = store.join(_output_uri(output), WORKER_RESULT_FILE)
    store.delete_file(worker_result)  # a previous run's: never read it as this one's
    args = cfg.trl_args()
    log.info(
        "global batch: %d pairs per optimizer step (%d workers x %d per device x gradient accumulation %d)%s",
        cfg.global_batch(), cfg.scaling.num_workers, args["per_device_train_batch_size"], args["gradient_accumulation_steps"],
        "" if cfg.global_batch_size else "; set global_batch_size to keep it when num_workers changes",
    )

    resources = {"CPU": cfg.scaling.cpus_per_worker, **cfg.scaling.resources_per_worker}
    if cfg.scaling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "files": report.files,
            "image_column": report.image_column,
            "skip_rows": report.skipped_too_long,
            "output": _output_uri(output),
            "max_steps": max_steps,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=storage_path(cfg, output),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            worker_runtime_env={"env_vars": worker_env} if worker_env else None,
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        failures = [*getattr(error, "worker_failures", {}).values(), getattr(error, "controller_failure", error)]
        denied = store.denial_in(failures)
        if denied is None:
            raise
        # Refused by the output's storage: the node's identity, not the code, is what must change.
        raise TrainRunError(
            f"training stopped: a node running it may not write its output ({denied}). Ray Train's workers write "
            f"checkpoints to {storage_path(cfg, output)} and rank 0 the adapter: give each node type that runs "
            "training workers the output's credentials (docs/cluster.md#credentials); a rerun resumes from the last "
            "checkpoint"
        ) from None
    seconds = time.monotonic() - started
    metrics = dict(result.metrics or {})
    checkpoint = result.checkpoint.path if result.checkpoint else None
    worker = store.read_json(worker_result)
    if worker["steps_redone"]:
        log.warning(
            "%d optimizer steps were run again after restarts (attempts from/to step: %s)",
            worker["steps_redone"], ", ".join(f"{a['from_step']}-{a['to_step']}" for a in worker["attempts"]),
        )  # fmt: skip
    store.write_json(
        store.join(_output_uri(output), SUMMARY_FILE),
        {
            "config": cfg.model_dump(mode="json"),
            "data": {"source": data, **report.summary()},
            "model_path": model_path,
            "versions": store.package_versions(),
            "last_checkpoint": checkpoint,
            "last_checkpoint_metrics": metrics,
            "worker": worker,
            "seconds": round(seconds, 1),
        },
    )
    return TrainResult(output=output, data=report, metrics=metrics, checkpoint=checkpoint, seconds=seconds, worker=worker)
