"""Typed DPO training configuration: YAML file + `--set a.b=c` overrides, validated before Ray starts.

The defaults are the paper's recipe (PDS-DPO, section 4 / official code): LoRA r128 alpha 256 on the
language model only, beta 0.1 sigmoid DPO loss, 2 epochs, lr 1e-5, gradient accumulation 4, DeepSpeed
ZeRO-2. TRL's own settings are a `trl:` section of trl.DPOConfig's fields, passed to it as is (and
checked by building one); the other sections are this tool's. Errors name the file and the dotted field,
e.g. ``configs/train_tiny.yaml: deepspeed.zero_stage: Input should be less than or equal to 3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

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
    shared_filesystem: bool = Field(
        False,
        description="a local --output (and storage_path) is mounted by every node of the cluster (NFS, EFS, "
        "Filestore). Workers write checkpoints and rank 0 the adapter there, so on a cluster of more than one node "
        "a local path is refused unless this says it is shared; s3:// and gs:// paths need nothing",
    )

    def worker_env(self) -> dict[str, str]:
        """Every training worker's environment: env, plus secret_env's values from the driver's environment
        (ConfigError naming any that is not set)."""
        return {**self.env, **self.secret_values()}


# trl.DPOConfig's fields where the paper's recipe differs from TRL's defaults (or TRL has none that fits a
# Ray Train worker). A config's `trl:` section is laid over these, key by key, and passed as is.
PAPER_TRL_ARGS: dict[str, Any] = {
    "beta": 0.1,  # paper
    "loss_type": ["sigmoid"],  # paper: the original DPO loss
    "max_length": 2048,  # LLaVA-1.5's context: 576 image tokens + prompt + answer
    "num_train_epochs": 2,  # paper
    "learning_rate": 1e-5,  # paper
    "per_device_train_batch_size": 1,
    "gradient_accumulation_steps": 4,  # paper
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a ratio of all steps when < 1 (LLaVA's warmup ratio)
    "seed": 0,
    "logging_steps": 1,
    "report_to": [],  # no experiment tracker unless asked (mlflow, wandb, tensorboard)
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
}
# DPOConfig fields this tool sets from its own sections; in `trl:` they are refused, naming the section.
SET_BY_SYNTHALIGN = {
    "output_dir": "the training OUTPUT (--output)",
    "use_cpu": "scaling.use_gpu",
    "deepspeed": "the deepspeed: section",
    "save_strategy": "run.checkpoint_every",
    "save_steps": "run.checkpoint_every",
}
# Where each field of the sections `dpo:`, `optim:` and the top-level TRL fields of earlier configs went.
MOVED = {
    "dpo.beta": "trl.beta", "dpo.loss_type": "trl.loss_type", "dpo.max_length": "trl.max_length",
    "dpo.too_long": "too_long", "optim.epochs": "trl.num_train_epochs", "optim.max_steps": "trl.max_steps",
    "optim.learning_rate": "trl.learning_rate", "optim.per_device_batch_size": "trl.per_device_train_batch_size",
    "optim.gradient_accumulation_steps": "trl.gradient_accumulation_steps", "optim.global_batch_size": "global_batch_size",
    "optim.lr_scheduler": "trl.lr_scheduler_type", "optim.warmup_steps": "trl.warmup_steps",
    "optim.weight_decay": "trl.weight_decay", "optim.max_grad_norm": "trl.max_grad_norm",
    "optim.gradient_checkpointing": "trl.gradient_checkpointing", "optim.bf16": "trl.bf16", "optim.seed": "trl.seed",
    "report_to": "trl.report_to", "logging_steps": "trl.logging_steps",
}  # fmt: skip


class TrainConfig(StrictModel):
    model: ModelRef = Field(description="base LVLM: zoo:NAME, a local folder, or a hub id (org/name[@REVISION])")
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
    too_long: Literal["skip", "fail", "truncate"] = Field(
        "skip",
        description="pairs over trl.max_length: skip (counted and reported), fail (error naming the rows), "
        "truncate (TRL's keep_start truncation of the answer)",
    )
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="pairs per optimizer step over all workers (paper: 8 = 2 GPUs x 1 x accumulation 4); when set, "
        "trl.gradient_accumulation_steps is derived from it, so changing scaling.num_workers keeps the recipe",
    )
    trl: dict[str, Any] = Field(
        default_factory=dict,
        description="trl.DPOConfig's fields, laid over the paper's (PAPER_TRL_ARGS) and passed as is; "
        "bf16 unset: bf16 on GPU workers, fp32 on CPU workers",
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    run: RunSettings = Field(default_factory=RunSettings)
    merge: bool = Field(True, description="also save base + LoRA merged, in the HF format vLLM serves")

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            moved = []
            for old, new in MOVED.items():
                section, _, key = old.rpartition(".")
                holder = data.get(section) if section else data
                if isinstance(holder, dict) and key in holder:
                    moved.append(f"{old} is now {new}")
            if moved or "dpo" in data or "optim" in data:
                raise ValueError(f"TRL's settings are a trl: section of trl.DPOConfig's own fields: {'; '.join(moved) or 'see docs/training.md'}")
        return data

    @model_validator(mode="after")
    def _gpu_settings(self):
        if self.trl.get("bf16") and not self.scaling.use_gpu:
            raise ValueError("trl.bf16: bf16 training needs scaling.use_gpu: true (CPU workers train in fp32)")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs zero_stage >= 1")
        return self

    @model_validator(mode="after")
    def _keep_global_batch(self):
        workers, per_device = self.scaling.num_workers, self.trl_args()["per_device_train_batch_size"]
        if self.global_batch_size is None:
            return self
        per_step = workers * per_device
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size: {self.global_batch_size} is not a multiple of scaling.num_workers ({workers}) "
                f"x trl.per_device_train_batch_size ({per_device}) = {per_step}"
            )
        accumulation = self.global_batch_size // per_step
        given = self.trl.get("gradient_accumulation_steps")
        if given is not None and given != accumulation:
            raise ValueError(
                f"trl.gradient_accumulation_steps: {given} contradicts global_batch_size {self.global_batch_size} "
                f"on {workers} worker(s) ({accumulation}); set only one of them"
            )
        self.trl["gradient_accumulation_steps"] = accumulation  # what the workers see (and re-validate)
        return self

    @model_validator(mode="after")
    def _trl_args_make_a_dpo_config(self):
        """The trl: section is checked by TRL itself: DPOConfig built from it (on the CPU: no GPU is needed to
        check a config) must accept every field."""
        import tempfile

        from trl import DPOConfig

        for key, section in SET_BY_SYNTHALIGN.items():
            if key in self.trl:
                raise ValueError(f"trl.{key}: set by synthalign from {section}")
        with tempfile.TemporaryDirectory() as output_dir:
            try:
                DPOConfig(**self.trl_args(), output_dir=output_dir, use_cpu=True)
            except TypeError as error:
                unknown = str(error).rsplit(" ", 1)[-1].strip("'")
                raise ValueError(f"trl.{unknown}: not a field of trl.DPOConfig") from None
            except ValueError as error:
                raise ValueError(f"trl: trl.DPOConfig refuses it: {error}") from None
        return self

    def trl_args(self) -> dict[str, Any]:
        """The arguments of trl.DPOConfig this config gives (the paper's, then the trl: section), and bf16."""
        args = {**PAPER_TRL_ARGS, **self.trl}
        args.setdefault("bf16", self.scaling.use_gpu)
        return args

    def global_batch(self) -> int:
        """Pairs per optimizer step over all workers."""
        args = self.trl_args()
        return self.scaling.num_workers * args["per_device_train_batch_size"] * args["gradient_accumulation_steps"]

    def use_bf16(self) -> bool:
        return bool(self.trl_args()["bf16"])


def load_train_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """Read, override and validate a training config; `ConfigError` names the file and field."""
    return load_config(path, overrides, TrainConfig)
