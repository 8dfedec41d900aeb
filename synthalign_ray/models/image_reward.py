"""ImageReward-v1.0 (THUDM) scoring in batches, on transformers' own BLIP modules.

ImageReward is BLIP plus a head: a ViT encodes the image, BLIP's "med" BERT encodes the prompt with cross-attention to
the image tokens, and a 5-layer linear MLP maps the [CLS] feature to a reward, normalised by the authors' mean and std.

Why not the official `image-reward` package: it does not import on transformers 5 (an undeclared `clip` module, helpers
transformers 5 removed), it scores one image at a time, and it downloads the bert-base-uncased tokenizer from the hub on
every load (offline it silently gets a 5-token tokenizer, so every prompt becomes [UNK]).

Why transformers' BLIP modules rather than a vendored copy of the package's med.py / vit.py: transformers ships the same
two networks, ported from the same BLIP code and maintained for current torch and transformers (`BlipVisionModel` is
BLIP's ViT, `BlipTextModel` is the med BERT with cross-attention), so no timm, fairscale or copied BERT code is needed.
The only glue is a rename of the ViT's state-dict keys (the rename transformers' BLIP conversion script does; the med
BERT keys match one to one), the package's head and its normalisation. tests/integration/test_image_reward_parity.py
proves the scores equal the official package's on the same weights.

Checkpoint folder layout (the THUDM/ImageReward hub repo plus the bert-base-uncased tokenizer):

    ImageReward.pt      state dict of the package's `ImageReward` module (blip.visual_encoder.*, blip.text_encoder.*,
                        mlp.layers.*; other keys such as blip.vision_proj / blip.text_proj are unused)
    med_config.json     config of the med BERT
    vocab.txt           the bert-base-uncased vocabulary (tokenizer_config.json / tokenizer.json optional); may instead
                        sit in a `tokenizer/` subfolder, or be any folder passed as `tokenizer=`
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from synthalign_ray.zoo import wordpiece_vocab, write_wordpiece_vocab

CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_SUBFOLDER = "tokenizer"

# The package's reward normalisation (`ImageReward.mean` / `ImageReward.std`).
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
# The package's tokenizer call in `ImageReward.score`: its ids go to the text encoder as they are ([CLS] first; the
# [ENC] token init_tokenizer adds is not substituted in for scoring).
PROMPT_MAX_TOKENS = 35
# The package's `_transform` normalises with CLIP's statistics.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# BLIP's ViT is timm's VisionTransformer with LayerNorm(eps=1e-6) and 64-wide heads (ViT-B 768/12, ViT-L 1024/16).
VIT_LAYER_NORM_EPS = 1e-6
VIT_HEAD_DIM = 64
# The package's head is MLP(768): the text encoder's width is fixed by it.
HEAD_INPUT_WIDTH = 768
# med_config.json fields that carry over to BlipTextConfig under the same name.
_MED_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "pad_token_id",
)

_VISION_PREFIX = "blip.visual_encoder."
_TEXT_PREFIX = "blip.text_encoder."
_HEAD_PREFIX = "mlp.layers."
# A persistent buffer in the package's BertEmbeddings; transformers builds its own.
_TEXT_POSITION_IDS = "embeddings.position_ids"

# BLIP ViT (timm) names -> BlipVisionModel names, as in transformers' convert_blip_original_pytorch_to_hf.py.
_VISION_RENAMES = (
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
)
# The package's MLP is Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear) with no activation;
# our head keeps only the Linears (dropout is off when scoring), so the Sequential indices shift.
_HEAD_LINEAR_INDICES = (0, 2, 4, 6, 7)
_HEAD_WIDTHS = (HEAD_INPUT_WIDTH, 1024, 128, 64, 16, 1)


def _reward_head() -> nn.Sequential:
    return nn.Sequential(*(nn.Linear(n_in, n_out) for n_in, n_out in zip(_HEAD_WIDTHS, _HEAD_WIDTHS[1:])))


def _convert_to_rgb(image: Image.Image) -> Image.Image:
    return image.convert("RGB")


def image_transform(image_size: int) -> Compose:
    """The package's `_transform(n_px)`: resize the short side, center-crop, RGB, CLIP normalisation."""
    return Compose(
        [
            Resize(image_size, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(image_size),
            _convert_to_rgb,  # after resizing, exactly like the package
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )


class ImageRewardScorer:
    """reward(prompt, image) = (MLP(med_bert(prompt, cross-attending ViT(image))[CLS]) - mean) / std, in batches."""

    def __init__(
        self,
        vision_model: BlipVisionModel,
        text_model: BlipTextModel,
        reward_head: nn.Sequential,
        tokenizer: BertTokenizer,
        *,
        batch_size: int = 16,
    ):
        self.vision_model = vision_model.eval()
        self.text_model = text_model.eval()
        self.reward_head = reward_head.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_size = vision_model.config.image_size
        self.preprocess = image_transform(self.image_size)

    @property
    def device(self) -> torch.device:
        return self.vision_model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.dtype

    def tokenize(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=PROMPT_MAX_TOKENS, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    def score(
        self, prompts: Sequence[str], images: Sequence[Image.Image], *, batch_size: int | None = None
    ) -> list[float]:
        """One reward per (prompts[i], images[i]) pair, computed `batch_size` pairs at a time."""
        if len(prompts) != len(images):
            raise ValueError(f"got {len(prompts)} prompts but {len(images)} images: score() takes one prompt per image")
        for index, image in enumerate(images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a PIL.Image.Image")
        step = batch_size or self.batch_size
        if step < 1:
            raise ValueError(f"batch_size must be >= 1, got {step}")
        rewards: list[float] = []
        for start in range(0, len(prompts), step):
            rewards.extend(self._score_batch(prompts[start : start + step], images[start : start + step]))
        return rewards

    @torch.inference_mode()
    def _score_batch(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> list[float]:
        pixel_values = torch.stack([self.preprocess(image) for image in images])
        image_embeds = self.vision_model(pixel_values.to(self.device, self.dtype)).last_hidden_state
        text = {name: tensor.to(self.device) for name, tensor in self.tokenize(prompts).items()}
        # No encoder mask: every image token is attended, as with the package's all-ones `image_atts`.
        text_output = self.text_model(**text, encoder_hidden_states=image_embeds)
        # The head runs in float32 whatever the encoders' dtype, like the package's `.float()` before its MLP.
        features = text_output.last_hidden_state[:, 0, :].float()
        rewards = (self.reward_head(features).squeeze(-1) - REWARD_MEAN) / REWARD_STD
        return rewards.cpu().tolist()


def load_image_reward(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    tokenizer: str | Path | None = None,
    batch_size: int = 16,
) -> ImageRewardScorer:
    """Load an ImageReward checkpoint folder (layout in the module docstring) into a batched scorer.

    `path` may also be a hub cache repo folder (models--THUDM--ImageReward), whose refs/main snapshot is used. The
    tokenizer is looked up in `tokenizer` if given, else in `path`, else in `path/tokenizer/`.
    """
    model_dir = _resolve_snapshot(Path(path))
    checkpoint = _require_file(model_dir, CHECKPOINT_FILE)
    med_config = json.loads(_require_file(model_dir, MED_CONFIG_FILE).read_text())
    tokenizer_dir = _find_tokenizer_dir(model_dir, tokenizer)

    state_dict = torch.load(checkpoint, map_location="cpu", weights_only=True)
    vision_state, text_state, head_state = _split_state_dict(state_dict, checkpoint)
    del state_dict  # the parts hold the tensors; free the rest (BLIP's unused projections) early
    vision_config = _vision_config(vision_state, checkpoint)
    text_config = _text_config(med_config, vision_width=vision_config.hidden_size, source=model_dir / MED_CONFIG_FILE)

    vision_model = BlipVisionModel(vision_config)
    text_model = BlipTextModel(text_config, add_pooling_layer=False)
    reward_head = _reward_head()
    for part, module, part_state in (
        ("ViT (blip.visual_encoder.*)", vision_model, vision_state),
        ("text encoder (blip.text_encoder.*)", text_model, text_state),
        ("reward head (mlp.layers.*)", reward_head, head_state),
    ):
        try:
            module.load_state_dict(part_state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{checkpoint}: the {part} weights do not fit the architecture: {err}") from err

    bert_tokenizer = _load_tokenizer(tokenizer_dir)
    if len(bert_tokenizer) > text_config.vocab_size:
        raise ValueError(
            f"tokenizer in {tokenizer_dir} has {len(bert_tokenizer)} tokens but {model_dir / MED_CONFIG_FILE} says "
            f"vocab_size={text_config.vocab_size}: wrong tokenizer for this checkpoint"
        )
    return ImageRewardScorer(
        vision_model.to(device=device, dtype=dtype),
        text_model.to(device=device, dtype=dtype),
        reward_head.to(device=device),
        bert_tokenizer,
        batch_size=batch_size,
    )


def _resolve_snapshot(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"ImageReward folder {path} does not exist (or is not a folder)")
    ref = path / "refs" / "main"
    if ref.is_file() and (path / "snapshots").is_dir():
        return path / "snapshots" / ref.read_text().strip()
    return path


def _require_file(folder: Path, name: str) -> Path:
    file = folder / name
    if not file.is_file():
        raise FileNotFoundError(
            f"{name} not found in {folder}: an ImageReward folder holds {CHECKPOINT_FILE}, {MED_CONFIG_FILE} and the "
            f"bert-base-uncased tokenizer ({VOCAB_FILE})"
        )
    return file


def _find_tokenizer_dir(model_dir: Path, tokenizer: str | Path | None) -> Path:
    candidates = [Path(tokenizer)] if tokenizer is not None else [model_dir, model_dir / TOKENIZER_SUBFOLDER]
    for folder in candidates:
        if (folder / VOCAB_FILE).is_file() or (folder / "tokenizer.json").is_file():
            return folder
    # transformers would silently build a 5-token tokenizer from a folder without a vocabulary: refuse instead.
    raise FileNotFoundError(
        f"{VOCAB_FILE} (or tokenizer.json) not found in {' nor in '.join(map(str, candidates))}: ImageReward needs the "
        f"bert-base-uncased tokenizer; put its files beside {CHECKPOINT_FILE}, in a {TOKENIZER_SUBFOLDER}/ subfolder, "
        "or pass tokenizer=<folder>"
    )


# The tokens the package's init_tokenizer adds after bert-base-uncased's 30522 (see _load_tokenizer).
_ADDED_TOKENS = ("[DEC]", "[ENC]")


def _load_tokenizer(folder: Path) -> BertTokenizer:
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    if set(tokenizer.get_vocab()) <= set(tokenizer.all_special_tokens):
        raise ValueError(f"tokenizer in {folder} has only special tokens: every prompt would become [UNK]")
    # As the package's init_tokenizer does: the added tokens take the two ids past bert-base-uncased's 30522, and a
    # prompt that spells them out tokenizes to them.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _split_state_dict(
    state_dict: dict[str, torch.Tensor], source: Path
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The official state dict -> (BlipVisionModel, BlipTextModel, reward head) state dicts; unused keys are dropped."""
    vision_state, text_state, head_state = {}, {}, {}
    for prefix in (_VISION_PREFIX, _TEXT_PREFIX, _HEAD_PREFIX):
        if not any(key.startswith(prefix) for key in state_dict):
            raise ValueError(f"{source} has no {prefix}* weights: not the state dict of an ImageReward model")
    for key, tensor in state_dict.items():
        if key.startswith(_VISION_PREFIX):
            vision_state[_vision_key(key[len(_VISION_PREFIX) :], source)] = tensor
        elif key.startswith(_TEXT_PREFIX):
            text_key = key[len(_TEXT_PREFIX) :]
            if text_key != _TEXT_POSITION_IDS:
                text_state[text_key] = tensor
        elif key.startswith(_HEAD_PREFIX):
            head_state[_head_key(key[len(_HEAD_PREFIX) :], source)] = tensor
    return vision_state, text_state, head_state


def _vision_key(timm_key: str, source: Path) -> str:
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, timm_key)
        if count:
            return renamed
    raise ValueError(f"{source}: unexpected ViT weight {_VISION_PREFIX}{timm_key}")


def _head_key(sequential_key: str, source: Path) -> str:
    index, _, param = sequential_key.partition(".")
    if not index.isdigit() or int(index) not in _HEAD_LINEAR_INDICES:
        raise ValueError(f"{source}: unexpected reward-head weight {_HEAD_PREFIX}{sequential_key}")
    return f"{_HEAD_LINEAR_INDICES.index(int(index))}.{param}"


def _vision_config(vision_state: dict[str, torch.Tensor], source: Path) -> BlipVisionConfig:
    """The ViT's size, read off the weights (the package hard-codes ViT-L; this also loads other sizes)."""
    try:
        width, _, patch_size, _ = vision_state["embeddings.patch_embedding.weight"].shape
        num_positions = vision_state["embeddings.position_embedding"].shape[1]
        intermediate_size = vision_state["encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"{source}: a ViT weight is missing ({err.args[0]} in transformers' naming)") from err
    grid = math.isqrt(num_positions - 1)  # one position per patch of a square grid, plus the class token
    if grid * grid != num_positions - 1:
        raise ValueError(f"{source}: ViT pos_embed has {num_positions} positions, not 1 + a square number of patches")
    layer_indices = (re.match(r"encoder\.layers\.(\d+)\.", key) for key in vision_state)
    depth = 1 + max(int(match.group(1)) for match in layer_indices if match)
    return BlipVisionConfig(
        hidden_size=width,
        intermediate_size=intermediate_size,
        num_hidden_layers=depth,
        num_attention_heads=width // VIT_HEAD_DIM,
        image_size=grid * patch_size,
        patch_size=patch_size,
        layer_norm_eps=VIT_LAYER_NORM_EPS,
    )


def _text_config(med_config: dict, *, vision_width: int, source: Path) -> BlipTextConfig:
    """The med BERT config as transformers' BlipTextConfig (the package, too, sets encoder_width to the ViT's width)."""
    missing = [field for field in _MED_CONFIG_FIELDS if field not in med_config]
    if missing:
        raise ValueError(f"{source}: missing field(s) {', '.join(missing)}")
    if med_config["hidden_size"] != HEAD_INPUT_WIDTH:
        raise ValueError(
            f"{source}: hidden_size must be {HEAD_INPUT_WIDTH} (the reward head's input width), "
            f"got {med_config['hidden_size']}"
        )
    position_embedding_type = med_config.get("position_embedding_type", "absolute")
    if position_embedding_type != "absolute":
        raise ValueError(f"{source}: position_embedding_type={position_embedding_type!r} is not supported")
    return BlipTextConfig(
        **{field: med_config[field] for field in _MED_CONFIG_FIELDS},
        encoder_hidden_size=vision_width,
        # Generation-only ids with BERT-vocabulary defaults that need not exist in a smaller vocabulary.
        bos_token_id=None,
        eos_token_id=None,
        sep_token_id=None,
        # In BlipTextModel `is_decoder` is what builds the cross-attention layers (med's add_cross_attention);
        # the forward pass still uses a bidirectional mask, as the package's encoder does.
        is_decoder=True,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Random checkpoints in the official format (tests, benchmarks and the offline zoo).
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VitShape:
    width: int
    depth: int
    patch_size: int
    image_size: int


RANDOM_VIT_SHAPES = {
    "tiny": _VitShape(width=128, depth=2, patch_size=16, image_size=64),
    # What the package hard-codes (create_vit('large', 224)): only this size loads into the official package.
    "large": _VitShape(width=1024, depth=24, patch_size=16, image_size=224),
}

# THUDM/ImageReward's med_config.json; write_random_checkpoint overrides the depth and the vocabulary size.
OFFICIAL_MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30524,
    "encoder_width": 768,
    "add_cross_attention": True,
}
_TOKENIZER_CONFIG = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}


def write_random_checkpoint(
    dest: Path,
    *,
    seed: int,
    vit: str = "tiny",
    text_layers: int = 2,
    vit_depth: int | None = None,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
) -> Path:
    """Write a random-weight ImageReward folder in the official format; returns `dest`.

    `vit="large"` is the package's ViT-L/16 at 224 px, so the official package can load the result; `"tiny"` is a small
    ViT only `load_image_reward` loads; `vit_depth` overrides its number of blocks. The text encoder keeps the real
    width (768, fixed by the package's head) with `text_layers` layers. `vocab_size` (the released 30524) pads the BERT
    vocabulary so that it, with the [DEC] and [ENC] the loader adds, has that many tokens. Weights are drawn on
    `device` (float32, as the released .pt) and saved from the host. They are scaled so that activations stay O(1)
    through every layer and scores differ clearly across images and prompts (the package's own head init would score
    everything ~= -mean/std).
    """
    if vit not in RANDOM_VIT_SHAPES:
        raise ValueError(f"vit must be one of {sorted(RANDOM_VIT_SHAPES)}, got {vit!r}")
    vit_shape = RANDOM_VIT_SHAPES[vit] if vit_depth is None else replace(RANDOM_VIT_SHAPES[vit], depth=vit_depth)
    dest.mkdir(parents=True, exist_ok=True)

    bert_vocab_size = None if vocab_size is None else vocab_size - len(_ADDED_TOKENS)
    vocab = wordpiece_vocab(bert_vocab_size)
    write_wordpiece_vocab(dest, bert_vocab_size)
    (dest / "tokenizer_config.json").write_text(json.dumps(_TOKENIZER_CONFIG, indent=2))
    med_config = {
        **OFFICIAL_MED_CONFIG,
        "num_hidden_layers": text_layers,
        # + the [DEC] and [ENC] tokens init_tokenizer adds, as 30522 + 2 in the original
        "vocab_size": len(vocab) + len(_ADDED_TOKENS),
    }
    (dest / MED_CONFIG_FILE).write_text(json.dumps(med_config, indent=2))

    generator = torch.Generator(device).manual_seed(seed)
    state_dict = {
        key: _random_tensor(key, shape, generator).cpu()
        for key, shape in _official_shapes(vit_shape, med_config).items()
    }
    torch.save(state_dict, dest / CHECKPOINT_FILE)
    return dest


def _official_shapes(vit: _VitShape, med_config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the package's `ImageReward` state dict, by name, for this ViT and med config."""
    width, patches = vit.width, (vit.image_size // vit.patch_size) ** 2
    hidden, intermediate = med_config["hidden_size"], med_config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name: str, n_in: int, n_out: int) -> None:
        shapes[f"{name}.weight"] = (n_out, n_in)
        shapes[f"{name}.bias"] = (n_out,)

    def layer_norm(name: str, size: int) -> None:
        shapes[f"{name}.weight"] = (size,)
        shapes[f"{name}.bias"] = (size,)

    vision = _VISION_PREFIX
    shapes[f"{vision}cls_token"] = (1, 1, width)
    shapes[f"{vision}pos_embed"] = (1, patches + 1, width)
    shapes[f"{vision}patch_embed.proj.weight"] = (width, 3, vit.patch_size, vit.patch_size)
    shapes[f"{vision}patch_embed.proj.bias"] = (width,)
    for block in range(vit.depth):
        prefix = f"{vision}blocks.{block}."
        layer_norm(f"{prefix}norm1", width)
        linear(f"{prefix}attn.qkv", width, 3 * width)
        linear(f"{prefix}attn.proj", width, width)
        layer_norm(f"{prefix}norm2", width)
        linear(f"{prefix}mlp.fc1", width, 4 * width)
        linear(f"{prefix}mlp.fc2", 4 * width, width)
    layer_norm(f"{vision}norm", width)

    text = _TEXT_PREFIX
    shapes[f"{text}embeddings.position_ids"] = (1, med_config["max_position_embeddings"])
    shapes[f"{text}embeddings.word_embeddings.weight"] = (med_config["vocab_size"], hidden)
    shapes[f"{text}embeddings.position_embeddings.weight"] = (med_config["max_position_embeddings"], hidden)
    layer_norm(f"{text}embeddings.LayerNorm", hidden)
    for layer in range(med_config["num_hidden_layers"]):
        prefix = f"{text}encoder.layer.{layer}."
        for attention, key_width in (("attention", hidden), ("crossattention", width)):
            linear(f"{prefix}{attention}.self.query", hidden, hidden)
            linear(f"{prefix}{attention}.self.key", key_width, hidden)
            linear(f"{prefix}{attention}.self.value", key_width, hidden)
            linear(f"{prefix}{attention}.output.dense", hidden, hidden)
            layer_norm(f"{prefix}{attention}.output.LayerNorm", hidden)
        linear(f"{prefix}intermediate.dense", hidden, intermediate)
        linear(f"{prefix}output.dense", intermediate, hidden)
        layer_norm(f"{prefix}output.LayerNorm", hidden)

    # BLIP pretraining's contrastive projections: in the real checkpoint, unused for scoring.
    linear("blip.vision_proj", width, 256)
    linear("blip.text_proj", hidden, 256)
    for index, n_in, n_out in zip(_HEAD_LINEAR_INDICES, _HEAD_WIDTHS, _HEAD_WIDTHS[1:]):
        linear(f"{_HEAD_PREFIX}{index}", n_in, n_out)
    return shapes


def _random_tensor(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], device=generator.device).expand(shape).clone()
    noise = torch.randn(shape, generator=generator, device=generator.device)
    name = key.rsplit(".", 1)[-1]
    if "norm" in key.lower() and name == "weight":
        # Not all ones: a swapped or misplaced LayerNorm must change the scores for the parity test to see it.
        return 1.0 + 0.1 * noise
    if name == "bias":
        return 0.02 * noise
    if name == "weight":  # Linear, Conv2d, Embedding: unit-variance outputs for unit-variance inputs
        return noise / math.sqrt(math.prod(shape[1:]))
    return 0.1 * noise  # cls_token, pos_embed
