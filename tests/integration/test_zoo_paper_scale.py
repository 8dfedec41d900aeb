"""The paper-scale builders: the released shapes, vocabularies and dtypes, loadable by the stages' own loaders.

Each of the four models is built with `zoo.build(name, scale="paper", device="cpu", layers=LAYERS)` into a private zoo
and checked against the released configs (synthalign_ray/zoo/paper_configs/): every released field is saved with its
released value (only the depth is capped, and the fields transformers 5 itself rewrites on load are mapped, each named
below); every weight is in the released dtype; the stage's loader loads the folder and runs one small forward; the
tokenizers have the released vocabulary sizes.

The forwards run in float32 (bfloat16 for ArmoRM): float16 matmuls on this CPU take minutes where float32 takes
milliseconds; the float16 files load through the same `from_pretrained` either way.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from synthalign_ray import zoo

# Two of every stack: real stacks (SD3's last MMDiT block is context-only; LLaVA reads the tower's second-to-last
# layer), still small enough to build and run on a CPU in well under a minute each.
LAYERS = 2
# The keys that hold a stack's depth: capped at LAYERS, everything else released.
DEPTH_KEYS = {"num_layers", "num_hidden_layers"}
# Written by the saving library in place of the released value: versions, the source path, and the dtype (which
# the weights' dtype check covers; ArmoRM's released config says float32 while its weights are bfloat16).
UNCHECKED_KEYS = {"transformers_version", "_diffusers_version", "_name_or_path", "torch_dtype", "dtype"}
# What transformers 5.19 makes of T5 v1.1's config on load (T5Config and T5EncoderModel.__init__): tie_word_embeddings
# False becomes scale_decoder_outputs False with the tie forced on, and the encoder turns off decoding and caching.
T5_REWRITES = {"tie_word_embeddings": True, "is_encoder_decoder": False, "use_cache": False}
# llava-1.5-7b-hf's text_config leaves Llama-2-7B's sizes to LlamaConfig's defaults (paper_configs/README.md).
LLAVA_TEXT_DEFAULTS = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    hidden_act="silu",
    rope_theta=10000.0,
)


@pytest.fixture(scope="module")
def build(module_zoo):
    """name -> its paper-scale folder. The build must make every weight in its released dtype: a float32 model cast
    on save (twice the memory, which a GPU of the paper's size may not have) fails here, by watching Module.to."""
    original_to = torch.nn.Module.to

    def build(name: str):
        casts = []

        def watched_to(module, *args, **kwargs):
            before = {key: p.dtype for key, p in module.named_parameters()}
            result = original_to(module, *args, **kwargs)
            casts.extend(
                f"{type(module).__name__}.{key}: {before[key]} -> {p.dtype}"
                for key, p in result.named_parameters()
                if p.dtype != before[key]
            )
            return result

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.nn.Module, "to", watched_to)
            folder = zoo.build(name, scale="paper", device="cpu", layers=LAYERS)
        assert not casts, f"{name}: parameters cast after they were made: {casts[:3]}"
        return folder

    return build


def released(*path: str) -> dict:
    return json.loads(zoo.PAPER_CONFIGS.joinpath(*path).read_text())


def saved(folder, *path: str) -> dict:
    return json.loads(folder.joinpath(*path).read_text())


def as_transformers_5(config: dict) -> dict:
    """transformers 5 keeps rope_theta (with rope_scaling null) as rope_parameters."""
    config = dict(config)
    if "rope_theta" in config:
        if config.pop("rope_scaling", None) is not None:
            raise AssertionError("a released rope_scaling: map it here")
        config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    return config


def assert_released_config(real: dict, written: dict, where: str = "") -> None:
    """Every released field has its released value in `written`, depths capped at LAYERS; fields the saving
    library adds (its own defaults) are not compared."""
    real = as_transformers_5(real)
    for key, value in real.items():
        if key in UNCHECKED_KEYS:
            continue
        assert key in written, f"{where}{key} is released but not saved"
        if key in ("text_config", "vision_config"):
            assert_released_config(value, written[key], f"{where}{key}.")
        elif key in DEPTH_KEYS:
            assert written[key] == min(value, LAYERS), f"{where}{key}"
        else:
            assert written[key] == value, f"{where}{key}: released {value!r}, saved {written[key]!r}"


SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


def safetensors_dtypes(folder) -> dict[str, torch.dtype]:
    """'file:key' -> dtype of every weight in every safetensors file under `folder`, read from the headers."""
    dtypes = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(path, "pt") as weights:
            for key in weights.keys():
                dtype = weights.get_slice(key).get_dtype()
                dtypes[f"{path.relative_to(folder)}:{key}"] = SAFETENSORS_DTYPES.get(dtype, dtype)
    assert dtypes, f"no safetensors in {folder}"
    return dtypes


def shape(folder, file: str, key: str) -> list[int]:
    with safe_open(folder / file, "pt") as weights:
        return weights.get_slice(key).get_shape()


def image(side: int) -> Image.Image:
    generator = torch.Generator().manual_seed(side)
    return Image.fromarray(torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=generator).numpy())


def test_folder_names_carry_scale_and_depth(module_zoo):
    assert zoo.model_dir("sd3", scale="paper") == module_zoo / "sd3-paper"
    assert zoo.model_dir("sd3", 3, scale="paper", layers=2) == module_zoo / "sd3-paper-L2-seed3"
    assert zoo.model_dir("sd3") == module_zoo / "sd3"
    assert set(zoo.PAPER_BUILDERS) == {"sd3", "image-reward", "armorm", "lvlm-llava"}


@pytest.mark.slow
def test_sd3_paper(build):
    from diffusers import AutoPipelineForText2Image, StableDiffusion3Pipeline
    from transformers import AutoTokenizer

    folder = build("sd3")
    assert folder.name == f"sd3-paper-L{LAYERS}"
    for file in ["transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json",
                 "text_encoder/config.json", "text_encoder_2/config.json"]:  # fmt: skip
        assert_released_config(released("sd3-medium-diffusers", file), saved(folder, file), f"{file}: ")
    t5 = saved(folder, "text_encoder_3/config.json")
    assert {key: t5[key] for key in T5_REWRITES} == T5_REWRITES and t5["scale_decoder_outputs"] is False
    real_t5 = {k: v for k, v in released("sd3-medium-diffusers", "text_encoder_3/config.json").items() if k not in T5_REWRITES}
    assert_released_config(real_t5, t5, "text_encoder_3/config.json: ")

    assert set(safetensors_dtypes(folder).values()) == {torch.float16}
    # The released widths reach the weights: MMDiT 24 x 64, T5-XXL's table, bigG's, the 192 x 192 position table.
    assert shape(folder, "transformer/diffusion_pytorch_model.safetensors", "pos_embed.pos_embed") == [1, 192 * 192, 1536]
    assert shape(folder, "text_encoder_3/model.safetensors", "shared.weight") == [32128, 4096]
    assert shape(folder, "text_encoder_2/model.safetensors", "text_model.embeddings.token_embedding.weight") == [49408, 1280]

    for sub, size in [("tokenizer", 49408), ("tokenizer_2", 49408), ("tokenizer_3", 32100)]:
        assert len(AutoTokenizer.from_pretrained(folder / sub)) == size, sub
    clip = AutoTokenizer.from_pretrained(folder / "tokenizer")
    # CLIP's layout: the released config's eos_token_id 2 pools at the highest id, which is <|endoftext|>.
    assert clip.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"]) == [49406, 49407]
    assert clip.decode(clip("a red bus near the station", add_special_tokens=False).input_ids) == "a red bus near the station"

    pipe = AutoPipelineForText2Image.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe) is StableDiffusion3Pipeline
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    # One step at 64 px with guidance, T5 reading 32 tokens (the pipeline's default 256 triples the step's time here).
    out = pipe(
        "a dog in the park",
        num_inference_steps=1,
        height=64,
        width=64,
        guidance_scale=2.0,
        max_sequence_length=32,
        generator=generator,
        output_type="np",
    )
    assert out.images.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(out.images)).all()


@pytest.mark.slow
def test_armorm_paper(build):
    from transformers import AutoTokenizer

    from synthalign_ray.models.armorm import LlamaForRewardModelWithGating

    folder = build("armorm")
    assert_released_config(released("ArmoRM-Llama3-8B-v0.1", "config.json"), saved(folder, "config.json"))
    assert set(safetensors_dtypes(folder).values()) == {torch.bfloat16}
    assert shape(folder, "model.safetensors", "model.embed_tokens.weight") == [128257, 4096]
    assert shape(folder, "model.safetensors", "model.layers.0.self_attn.k_proj.weight") == [8 * 128, 4096]
    assert (folder / "modeling_custom.py").is_file()

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == 128257 and tokenizer.convert_tokens_to_ids("[PAD]") == 128256

    model, info = LlamaForRewardModelWithGating.from_pretrained(folder, dtype=torch.bfloat16, output_loading_info=True)
    assert not any(info.values()), info
    assert len(model.model.layers) == LAYERS
    chat = [{"role": "user", "content": "what color is the car"}, {"role": "assistant", "content": "red"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
    assert 12 <= ids.shape[1] <= 24  # about 16 tokens
    with torch.no_grad():
        output = model(input_ids=ids)
    assert output.score.shape == (1,) and output.rewards.shape == (1, 19) and torch.isfinite(output.score).all()


@pytest.mark.slow
def test_lvlm_llava_paper(build):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = build("lvlm-llava")
    real = released("llava-1.5-7b-hf", "config.json")
    real["text_config"] = LLAVA_TEXT_DEFAULTS | real["text_config"]
    config = saved(folder, "config.json")
    assert_released_config(real, config)
    assert config["image_seq_length"] == 576 and config["image_token_index"] == 32000
    # transformers 5 writes the image processor's fields into processor_config.json, under "image_processor".
    processor_config = saved(folder, "processor_config.json")
    assert_released_config(released("llava-1.5-7b-hf", "processor_config.json"), processor_config)
    image_processor = released("llava-1.5-7b-hf", "preprocessor_config.json")
    assert image_processor.pop("processor_class") == processor_config["processor_class"]
    assert_released_config(image_processor, processor_config["image_processor"], "preprocessor_config.json: ")

    dtypes = safetensors_dtypes(folder)
    assert set(dtypes.values()) == {torch.float16}
    vision = [key for key in dtypes if ":vision_tower." in key]
    assert vision and all(":vision_tower.vision_model." in key for key in vision)  # llava-hf's key names
    assert shape(folder, "model.safetensors", "language_model.model.embed_tokens.weight") == [32064, 4096]
    assert shape(folder, "model.safetensors", "vision_tower.vision_model.embeddings.position_embedding.weight") == [577, 1024]

    processor = AutoProcessor.from_pretrained(folder)
    assert len(processor.tokenizer) == 32002
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    assert len(model.model.language_model.layers) == LAYERS == len(model.model.vision_tower.encoder.layers)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe this image"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=image(400), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == 32000).sum()) == 576 and inputs["pixel_values"].shape[-2:] == (336, 336)
    text_tokens = inputs["input_ids"].shape[1] - 576
    assert text_tokens <= 20  # an image and a prompt of about 16 tokens
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    assert logits.shape == (1, 1, 32064) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_image_reward_paper(build):
    from synthalign_ray.models.image_reward import CHECKPOINT_FILE, OFFICIAL_MED_CONFIG, load_image_reward

    folder = build("image-reward")
    med_config = saved(folder, "med_config.json")
    assert_released_config(OFFICIAL_MED_CONFIG, med_config)
    state = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    assert {t.dtype for t in state.values() if t.is_floating_point()} == {torch.float32}
    assert {t.device.type for t in state.values()} == {"cpu"}
    # The package's ViT-L/16 at 224 px and the med BERT's table.
    assert list(state["blip.visual_encoder.patch_embed.proj.weight"].shape) == [1024, 3, 16, 16]
    assert list(state["blip.visual_encoder.pos_embed"].shape) == [1, 197, 1024]
    assert list(state["blip.text_encoder.embeddings.word_embeddings.weight"].shape) == [30524, 768]
    assert max(int(key.split(".")[3]) for key in state if key.startswith("blip.visual_encoder.blocks.")) == LAYERS - 1

    scorer = load_image_reward(folder)
    assert len(scorer.tokenizer) == 30524
    assert scorer.vision_model.config.image_size == 224 and scorer.vision_model.config.num_hidden_layers == LAYERS
    rewards = scorer.score(["a dog in the park", "a red bus"], [image(256), image(300)])
    assert len(rewards) == 2 and all(abs(r) < 1e6 for r in rewards) and rewards[0] != rewards[1]
