"""The zoo's language models load through transformers' Auto classes, exactly as real checkpoints do.

Covers lvlm-llava, lvlm-llava-next (Mistral and Vicuna), chat-llm and reward-seqcls (the ArmoRM twin: test_armorm.py): tokenizers are real sub-word
tokenizers (not degenerate), weight names follow the released checkpoints' layout, reward models return
the right shapes, and a build is a pure function of its seed. vLLM loading is in test_vllm_generation.py.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from synthalign_ray import zoo

LVLMS = ["lvlm-llava", "lvlm-llava-next", "lvlm-llava-next-vicuna"]
LLAMA3_STYLE = ["chat-llm", "reward-seqcls"]
LANGUAGE_MODELS = LVLMS + LLAMA3_STYLE

# Words from zoo.CORPUS: a working sub-word tokenizer keeps most of them whole.
CORPUS_SENTENCE = "a young woman is riding a bicycle across the bridge near the river at sunset"
# Characters outside CORPUS must survive too (byte fallback / byte-level BPE), not become unknowns.
UNSEEN_TEXT = "Café, 42 dogs! Über-große Äpfel?"
IMAGE_PROMPT = "describe this image"
CHAT = [{"role": "user", "content": "what is in the picture"}, {"role": "assistant", "content": "a dog in the park"}]
OTHER_CHAT = [{"role": "user", "content": "what color is the car"}, {"role": "assistant", "content": "red"}]


@pytest.fixture(scope="module")
def built(module_zoo):
    """name -> folder, each model built once per test module."""
    return {name: zoo.build(name) for name in LANGUAGE_MODELS}


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _image(width: int = 50, height: int = 40) -> Image.Image:
    generator = torch.Generator().manual_seed(width * height)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    return Image.fromarray(pixels.numpy())


def test_models_are_registered_with_descriptions():
    for name in LANGUAGE_MODELS:
        assert zoo.BUILDERS[name][1]


@pytest.mark.parametrize("name", LANGUAGE_MODELS)
def test_tokenizer_is_not_degenerate(built, name):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[name])
    assert len(tokenizer) > 200

    ids = tokenizer(CORPUS_SENTENCE, add_special_tokens=False).input_ids
    words = CORPUS_SENTENCE.split()
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert len(ids) <= len(words) + 3, tokenizer.convert_ids_to_tokens(ids)  # words stay whole
    assert tokenizer.decode(ids) == CORPUS_SENTENCE

    unseen = tokenizer(UNSEEN_TEXT, add_special_tokens=False).input_ids
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in unseen
    assert tokenizer.decode(unseen) == UNSEEN_TEXT

    # The BOS the real families prepend.
    assert tokenizer(CORPUS_SENTENCE).input_ids == [tokenizer.bos_token_id, *ids]
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("name", LVLMS)
def test_lvlm_text_sampled_from_the_whole_vocabulary_keeps_its_length(built, name):
    """A random twin samples every piece alike, most of them untrained fillers: answers of N tokens must
    tokenize back to about N, or the token budgets downstream (train's max_length, the judge's context) break."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built[name])
    generator = torch.Generator().manual_seed(0)
    sampled = torch.randint(0, tokenizer.convert_tokens_to_ids("<image>"), (512,), generator=generator).tolist()
    text = tokenizer.decode(sampled, skip_special_tokens=True)
    assert len(tokenizer(text, add_special_tokens=False).input_ids) <= 1.1 * len(sampled)


@pytest.mark.parametrize("name", LVLMS)
def test_lvlm_weights_use_the_llava_hf_layout(built, name):
    from transformers import AutoModelForImageTextToText

    saved = _weights(built[name])
    prefixes = {key.split(".")[0] for key in saved}
    assert prefixes <= {"language_model", "vision_tower", "multi_modal_projector", "image_newline"}
    # llava-hf's releases are float16, weights and config: an engine at dtype "auto" runs them so.
    assert {tensor.dtype for tensor in saved.values()} == {torch.float16}
    config = json.loads((built[name] / "config.json").read_text())
    assert config["dtype"] == "float16"
    # llava-hf's ids: <image> and <pad> after the 32000 sentencepiece pieces, the table padded to 32064.
    assert (config["image_token_index"], config["pad_token_id"], config["text_config"]["vocab_size"]) == (32000, 32001, 32064)
    vision = [key for key in saved if key.startswith("vision_tower.")]
    # transformers 5.19 would save `vision_tower.embeddings...`; vLLM only loads the hub's names.
    assert vision and all(key.startswith("vision_tower.vision_model.") for key in vision)
    for key in [
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "multi_modal_projector.linear_1.weight",
        "language_model.model.embed_tokens.weight",
        "language_model.model.layers.1.self_attn.q_proj.weight",
        "language_model.lm_head.weight",
    ]:
        assert key in saved

    model, info = AutoModelForImageTextToText.from_pretrained(built[name], output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    loaded = model.state_dict()
    assert torch.equal(
        loaded["model.vision_tower.encoder.layers.0.self_attn.q_proj.weight"],
        saved["vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"],
    )
    assert torch.equal(loaded["lm_head.weight"], saved["language_model.lm_head.weight"])


@pytest.mark.parametrize(
    ("name", "rendered", "processor_class", "image_processor_class"),
    [
        ("lvlm-llava", "USER: <image>\ndescribe this image ASSISTANT:", "LlavaProcessor", "CLIPImageProcessor"),
        (
            "lvlm-llava-next",
            "[INST] <image>\ndescribe this image [/INST]",
            "LlavaNextProcessor",
            "LlavaNextImageProcessor",
        ),
        (
            "lvlm-llava-next-vicuna",
            "USER: <image>\ndescribe this image ASSISTANT:",
            "LlavaNextProcessor",
            "LlavaNextImageProcessor",
        ),
    ],
)
def test_lvlm_processor_renders_and_expands_the_image(built, name, rendered, processor_class, image_processor_class):
    from transformers import AutoConfig, AutoProcessor

    processor = AutoProcessor.from_pretrained(built[name])
    assert type(processor).__name__ == processor_class
    assert type(processor.image_processor).__name__ == image_processor_class
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": IMAGE_PROMPT}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == rendered

    config = AutoConfig.from_pretrained(built[name])
    inputs = processor(images=_image(), text=prompt, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == config.image_token_index).sum())
    patches = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
    if name == "lvlm-llava":
        assert n_image_tokens == patches == config.image_seq_length
    else:  # anyres: the base image plus the grid tiles and their row newlines
        assert n_image_tokens > patches
    assert inputs["pixel_values"].shape[-2:] == (config.vision_config.image_size,) * 2


def test_chat_llm_loads_and_generates(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["chat-llm"])
    model, info = AutoModelForCausalLM.from_pretrained(built["chat-llm"], output_loading_info=True)
    assert type(model).__name__ == "LlamaForCausalLM" and not any(info.values())
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(_weights(built["chat-llm"]))
    # Llama-3-Instruct stops at the end of a turn, not only at the end of text.
    assert tokenizer.convert_tokens_to_ids("<|eot_id|>") in model.generation_config.eos_token_id

    inputs = tokenizer.apply_chat_template(CHAT[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    prompt = tokenizer.decode(inputs["input_ids"][0])
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert prompt.count("<|begin_of_text|>") == 1
    output = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert output.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_reward_seqcls_scores_a_padded_batch(built):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(built["reward-seqcls"])
    model = AutoModelForSequenceClassification.from_pretrained(built["reward-seqcls"]).eval()
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert "score.weight" in _weights(built["reward-seqcls"])

    batch = tokenizer.apply_chat_template([CHAT, OTHER_CHAT], padding=True, return_tensors="pt", return_dict=True)
    single = tokenizer.apply_chat_template(OTHER_CHAT, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        scores = model(**batch).logits
        alone = model(**single).logits
    assert scores.shape == (2, 1)
    torch.testing.assert_close(scores[1], alone[0], atol=1e-5, rtol=1e-5)  # padding does not change a score


@pytest.mark.parametrize("name", [*LANGUAGE_MODELS, "armorm"])
def test_build_is_a_function_of_the_seed(tmp_path, name):
    builder = zoo.BUILDERS[name][0]
    folders = {}
    for label, seed in [("first", 0), ("again", 0), ("other", 1)]:
        folders[label] = tmp_path / label
        folders[label].mkdir()
        builder(folders[label], seed)

    first, again, other = (_weights(folders[label]) for label in ("first", "again", "other"))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)
    for file in ["tokenizer.json", "config.json"]:
        assert (folders["first"] / file).read_bytes() == (folders["again"] / file).read_bytes()
