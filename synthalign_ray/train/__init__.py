"""DPO training (paper step 7): Ray Train's TorchTrainer driving TRL's DPOTrainer with PEFT LoRA and
DeepSpeed ZeRO. `config` (TrainConfig), `data` (loading and checks), `dpo` (the worker loop),
`trainer` (the driver), `merge` (LoRA into the base, for vLLM), `log` (JSONL log and loss plot)."""
