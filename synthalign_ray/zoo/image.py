"""Image-side twins: a Stable-Diffusion-layout pipeline, CLIP, BLIP and ImageReward-v1.0's file format."""

from __future__ import annotations

import json
import shutil
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


def wordpiece_vocab(size: int | None = None) -> list[str]:
    """An uncased BERT WordPiece vocabulary over CORPUS: specials first ([PAD] = 0, as BERT configs
    expect), then punctuation, characters and `##` pieces so any word splits, then whole words.

    `size` pads it with bert-base-uncased's own filler form, `[unusedN]`: the basic tokenizer splits brackets off,
    so no text ever produces one."""
    characters = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punctuation = list(".,!?;:'\"-()/&")
    suffixes = ["##s", "##es", "##ed", "##ing", "##er", "##ly", "##est", "##ful"]
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *punctuation, *characters, *sorted(set(CORPUS)), *suffixes]
    pieces += [f"##{character}" for character in characters]
    pieces = list(dict.fromkeys(pieces))
    return pieces + [f"[unused{i}]" for i in range(max(0, (size or 0) - len(pieces)))]


def write_wordpiece_vocab(dest: Path, size: int | None = None) -> Path:
    """`wordpiece_vocab(size)` as a BERT `vocab.txt` in `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / "vocab.txt"
    path.write_text("".join(f"{token}\n" for token in wordpiece_vocab(size)))
    return path


_CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _clip_tokenizer(scratch: Path, size: int | None = None):
    """A CLIPTokenizer over write_clip_bpe_vocab's files, written to (and removed from) a folder in `scratch`.

    `size` (CLIP's 49408) lays the vocabulary out as the released one: trained pieces, then fillers no merge builds
    (`<|twin_unused_N|>`), then `<|startoftext|>` and `<|endoftext|>` as the last two ids (49406, 49407): the released
    text configs' eos_token_id 2 makes CLIPTextModel pool at the highest id, which must be the end of text."""
    from transformers import CLIPTokenizer

    tok_dir = scratch / "_tokenizer_src"
    write_clip_bpe_vocab(tok_dir)
    if size is not None:
        path = tok_dir / "vocab.json"
        trained = [token for token in json.loads(path.read_text()) if token not in _CLIP_SPECIAL_TOKENS]
        fillers = [f"<|twin_unused_{i}|>" for i in range(size - len(trained) - len(_CLIP_SPECIAL_TOKENS))]
        path.write_text(json.dumps({token: i for i, token in enumerate([*trained, *fillers, *_CLIP_SPECIAL_TOKENS])}))
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=77)
    shutil.rmtree(tok_dir)
    return tokenizer


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


# A 64 px AutoencoderKL with four blocks (latents 1/8 of the side, as in real Stable Diffusion: 64 px -> 8x8).
_TINY_VAE = dict(
    block_out_channels=(32, 32, 32, 32),
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=64,
)


def _vae(**config):
    """AutoencoderKL(**config) with a decoder output wide enough to see noise."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**config)
    with torch.no_grad():  # random init leaves the VAE's output near-constant grey: widen it to see noise
        vae.decoder.conv_out.weight.mul_(8.0)
    return vae


def _diffusers_fields(config: dict) -> dict:
    """A diffusers config file's constructor arguments (without `_class_name`, `_diffusers_version`)."""
    return {key: value for key, value in config.items() if not key.startswith("_")}


# --- diffusion: a Stable-Diffusion-layout text-to-image pipeline, 64 px -------------------------------


@register("diffusion", "Stable Diffusion layout (UNet, VAE, CLIP text encoder, scheduler), 64 px, random")
def build_diffusion(dest: Path, seed: int) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    seeded_torch(seed)
    tokenizer = _clip_tokenizer(dest)
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
    vae = _vae(**_TINY_VAE, latent_channels=4)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
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


# --- sd3: the paper's text-to-image model, stabilityai/stable-diffusion-3-medium-diffusers, 64 px -------


def _t5_tokenizer(pieces: int | None = None):
    """T5TokenizerFast (SentencePiece Unigram, T5's layout: <pad>=0, </s>=1, <unk>=2, 100 <extra_id_N>, `</s>`
    appended) over CORPUS words and single characters, so any text tokenizes.

    `pieces` (T5's 32000) pads the SentencePiece vocabulary with one-character private-use fillers, so with the 100
    <extra_id_N> the tokenizer has T5's 32100 tokens."""
    import string

    from transformers import T5TokenizerFast

    words = sorted(set(CORPUS))
    characters = sorted(set(string.ascii_letters + string.digits + string.punctuation))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(len(w) ** 0.5)) for w in words] + [("▁", -3.0)] + [(c, -5.0) for c in characters]
    vocab += [(chr(FILLER_FIRST_CODE_POINT + i), -20.0) for i in range(len(vocab), pieces or 0)]
    return T5TokenizerFast(vocab=vocab, model_max_length=256)


@register("sd3", "SD3-medium layout: MMDiT, flow-matching scheduler, 2 CLIP-with-projection + T5, 16-channel VAE, 64 px")
def build_sd3(dest: Path, seed: int) -> None:
    from transformers import T5Config

    clip_tokenizer, t5_tokenizer = _clip_tokenizer(dest), _t5_tokenizer()
    # SD3-medium: CLIP-L (768) and OpenCLIP bigG (1280) with projections; their hidden states, side by side,
    # are zero-padded to T5-XXL's width (4096), so joint_attention_dim = T5's d_model >= the two CLIP widths.
    t5 = T5Config(
        vocab_size=len(t5_tokenizer),
        d_model=96,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's T5-XXL
        decoder_start_token_id=0,
    )
    transformer = dict(
        sample_size=8,  # 64 px / 8 (SD3-medium: 128 for 1024 px)
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=96,
        caption_projection_dim=32,  # = heads x head_dim, as 24 x 64 = 1536 in SD3-medium
        pooled_projection_dim=32 + 48,
        pos_embed_max_size=16,
    )
    # SD3's VAE: 16 latent channels, no quant convs, its scaling and shift factors.
    vae = _TINY_VAE | dict(
        latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    _write_sd3(
        dest,
        seed,
        tokenizers=(clip_tokenizer, t5_tokenizer),
        text_encoders=(
            _clip_text_config(len(clip_tokenizer), hidden_size=32, projection_dim=32),
            _clip_text_config(len(clip_tokenizer), hidden_size=48, projection_dim=48),
            t5,
        ),
        transformer=transformer,
        vae=vae,
        scheduler=dict(shift=3.0),
    )


# stabilityai/stable-diffusion-3-medium-diffusers' component configs under paper_configs/.
SD3_RELEASE = "sd3-medium-diffusers"
# Released vocabularies: CLIP's 49408 tokens (both encoders), T5's 32000 SentencePiece pieces (+ 100 <extra_id_N>).
CLIP_VOCAB_SIZE = 49408
T5_SENTENCEPIECE_PIECES = 32000


@register_paper("sd3", "stabilityai/stable-diffusion-3-medium-diffusers: MMDiT 2B, CLIP-L + bigG + T5-XXL, VAE, fp16")
def build_sd3_paper(dest: Path, seed: int, device: str, layers: int | None) -> None:
    from transformers import CLIPTextConfig, T5Config

    def text_config(config_class, folder: str, depth_field: str):
        config = config_class.from_dict(paper_config(SD3_RELEASE, folder, "config.json"))
        setattr(config, depth_field, capped(getattr(config, depth_field), layers))
        return config

    transformer = _diffusers_fields(paper_config(SD3_RELEASE, "transformer", "config.json"))
    transformer["num_layers"] = capped(transformer["num_layers"], layers)
    _write_sd3(
        dest,
        seed,
        tokenizers=(_clip_tokenizer(dest, size=CLIP_VOCAB_SIZE), _t5_tokenizer(pieces=T5_SENTENCEPIECE_PIECES)),
        text_encoders=(
            text_config(CLIPTextConfig, "text_encoder", "num_hidden_layers"),
            text_config(CLIPTextConfig, "text_encoder_2", "num_hidden_layers"),
            text_config(T5Config, "text_encoder_3", "num_layers"),
        ),
        transformer=transformer,
        vae=_diffusers_fields(paper_config(SD3_RELEASE, "vae", "config.json")),
        scheduler=_diffusers_fields(paper_config(SD3_RELEASE, "scheduler", "scheduler_config.json")),
        device=device,
        dtype="float16",
    )


def _write_sd3(
    dest: Path,
    seed: int,
    *,
    tokenizers,
    text_encoders,
    transformer: dict,
    vae: dict,
    scheduler: dict,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """An SD3 pipeline folder: the CLIP tokenizer (for both CLIP encoders) and T5's, the CLIP-L, CLIP-G and T5
    encoder configs, the transformer's, VAE's and scheduler's constructor arguments; every model made on `device`
    in `dtype`, seeded by `seed`, saved in `dtype`."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clip_tokenizer, t5_tokenizer = tokenizers
    clip_l, clip_g, t5 = text_encoders
    seeded_torch(seed)
    with building_on(device, getattr(torch, dtype)):
        models = dict(
            text_encoder=CLIPTextModelWithProjection(clip_l),
            text_encoder_2=CLIPTextModelWithProjection(clip_g),
            text_encoder_3=T5EncoderModel(t5),
            transformer=SD3Transformer2DModel(**transformer),
            vae=_vae(**vae),
        )
    for model in models.values():
        # Parameters are made in `dtype`; diffusers makes some buffers in float32 whatever the default dtype (the
        # transformer's saved sin-cos position table): cast those (nn.Module.to: diffusers' own `to` warns that a
        # cast is not a load).
        if any(t.is_floating_point() and t.dtype != getattr(torch, dtype) for t in model.state_dict().values()):
            torch.nn.Module.to(model, getattr(torch, dtype))
    StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**scheduler),
        tokenizer=clip_tokenizer,
        tokenizer_2=clip_tokenizer,
        tokenizer_3=t5_tokenizer,
        **models,
    ).save_pretrained(dest, safe_serialization=True)


# --- CLIP (CLIPScore) and BLIP image-text matching: the paper's comparison scorers -------------------


@register("clip", "CLIPModel + CLIPProcessor (ViT patch 16, 64 px), random")
def build_clip(dest: Path, seed: int) -> None:
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPVisionConfig,
    )

    seeded_torch(seed)
    tokenizer = _clip_tokenizer(dest)
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

    seeded_torch(seed)
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


@register_paper("image-reward", "THUDM/ImageReward v1.0: BLIP ViT-L/16 224 px + med BERT-base (12 layers), float32")
def build_image_reward_paper(dest: Path, seed: int, device: str, layers: int | None) -> None:
    from synthalign_ray.models.image_reward import OFFICIAL_MED_CONFIG, RANDOM_VIT_SHAPES, write_random_checkpoint

    write_random_checkpoint(
        dest,
        seed=seed,
        vit="large",
        vit_depth=capped(RANDOM_VIT_SHAPES["large"].depth, layers),
        text_layers=capped(OFFICIAL_MED_CONFIG["num_hidden_layers"], layers),
        vocab_size=OFFICIAL_MED_CONFIG["vocab_size"],
        device=device,
    )

