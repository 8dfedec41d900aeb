"""Typed DPO training configuration: YAML file + `--set a.b=c` overrides, validated before Ray starts.

The defaults are the paper's recipe (PDS-DPO, section 4 / official code): LoRA r128 alpha 256 on the
language model only, beta 0.1 sigmoid DPO loss, 2 epochs, lr 1e-5, gradient accumulation 4, DeepSpeed
ZeRO-2. Errors name the file and the dotted field, e.g.
``configs/train_tiny.yaml: deepspeed.zero_stage: Input should be less than or equal to 3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from synthalign_ray.config import WorkerEnvironment, load_config
from synthalign_ray.base import ModelRef, StrictModel

# The language model's attention and MLP projections, and nothing else: in LLaVA-style models a plain
# ["q_proj", "k_proj", "v_proj", "o_proj"] list also matches the CLIP vision tower's attention layers
# (measured), and the paper keeps the vision tower frozen. PEFT matches a string with re.fullmatch
# against every module name (e.g. `model.language_model.layers.0.self_attn.q_proj`).
LANGUAGE_MODEL_PROJECTIONS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class LoraSettings(StrictModel):
    r: int = Field(128, ge=1, description="LoRA rank (official PDS-DPO code: 128)")
    alpha: int = Field(256, ge=1, description="LoRA alpha (official PDS-DPO code: 256)")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout (TRL disables model dropout, not this)")
    target_modules: str | list[str] = Field(
        LANGUAGE_MODEL_PROJECTIONS,
        description="a regex (re.fullmatch over module names) or a list of module-name suffixes",
    )
    allow_vision: bool = Field(
        False, description="allow target modules inside the vision tower or projector (the paper keeps them frozen)"
    )


class DPOSettings(StrictModel):
    beta: float = Field(0.1, gt=0, description="DPO beta (paper: 0.1)")
    loss_type: str = Field("sigmoid", description="TRL loss type (paper: sigmoid, the original DPO loss)")
    max_length: int = Field(2048, ge=8, description="tokens of prompt (image tokens included) + answer")
    too_long: Literal["skip", "fail", "truncate"] = Field(
        "skip",
        description="pairs over max_length: skip (counted and reported), fail (error naming the rows), "
        "truncate (TRL's keep_start truncation of the answer)",
    )


class OptimSettings(StrictModel):
    epochs: float = Field(2.0, gt=0, description="passes over the data (paper: 2)")
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides epochs")
    learning_rate: float = Field(1e-5, gt=0, description="paper: 1e-5")
    per_device_batch_size: int = Field(1, ge=1, description="pairs per worker per micro-batch")
    gradient_accumulation_steps: int = Field(4, ge=1, description="paper: 4")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="pairs per optimizer step over all workers (paper: 8 = 2 GPUs x 1 x accumulation 4); when set, "
        "gradient_accumulation_steps is derived from it, so changing scaling.num_workers keeps the recipe",
    )
    lr_scheduler: str = Field("cosine", description="transformers scheduler name")
    warmup_steps: float = Field(0.03, ge=0, description="warmup: a ratio of all steps if < 1, else a step count")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = Field(False, description="trade compute for memory (7B on 40 GB cards)")
    bf16: bool | None = Field(None, description="None: bf16 on GPU workers, fp32 on CPU workers")
    seed: int = Field(0, ge=0)


class DeepSpeedSettings(StrictModel):
    enabled: bool = Field(True, description="False: plain DDP")
    zero_stage: int = Field(2, ge=0, le=3, description="ZeRO stage (paper: 2)")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload of optimizer states to CPU memory")


class ScalingSettings(StrictModel):
    num_workers: int = Field(2, ge=1, description="Ray Train workers (one process, one GPU each; paper: 2 A100s)")
    use_gpu: bool = Field(False)
    cpus_per_worker: float = Field(1.0, gt=0)
    resources_per_worker: dict[str, float] = Field(default_factory=dict, description="extra Ray resources per worker")


class RunSettings(WorkerEnvironment):
    SECTION: ClassVar[str] = "run"
    WRITTEN_TO: ClassVar[str] = "the training output's run record"

    name: str = Field("dpo", min_length=1, description="Ray Train run name: the same name + storage resumes")
    storage_path: str | None = Field(None, description="checkpoints (local or s3://...); None: OUTPUT/ray")
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the latest checkpoint; -1: forever")
    checkpoint_every: int = Field(50, ge=1, description="optimizer steps between checkpoints")
    checkpoints_to_keep: int | None = Field(2, ge=1, description="None: keep all")
    ray_address: str | None = Field(None, description="None: join a running cluster if any, else start a local Ray")

    def worker_env(self) -> dict[str, str]:
        """Every training worker's environment: env, plus secret_env's values from the driver's environment
        (ConfigError naming any that is not set)."""
        return {**self.env, **self.secret_values()}


class TrainConfig(StrictModel):
    model: ModelRef = Field(description="base LVLM: zoo:NAME, a local folder, or a hub id")
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="lora: reference = base with adapters disabled; full: the language model trained (vision tower and "
        "projector frozen, as the paper) against a separate frozen reference copy",
    )
    prompt_format: Literal["chat_template", "llava_v1"] = Field(
        "chat_template",
        description="chat_template: the processor's chat template renders the pairs; llava_v1: LLaVA-1.5's official "
        "vicuna_v1 conversation (its system sentence, USER:/ASSISTANT:, </s> after answers), as the paper trained",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)
    optim: OptimSettings = Field(default_factory=OptimSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    report_to: list[Literal["mlflow", "wandb", "tensorboard"]] = Field(
        default_factory=list, description="TRL/transformers experiment trackers; off by default"
    )
    logging_steps: int = Field(1, ge=1)
    merge: bool = Field(True, description="also save base + LoRA merged, in the HF format vLLM serves")

    @model_validator(mode="after")
    def _gpu_settings(self):
        if self.optim.bf16 and not self.scaling.use_gpu:
            raise ValueError("optim.bf16: bf16 training needs scaling.use_gpu: true (CPU workers train in fp32)")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        return self

    @model_validator(mode="after")
    def _keep_global_batch(self):
        optim, workers = self.optim, self.scaling.num_workers
        if optim.global_batch_size is None:
            return self
        per_step = workers * optim.per_device_batch_size
        if optim.global_batch_size % per_step:
            raise ValueError(
                f"optim.global_batch_size: {optim.global_batch_size} is not a multiple of scaling.num_workers ({workers}) "
                f"x optim.per_device_batch_size ({optim.per_device_batch_size}) = {per_step}"
            )
        accumulation = optim.global_batch_size // per_step
        if "gradient_accumulation_steps" in optim.model_fields_set and optim.gradient_accumulation_steps != accumulation:
            raise ValueError(
                f"optim.gradient_accumulation_steps: {optim.gradient_accumulation_steps} contradicts optim.global_batch_size "
                f"{optim.global_batch_size} on {workers} worker(s) ({accumulation}); set only one of them"
            )
        # Bypasses validate_assignment, which would mark the field as set by the user.
        optim.__dict__["gradient_accumulation_steps"] = accumulation
        return self

    def global_batch(self) -> int:
        """Pairs per optimizer step over all workers."""
        return self.scaling.num_workers * self.optim.per_device_batch_size * self.optim.gradient_accumulation_steps

    def use_bf16(self) -> bool:
        return self.scaling.use_gpu if self.optim.bf16 is None else self.optim.bf16


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config; `ConfigError` names the file and field."""
    return load_config(path, overrides, TrainConfig)
