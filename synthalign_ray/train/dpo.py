"""The per-worker DPO loop: TRL's DPOTrainer with PEFT LoRA and DeepSpeed, inside a Ray Train worker.

Ray Train's TorchTrainer starts `train_worker` in every worker with torch.distributed already set up
(gloo on CPU, NCCL on GPU); the HF Trainer under TRL picks that up, so each worker is one data-parallel
rank and DeepSpeed (configured through `DPOConfig(deepspeed=...)`) partitions optimizer states and
gradients across them (ZeRO-2 by default, as the paper). With LoRA the reference model is the base
model with its adapters disabled (TRL does this when `ref_model` is None for a PEFT model): no second
copy. `finetune: full` trains every language-model weight against a separate frozen copy; the vision
tower and the projector stay frozen, as in the paper.

Checkpoints: every `run.checkpoint_every` steps each worker hands its part of the HF checkpoint (rank 0
the adapter and trainer state, every rank its ZeRO shards and RNG state) to `ray.train.report`, which
merges them into one checkpoint folder in the run's storage, and then deletes its local copy. A
restarted worker group (a worker died) or a rerun of the same command (same run name and storage)
gets the latest one from `ray.train.get_checkpoint()` and resumes the HF Trainer from it: optimizer,
scheduler, data position and log history included.

Spot notices: when Ray Train reports that a node of the run is being drained for preemption, every
worker saves a checkpoint at the end of that step (`preemption_checkpoint_callback`), within the
notice's deadline as long as a step and a checkpoint fit in it.

Chaos testing: `SYNTHALIGN_INJECT_FAULTS=train:rank1-step5` (in `run.env`) SIGKILLs worker rank 1 right
after optimizer step 5, in an attempt that started from scratch (a resumed attempt runs on), so the
restart-from-checkpoint path runs for real.

At the end rank 0 writes the adapter with the processor files, the training log and loss plot, and
(with `merge: true`) the merged model.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
import tempfile
from typing import Any

from synthalign_ray.errors import UserError
from synthalign_ray.train.config import TrainConfig

log = logging.getLogger(__name__)

# Module-name parts of the image side of LVLMs (LLaVA / LLaVA-NeXT / Qwen-VL / Idefics layouts).
VISION_PARTS = ("vision_tower", "vision_model", "multi_modal_projector", "mm_projector", "visual", "image_newline")
ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
FULL_MODEL_DIR = "model"
CHECKPOINT_DIR = "checkpoint"  # the HF checkpoint inside a Ray checkpoint folder
WORKER_RESULT_FILE = "train_worker_result.json"  # rank 0's last attempt: final step, where it resumed
ATTEMPTS_FILE = "train_attempts.json"  # each attempt's first and last step, kept across restarts


class LoraTargetError(UserError, ValueError):
    """LoRA target modules that match nothing, or match the vision side without `lora.allow_vision`."""


def is_vision_module(name: str) -> bool:
    return any(part in VISION_PARTS for part in name.split("."))


def freeze_vision(model) -> list[str]:
    """Freeze the vision tower and the projector, as the paper's full fine-tuning does (it tunes the
    language model only); returns the names of the parameters frozen."""
    frozen = []
    for name, parameter in model.named_parameters():
        if is_vision_module(name):
            parameter.requires_grad_(False)
            frozen.append(name)
    return frozen


def policy_and_reference(model_path: str, cfg: TrainConfig):
    """What DPOTrainer gets: (policy, reference model, PEFT config). LoRA: the base model and its LoRA
    config, no reference (TRL disables the adapters for it). Full: the policy with its vision side
    frozen (`freeze_vision`) and a separate copy as the reference."""
    model = load_model(model_path, cfg)
    if cfg.finetune == "lora":
        lora_targets(model, cfg)
        return model, None, lora_config(cfg)
    freeze_vision(model)
    return model, load_model(model_path, cfg), None


def lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    from synthalign_ray.base import split_revision

    lora = cfg.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
        task_type="CAUSAL_LM",
        # The base's pinned revision, saved in adapter_config.json next to base_model_name_or_path (the
        # repo id): PEFT loads that revision for the adapter, and `synthalign merge` merges into it.
        revision=split_revision(cfg.model)[1],
    )


def lora_targets(model, cfg: TrainConfig) -> list[str]:
    """The module names LoRA will wrap (PEFT's own matching rule); refuses vision modules unless allowed."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    config = lora_config(cfg)
    targets = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and check_target_module_exists(config, name)
    ]
    if not targets:
        raise LoraTargetError(f"lora.target_modules {cfg.lora.target_modules!r} match no linear layer of {cfg.model}")
    vision = [name for name in targets if is_vision_module(name)]
    if vision and not cfg.lora.allow_vision:
        raise LoraTargetError(
            f"lora.target_modules {cfg.lora.target_modules!r} match {len(vision)} vision-tower/projector "
            f"module(s), e.g. {vision[0]}; the paper keeps them frozen (set lora.allow_vision: true to train them)"
        )
    return targets


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any] | None:
    """DeepSpeed's config for the HF Trainer; "auto" values are filled from DPOConfig by transformers."""
    settings = cfg.deepspeed
    if not settings.enabled:
        return None
    zero: dict[str, Any] = {"stage": settings.zero_stage}
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.scaling.use_gpu}
    if settings.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # whole weights in save_model
    return {
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_allow_untested_optimizer": True,
    }


def dpo_args(cfg: TrainConfig, output_dir: str, max_steps: int | None = None):
    """trl.DPOConfig of a worker: the config's trl arguments as they are, and what this tool sets itself."""
    from trl import DPOConfig

    args = cfg.trl_args()
    if max_steps is not None:
        args["max_steps"] = max_steps
    return DPOConfig(
        **args,
        output_dir=output_dir,
        use_cpu=not cfg.scaling.use_gpu,
        deepspeed=deepspeed_config(cfg),
        save_strategy="steps",
        save_steps=cfg.run.checkpoint_every,
    )


def load_model(path: str, cfg: TrainConfig):
    """The LVLM at `path`: a folder, or a hub id (`org/name@REV` loads that revision)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from synthalign_ray.base import pretrained_source

    dtype = torch.bfloat16 if cfg.use_bf16() else torch.float32
    source, pinned = pretrained_source(path)
    return AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, **pinned)


def report_checkpoint_callback():
    """A TrainerCallback that hands each saved HF checkpoint to Ray Train, then frees the local copy."""
    import ray.train
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    class ReportCheckpointToRay(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved = get_last_checkpoint(args.output_dir)  # None on a rank that wrote no part of it
            metrics = {"step": state.global_step, "epoch": state.epoch or 0.0}
            metrics.update({k: v for k, v in (state.log_history[-1] if state.log_history else {}).items() if k != "step"})
            with tempfile.TemporaryDirectory(prefix="synthalign-ckpt-") as folder:
                checkpoint = None
                if saved is not None:
                    shutil.move(saved, os.path.join(folder, CHECKPOINT_DIR))
                    checkpoint = ray.train.Checkpoint.from_directory(folder)
                ray.train.report(metrics, checkpoint=checkpoint)  # a barrier: every rank reports

    return ReportCheckpointToRay()


def preemption_checkpoint_callback(rank: int):
    """A TrainerCallback that saves a checkpoint at the end of the step in which Ray Train reports a spot
    notice for a node of this run (`ray.train.get_preemption_info`: a node drained for preemption, with
    its deadline), so the restart resumes from there instead of from the last periodic checkpoint.
    Training goes on after it, as Ray advises. Every rank asks at every step end: the call is a barrier,
    and its answer is the same on every rank, so every rank saves at the same step."""
    import ray.train
    from transformers import TrainerCallback

    class CheckpointOnPreemptionNotice(TrainerCallback):
        def __init__(self):
            self.handled = None

        def on_step_end(self, args, state, control, **kwargs):
            notice = ray.train.get_preemption_info()
            if notice is not None and notice != self.handled:
                self.handled = notice
                control.should_save = True  # the checkpoint callback hands it to Ray Train
                log.warning(
                    "rank %d: preemption notice for node(s) %s (ranks %s, deadline %s ms): checkpoint at step %d",
                    rank, notice.preempted_node_ids, notice.preempted_ranks, notice.deadline_ms, state.global_step,
                )  # fmt: skip

    return CheckpointOnPreemptionNotice()


def step_clock_callback():
    """Wall-clock time at the end of each optimizer step of this attempt (time to first step, speed)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.step_end_unix: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            self.step_end_unix[state.global_step] = time.time()

    return StepClock()


def steps_redone(attempts: list[dict[str, int]]) -> int:
    """Optimizer steps that a restart ran again: what each attempt reached beyond the checkpoint the next
    one resumed from."""
    return sum(max(0, before["to_step"] - after["from_step"]) for before, after in zip(attempts, attempts[1:]))


def attempts_callback(output: str):
    """A TrainerCallback for rank 0: this attempt's first step (where it resumed) and its last finished
    one, appended to the earlier attempts in OUTPUT's ATTEMPTS_FILE and written after every step, so a
    killed attempt leaves its last step behind for the next one to count what it redoes."""
    from pyarrow import fs as pafs
    from transformers import TrainerCallback

    from synthalign_ray import store

    uri = store.join(output, ATTEMPTS_FILE)
    fs, path = store.filesystem(uri)
    earlier = store.read_json(uri)["attempts"] if fs.get_file_info(path).type == pafs.FileType.File else []

    class Attempts(TrainerCallback):
        def __init__(self):
            self.attempts = list(earlier)

        def on_train_begin(self, args, state, control, **kwargs):  # after a checkpoint's state is loaded
            self.attempts.append({"from_step": state.global_step, "to_step": state.global_step})

        def on_step_end(self, args, state, control, **kwargs):
            self.attempts[-1]["to_step"] = state.global_step
            store.write_json(uri, {"attempts": self.attempts})

    return Attempts()


def kill_at_step_callback(rank: int):
    """The SIGKILL fault of SYNTHALIGN_INJECT_FAULTS for this rank (see the module docstring), or None."""
    from transformers import TrainerCallback

    from synthalign_ray.base import injected_faults

    steps = [int(f.split("-step", 1)[1]) for f in injected_faults("train") if f.startswith(f"rank{rank}-step")]
    if not steps:
        return None

    class KillAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in steps:
                log.warning("rank %d: injected fault: SIGKILL at step %d", rank, state.global_step)
                os.kill(os.getpid(), signal.SIGKILL)

    return KillAtStep()


def train_worker(job: dict[str, Any]) -> None:
    """The Ray Train worker function. `job`: config (dict), files, image_column, skip_rows, output (local
    folder or URI), max_steps (None: the config's)."""
    import ray.train
    from transformers import AutoProcessor, TrainerState, set_seed
    from trl import DPOTrainer

    from synthalign_ray.base import model_source, pretrained_source
    from synthalign_ray.train import data
    from synthalign_ray.train.log import step_records

    started = time.time()
    cfg = TrainConfig.model_validate(job["config"])
    rank = ray.train.get_context().get_world_rank()
    # Resolved on the worker's node: a hub id downloads into that node's HF cache (at its revision where
    # pinned: org/name@REV), a zoo model is built there.
    model_path = model_source(cfg.model)
    source, pinned = pretrained_source(model_path)
    processor = AutoProcessor.from_pretrained(source, **pinned)
    dataset = data.load_pairs(job["files"], job["image_column"])
    if job["skip_rows"]:
        skip = set(job["skip_rows"])
        dataset = dataset.select([i for i in range(len(dataset)) if i not in skip])
    dataset = data.render_pairs(dataset, processor, cfg.prompt_format)

    set_seed(cfg.trl_args()["seed"])  # the same LoRA init on every worker and in every run
    model, ref_model, peft_config = policy_and_reference(model_path, cfg)

    # A fresh local folder per worker and attempt: a crashed attempt's unregistered checkpoints must not
    # be mistaken for the latest one.
    local = tempfile.mkdtemp(prefix=f"synthalign-dpo-rank{rank}-")
    checkpoint = ray.train.get_checkpoint()
    clock = step_clock_callback()
    callbacks = [report_checkpoint_callback(), clock, preemption_checkpoint_callback(rank)]
    if checkpoint is None and (fault := kill_at_step_callback(rank)) is not None:
        callbacks.append(fault)
    try:
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=dpo_args(cfg, os.path.join(local, "hf"), job.get("max_steps")),
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
            callbacks=callbacks,
        )
        attempts = attempts_callback(job["output"]) if rank == 0 else None
        if attempts is not None:
            trainer.add_callback(attempts)
        resumed_from_step = None
        if checkpoint is None:
            trainer.train()
        else:
            with checkpoint.as_directory() as folder:
                hf_checkpoint = os.path.join(folder, CHECKPOINT_DIR)
                resumed_from_step = TrainerState.load_from_json(os.path.join(hf_checkpoint, "trainer_state.json")).global_step
                log.info("rank %d: resuming from %s (step %d)", rank, checkpoint.path, resumed_from_step)
                trainer.train(resume_from_checkpoint=hf_checkpoint)

        final = os.path.join(local, "final")
        trainer.save_model(final)  # every rank: ZeRO-3 gathers the weights here
        if rank != 0:
            return
        processor.save_pretrained(final)
        worker_result = {
            "global_step": trainer.state.global_step,
            "resumed_from_step": resumed_from_step,
            "attempts": attempts.attempts,
            "steps_redone": steps_redone(attempts.attempts),
            "worker_started_unix": started,
            "step_end_unix": clock.step_end_unix,
        }
        write_outputs(job["output"], cfg, step_records(trainer.state.log_history), final, model_path, worker_result)
    finally:
        shutil.rmtree(local, ignore_errors=True)


def write_outputs(
    output: str, cfg: TrainConfig, records: list[dict[str, Any]], final: str, model_path: str, worker_result: dict[str, Any]
) -> None:
    """Rank 0's files in OUTPUT (a local folder or URI) at the end of a run: the training log and loss
    plot, the adapter (or the full model) from the local folder FINAL, the merged model, and last the
    worker result, whose presence (read by the driver) says this attempt wrote everything else. Paths are
    joined with `store.join`, so a URI's query (s3://bucket/run?endpoint_override=...) stays at the end."""
    from synthalign_ray.store import join, write_json
    from synthalign_ray.train.log import LOG_FILE, PLOT_FILE, plot_loss, write_log
    from synthalign_ray.train.merge import copy_tree, merge_adapter

    write_log(records, join(output, LOG_FILE))
    if records:
        plot_loss(records, join(output, PLOT_FILE), title=f"DPO {cfg.run.name}: {cfg.model}")
    if cfg.finetune == "full":
        copy_tree(final, join(output, FULL_MODEL_DIR))
    else:
        copy_tree(final, join(output, ADAPTER_DIR))
        if cfg.merge:
            dtype = "bfloat16" if cfg.use_bf16() else "float32"
            merge_adapter(model_path, final, join(output, MERGED_DIR), dtype=dtype)
    write_json(join(output, WORKER_RESULT_FILE), worker_result)
