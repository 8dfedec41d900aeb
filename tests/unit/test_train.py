"""Training pieces that need no Ray and no training step: config validation, DeepSpeed and LoRA
settings, the data checks (on the tiny zoo LLaVA's processor), the training log, the run claim."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from synthalign_ray import store, zoo
from synthalign_ray.config import ConfigError
from synthalign_ray.train import data as train_data
from synthalign_ray.train import log as train_log
from synthalign_ray.train.config import TrainConfig, load_train_config
from synthalign_ray.train.dpo import (
    ADAPTER_DIR,
    ATTEMPTS_FILE,
    FULL_MODEL_DIR,
    WORKER_RESULT_FILE,
    LoraTargetError,
    deepspeed_config,
    dpo_args,
    is_vision_module,
    steps_redone,
    write_outputs,
)
from synthalign_ray.train.trainer import TrainRunError, _claim_output, check_lora_on_meta
from tests.conftest import REPO
from synthalign_ray.train.fixture import pairs_table

TINY = REPO / "configs" / "train_tiny.yaml"
PAPER = REPO / "configs" / "train_paper.yaml"


# --- config -----------------------------------------------------------------------------------------


def test_defaults_are_the_papers_recipe():
    cfg = TrainConfig(model="zoo:lvlm-llava")
    args = dpo_args(cfg, "unused")  # the trl.DPOConfig a worker builds
    assert (cfg.lora.r, cfg.lora.alpha, args.beta, args.loss_type) == (128, 256, 0.1, ["sigmoid"])
    assert (args.num_train_epochs, args.learning_rate, args.gradient_accumulation_steps) == (2, 1e-5, 4)
    assert (cfg.deepspeed.zero_stage, cfg.finetune, args.report_to, args.bf16) == (2, "lora", [], False)


def test_shipped_configs_validate():
    tiny = load_train_config(TINY)
    assert tiny.scaling.num_workers == 2 and not tiny.scaling.use_gpu and tiny.deepspeed.zero_stage == 2
    paper = TrainConfig.model_validate(
        {**__import__("yaml").safe_load(PAPER.read_text()), "model": "zoo:lvlm-llava"}  # no hub here
    )
    assert (paper.lora.r, paper.lora.alpha, paper.trl_args()["gradient_accumulation_steps"]) == (128, 256, 4)
    assert paper.scaling.use_gpu and paper.scaling.num_workers == 2 and paper.use_bf16()
    assert paper.prompt_format == "llava_v1" and tiny.prompt_format == "chat_template"


def test_training_secrets_go_by_name_only(monkeypatch):
    with pytest.raises(ConfigError, match=r"run.env: HF_TOKEN looks like a secret: .*list its name in run.secret_env"):
        load_train_config(TINY, ["run.env={HF_TOKEN: hf_abc}"])
    cfg = load_train_config(TINY, ["run.env={A: b}", "run.secret_env=[SYNTHALIGN_TEST_SECRET]"])
    monkeypatch.delenv("SYNTHALIGN_TEST_SECRET", raising=False)
    with pytest.raises(ConfigError, match=r"^run.secret_env: SYNTHALIGN_TEST_SECRET not set in the driver's environment$"):
        cfg.run.worker_env()
    monkeypatch.setenv("SYNTHALIGN_TEST_SECRET", "s3cr3t-value")
    assert cfg.run.worker_env() == {"A": "b", "SYNTHALIGN_TEST_SECRET": "s3cr3t-value"}
    assert "s3cr3t-value" not in cfg.model_dump_json()  # what the run record and the workers' config hold


def test_global_batch_size_keeps_the_papers_recipe_on_other_worker_counts():
    def paper(*overrides):
        return load_train_config(PAPER, ["model=zoo:lvlm-llava", *overrides])  # no hub here

    def accumulation(cfg):
        return cfg.trl_args()["gradient_accumulation_steps"]

    assert accumulation(paper()) == 4 and paper().global_batch() == 8
    eight = paper("scaling.num_workers=8")
    assert (accumulation(eight), eight.global_batch()) == (1, 8)
    assert accumulation(paper("scaling.num_workers=4", "trl.per_device_train_batch_size=2")) == 1
    with pytest.raises(ConfigError, match=r"global_batch_size: 8 is not a multiple of scaling.num_workers \(3\)"):
        paper("scaling.num_workers=3")
    with pytest.raises(ConfigError, match=r"trl.gradient_accumulation_steps: 4 contradicts global_batch_size 8 on 8"):
        paper("scaling.num_workers=8", "trl.gradient_accumulation_steps=4")
    tiny = load_train_config(TINY)  # no global_batch_size: the accumulation is as written
    assert tiny.global_batch() == tiny.scaling.num_workers * tiny.trl["per_device_train_batch_size"] * accumulation(tiny)
    assert accumulation(TrainConfig.model_validate(eight.model_dump())) == 1  # as the workers see it


@pytest.mark.parametrize(
    "override, message",
    [
        ("deepspeed.zero_stage=4", "deepspeed.zero_stage: Input should be less than or equal to 3"),
        ("lora.rank=8", "lora.rank: unknown key"),
        ("too_long=drop", "too_long: Input should be 'skip', 'fail' or 'truncate'"),
        ("trl.bf16=true", "trl.bf16: bf16 training needs scaling.use_gpu: true"),
        ("trl.learning_rte=0.1", "trl.learning_rte: not a field of trl.DPOConfig"),
        ("trl.lr_scheduler_type=sideways", "trl: trl.DPOConfig refuses it: sideways is not a valid SchedulerType"),
        ("trl.output_dir=/tmp/x", "trl.output_dir: set by synthalign from the training OUTPUT (--output)"),
        ("trl.save_steps=3", "trl.save_steps: set by synthalign from run.checkpoint_every"),
        ("optim.max_steps=2", "trl: section of trl.DPOConfig's own fields: optim.max_steps is now trl.max_steps"),
        ("dpo.beta=0.2", "dpo.beta is now trl.beta"),
        ("model=/no/such/model", "model: Value error, model path '/no/such/model' does not exist"),
        ("scaling.num_workers=0", "scaling.num_workers: Input should be greater than or equal to 1"),
    ],
)
def test_config_errors_name_the_file_and_field(override, message):
    with pytest.raises(ConfigError) as error:
        load_train_config(TINY, [override])
    assert str(error.value).startswith(f"{TINY}: ")
    assert message.replace("Value error, ", "") in str(error.value)


def test_overrides_apply():
    cfg = load_train_config(TINY, ["trl.beta=0.5", "run.env={A: b}", "finetune=full"])
    assert (dpo_args(cfg, "unused").beta, cfg.run.env, cfg.finetune) == (0.5, {"A": "b"}, "full")
    assert dpo_args(cfg, "unused").learning_rate == 1e-3  # the rest of the config's trl: section stays


def test_deepspeed_config_follows_the_stage():
    assert deepspeed_config(load_train_config(TINY, ["deepspeed.enabled=false"])) is None
    for stage in range(4):
        ds = deepspeed_config(load_train_config(TINY, [f"deepspeed.zero_stage={stage}"]))
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["gradient_accumulation_steps"] == "auto"  # filled from DPOConfig by transformers
        assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) == (stage == 3)
    offload = deepspeed_config(load_train_config(TINY, ["deepspeed.offload_optimizer=true"]))
    assert offload["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# --- LoRA targets -----------------------------------------------------------------------------------


def test_default_lora_targets_are_the_language_model_projections_only():
    targets = check_lora_on_meta(str(zoo.build("lvlm-llava")), load_train_config(TINY))
    # 2 decoder layers x (q, k, v, o, gate, up, down)
    assert len(targets) == 14
    assert all(name.startswith("model.language_model.layers.") for name in targets)
    assert not any(is_vision_module(name) for name in targets)


def test_a_plain_projection_list_reaches_the_vision_tower_and_is_refused():
    path = str(zoo.build("lvlm-llava"))
    plain = ["lora.target_modules=[q_proj, k_proj, v_proj, o_proj]"]
    with pytest.raises(LoraTargetError, match="vision-tower/projector module.*model.vision_tower"):
        check_lora_on_meta(path, load_train_config(TINY, plain))
    targets = check_lora_on_meta(path, load_train_config(TINY, [*plain, "lora.allow_vision=true"]))
    assert any("vision_tower" in name for name in targets) and any("language_model" in name for name in targets)
    with pytest.raises(LoraTargetError, match="match no linear layer"):
        check_lora_on_meta(path, load_train_config(TINY, ["lora.target_modules=nothing_here"]))


# --- data checks ------------------------------------------------------------------------------------


def _pairs_table(n: int = 4) -> pa.Table:
    return pairs_table(n)


def _write(folder, table: pa.Table, name: str = "part-0.parquet") -> str:
    store.write_table(str(folder / "pairs" / name), store.with_hf_features(table))
    return str(folder)


@pytest.fixture(scope="module")
def processor():
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(zoo.build("lvlm-llava"))


def test_good_pairs_pass_and_only_trl_columns_load(tmp_path, processor):
    run = _write(tmp_path, _pairs_table(4))
    report = train_data.check_pairs(run, processor, "zoo:lvlm-llava", max_length=512, too_long="skip")
    assert (report.rows, report.trained_rows, report.image_column) == (4, 4, "images")
    dataset = train_data.load_pairs(report.files, report.image_column)
    assert dataset.column_names == ["images", "prompt", "chosen", "rejected"]


def test_pair_lengths_equal_what_trls_collator_builds(tmp_path, processor):
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    run = _write(tmp_path, _pairs_table(3))
    files = train_data.parquet_files(run)
    dataset = train_data.load_pairs(files, "images")
    collator = DataCollatorForVisionPreference(processor=processor)
    for row in dataset:
        batch = collator([dict(row)])
        expected = batch["attention_mask"].sum(dim=1).tolist()  # [chosen, rejected] rows
        assert list(train_data.pair_lengths(processor, dict(row), row["images"])) == expected


def test_too_long_pairs_are_skipped_and_counted_or_refused(tmp_path, processor):
    run = _write(tmp_path, _pairs_table(4))
    lengths = train_data.check_pairs(run, processor, "m", max_length=4096, too_long="skip").max_tokens
    report = train_data.check_pairs(run, processor, "m", max_length=lengths - 1, too_long="skip")
    assert 1 <= len(report.skipped_too_long) < 4 and report.trained_rows == 4 - len(report.skipped_too_long)
    with pytest.raises(train_data.DataError, match=rf"part-0.parquet row \d+ \(id 'p\d'\): {lengths} tokens > trl.max_length"):
        train_data.check_pairs(run, processor, "m", max_length=lengths - 1, too_long="fail")
    with pytest.raises(train_data.DataError, match="all 4 pairs are longer than trl.max_length 8"):
        train_data.check_pairs(run, processor, "m", max_length=8, too_long="skip")
    assert train_data.check_pairs(run, processor, "m", max_length=8, too_long="truncate").trained_rows == 4


def test_empty_data_and_missing_columns_are_named(tmp_path, processor):
    empty = _write(tmp_path / "empty", _pairs_table(2).slice(0, 0))
    with pytest.raises(train_data.DataError, match=r"no pairs \(0 rows in 1 Parquet file"):
        train_data.check_pairs(empty, processor, "m", 512, "skip")
    no_files = tmp_path / "nothing"
    no_files.mkdir()
    with pytest.raises(train_data.DataError, match="no Parquet files"):
        train_data.check_pairs(str(no_files), processor, "m", 512, "skip")
    with pytest.raises(train_data.DataError, match="no such file or folder"):
        train_data.check_pairs(str(tmp_path / "missing"), processor, "m", 512, "skip")
    no_rejected = _write(tmp_path / "cols", _pairs_table(2).drop_columns(["rejected", "images", "image"]))
    with pytest.raises(train_data.DataError, match=r"cols/pairs/part-0.parquet: missing column\(s\) rejected, images \(or image\)"):
        train_data.check_pairs(no_rejected, processor, "m", 512, "skip")


def test_undecodable_image_names_file_row_and_id(tmp_path, processor):
    table = _pairs_table(3)
    images = table.column("images").to_pylist()
    images[2] = [{"bytes": b"not a png", "path": None}]
    table = table.set_column(table.schema.get_field_index("images"), "images", pa.array(images, table.schema.field("images").type))
    run = _write(tmp_path, table)
    with pytest.raises(train_data.DataError, match=r"part-0.parquet row 2 \(id 'p2'\): column images: image does not decode"):
        train_data.check_pairs(run, processor, "m", 512, "skip")


def test_processor_without_an_image_token_is_refused(tmp_path):
    from transformers import AutoTokenizer

    run = _write(tmp_path, _pairs_table(2))
    tokenizer_only = AutoTokenizer.from_pretrained(zoo.build("lvlm-llava"))
    with pytest.raises(train_data.DataError, match="text-only: the processor has no image token"):
        train_data.check_pairs(run, tokenizer_only, "text-only", 512, "skip")


# --- log and run claim ------------------------------------------------------------------------------


def test_step_records_keep_one_entry_per_step_and_drop_the_summary(tmp_path):
    history = [
        {"loss": math.log(2), "rewards/margins": 0.0, "step": 1, "entropy": 7.0},
        {"loss": 0.69, "rewards/margins": 0.01, "step": 2},
        {"loss": 0.5, "rewards/margins": 0.2, "step": 2},  # step 2 again after a restart: the last wins
        {"train_runtime": 3.0, "train_loss": 0.6, "step": 2},
    ]
    records = train_log.step_records(history)
    assert records == [
        {"loss": math.log(2), "rewards/margins": 0.0, "step": 1},
        {"loss": 0.5, "rewards/margins": 0.2, "step": 2},
    ]
    train_log.write_log(records, str(tmp_path / "log" / train_log.LOG_FILE))
    assert train_log.read_log(str(tmp_path / "log" / train_log.LOG_FILE)) == records
    train_log.plot_loss(records, str(tmp_path / "log" / train_log.PLOT_FILE))
    assert (tmp_path / "log" / train_log.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_an_output_with_another_config_is_refused(tmp_path):
    cfg = load_train_config(TINY)
    _claim_output(cfg, "runs/a", str(tmp_path), overwrite=False)
    _claim_output(cfg, "runs/a", str(tmp_path), overwrite=False)  # the same run again: a resume
    with pytest.raises(TrainRunError, match="another config or data"):
        _claim_output(load_train_config(TINY, ["trl.beta=0.2"]), "runs/a", str(tmp_path), overwrite=False)
    with pytest.raises(TrainRunError):
        _claim_output(cfg, "runs/b", str(tmp_path), overwrite=False)
    attempts = tmp_path / ATTEMPTS_FILE
    attempts.write_text('{"attempts": [{"from_step": 0, "to_step": 5}]}')
    _claim_output(cfg, "runs/b", str(tmp_path), overwrite=True)
    assert not attempts.exists()  # the discarded run's attempts would count as this run's


# A URI's query (s3://bucket/run?endpoint_override=...) belongs at the end of every path under it. pyarrow
# parses the file:// form the same way (the query is ignored there), so the tests write for real.
QUERY = "?endpoint_override=http://127.0.0.1:5000&scheme=http"


@pytest.mark.parametrize("query", ["", QUERY])
def test_uri_data_is_copied_to_a_node_local_cache(tmp_path, processor, monkeypatch, query):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the cache lives under ~/.cache/synthalign
    run = _write(tmp_path / "run", _pairs_table(2))
    files = train_data.parquet_files(f"file://{run}{query}")
    assert files == [f"file://{run}/pairs/part-0.parquet{query}"]
    (local,) = train_data.local_copies(files)
    assert local.startswith(str(tmp_path / "home" / ".cache" / "synthalign" / "train-data"))
    report = train_data.check_pairs(f"file://{run}{query}", processor, "m", 512, "skip")
    assert report.rows == 2 and len(train_data.load_pairs(report.files, report.image_column)) == 2


@pytest.mark.parametrize("finetune, model_dir", [("lora", ADAPTER_DIR), ("full", FULL_MODEL_DIR)])
def test_rank0_writes_its_outputs_under_a_uri_with_a_query(tmp_path, finetune, model_dir):
    final = tmp_path / "final"  # what the trainer saved locally
    final.mkdir()
    (final / "config.json").write_text("{}")
    records = [{"step": 1, "loss": math.log(2)}, {"step": 2, "loss": 0.6}]
    cfg = load_train_config(TINY, [f"finetune={finetune}", "merge=false"])
    out = tmp_path / "run"
    write_outputs(f"file://{out}{QUERY}", cfg, records, str(final), "unused", {"global_step": 2})

    assert sorted(p.name for p in out.iterdir()) == sorted([train_log.LOG_FILE, train_log.PLOT_FILE, model_dir, WORKER_RESULT_FILE])
    assert train_log.read_log(str(out / train_log.LOG_FILE)) == records
    assert (out / model_dir / "config.json").read_text() == "{}"
    assert store.read_json(str(out / WORKER_RESULT_FILE)) == {"global_step": 2}


def test_steps_redone_are_what_an_attempt_reached_past_the_checkpoint_the_next_resumed_from():
    assert steps_redone([]) == steps_redone([{"from_step": 0, "to_step": 8}]) == 0
    # Killed after step 5, resumed from step 4's checkpoint; killed after 9, resumed from 9's (none redone).
    attempts = [{"from_step": 0, "to_step": 5}, {"from_step": 4, "to_step": 9}, {"from_step": 9, "to_step": 12}]
    assert steps_redone(attempts) == 1
    assert steps_redone([{"from_step": 0, "to_step": 5}, {"from_step": 0, "to_step": 8}]) == 5  # no checkpoint yet
