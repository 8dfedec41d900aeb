"""Image-side twins: a Stable-Diffusion-layout pipeline, CLIP, BLIP and ImageReward-v1.0's file format."""

from __future__ import annotations

import shutil
from pathlib import Path

from synthalign_ray.zoo.registry import CORPUS, seeded_torch, register

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

    torch = seeded_torch(seed)
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

    seeded_torch(seed)
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

