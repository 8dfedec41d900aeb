"""The pairs we write feed TRL's DPOTrainer for a vision-language model with no conversion code.

PairBuilder rows -> Parquet in pairs/ (store.with_hf_features + store.write_table) ->
datasets.load_dataset("parquet") -> DPOTrainer on the tiny zoo LLaVA, one step. With the reference
equal to the policy (step one, dropout off), DPO's sigmoid loss is -log sigmoid(0) = ln 2.
"""

import math

import pyarrow.compute as pc
import pytest
from PIL import Image

from synthalign_ray import store, zoo
from synthalign_ray.stages.pairs import PairBuilder, PairsConfig
from synthalign_ray.train.fixture import scored_rows

pytestmark = pytest.mark.slow

# "full": the rows as the pipeline writes them (TRL's collator then takes the single-image `image`
# column, which holds the same image); "trl_only": just the TRL columns, so `images` is what is used;
# "llava_v1": the full rows rendered as LLaVA-1.5's vicuna_v1 strings (train config `prompt_format`).
@pytest.mark.parametrize("layout", ["full", "trl_only", "llava_v1"])
def test_dpo_trainer_takes_the_pairs_parquet_as_is(tmp_path, layout):
    import datasets
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import DPOConfig, DPOTrainer

    built = PairBuilder(PairsConfig(system_prompt="You are a careful assistant."))(scored_rows(4))
    pairs = built.filter(pc.equal(built.column("status"), "ok"))
    assert pairs.num_rows == 4
    if layout == "trl_only":
        pairs = pairs.select(["id", "images", "prompt", "chosen", "rejected"])
    store.write_table(str(tmp_path / "pairs" / "part-0.parquet"), store.with_hf_features(pairs))

    # --- the user's side: nothing between load_dataset and the trainer ---
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs" / "*.parquet"), split="train")
    assert dataset.features["images"] == datasets.List(datasets.Image())
    assert isinstance(dataset[0]["images"][0], Image.Image)

    path = zoo.build("lvlm-llava")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"),
        use_cpu=True,
        bf16=False,
        max_steps=1,
        per_device_train_batch_size=2,
        max_length=128,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
    )
    if layout == "llava_v1":
        from synthalign_ray.train.data import render_pairs

        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        from synthalign_ray.train.data import check_pairs

        dataset = render_pairs(dataset, processor, "llava_v1")
        assert dataset[0]["prompt"].startswith("<s> You are a careful assistant. USER: <image>\n")
        # The pre-training check measures the pairs as TRL's collator will build them, in this format.
        collate = DataCollatorForVisionPreference(processor=processor)
        longest = max(int(collate([dict(row)])["attention_mask"].sum(1).max()) for row in dataset)
        report = check_pairs(str(tmp_path / "pairs"), processor, "zoo:lvlm-llava", 2048, "fail", "llava_v1")
        assert report.max_tokens == longest
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=processor)
    result = trainer.train()
    # ----------------------------------------------------------------------

    assert trainer.state.global_step == 1
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=1e-3)
    assert result.training_loss == pytest.approx(math.log(2), abs=1e-3)


def test_full_fine_tuning_trains_the_language_model_only(tmp_path):
    """`finetune: full` as train_worker sets it up (`policy_and_reference`): the vision tower and the
    projector are frozen, and after one DPO step only language-model weights moved."""
    import datasets
    import torch
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    from synthalign_ray.train.config import load_train_config
    from synthalign_ray.train.dpo import is_vision_module, policy_and_reference
    from tests.conftest import REPO

    built = PairBuilder(PairsConfig())(scored_rows(2))
    store.write_table(str(tmp_path / "pairs" / "part-0.parquet"), store.with_hf_features(built))
    dataset = datasets.load_dataset("parquet", data_files=str(tmp_path / "pairs" / "*.parquet"), split="train")
    cfg = load_train_config(REPO / "configs" / "train_tiny.yaml", ["finetune=full"])
    path = str(zoo.resolve(cfg.model))
    torch.manual_seed(0)
    model, reference, peft_config = policy_and_reference(path, cfg)
    assert peft_config is None and reference is not None and reference is not model
    frozen = [name for name, p in model.named_parameters() if not p.requires_grad]
    assert {name.split(".")[1] for name in frozen} == {"vision_tower", "multi_modal_projector"}
    assert all(p.requires_grad != is_vision_module(name) for name, p in model.named_parameters())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), use_cpu=True, bf16=False, max_steps=1, per_device_train_batch_size=2, max_length=128,
        learning_rate=1e-3, report_to=[], save_strategy="no", dataloader_num_workers=0,
    )  # fmt: skip
    DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=dataset, processing_class=AutoProcessor.from_pretrained(path)).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert changed and all(name.startswith(("model.language_model.", "lm_head.")) for name in changed)
