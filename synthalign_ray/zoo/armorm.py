"""`armorm`: a twin of RLHFlow/ArmoRM-Llama3-8B-v0.1, the paper's reward model, at a tiny width.

The same files as the release: config.json (`model_type: llama`, `architectures: [LlamaForRewardModelWithGating]`,
`auto_map` to modeling_custom.py, num_objectives and the gating fields with the released values), bfloat16
safetensors under the released key names, and a Llama-3 tokenizer at Llama-3's ids: 128000 byte-level BPE ids, the
256 special tokens at 128000-128255, ArmoRM's added `[PAD]` at 128256, no BOS added on encode (the chat template
writes it), and Meta-Llama-3-8B-Instruct's chat template. The ids matter: the released forward finds the prompt's
end by the hard-coded ids of `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`.

Only the width differs (64 instead of 4096, 2 layers instead of 32; `zoo.build("armorm", scale="paper")` makes the
released shapes from the released config.json, paper_configs/ArmoRM-Llama3-8B-v0.1/); the BPE merges are trained on
the zoo corpus and the ids no merge reaches are unused fillers. modeling_custom.py holds the release's import line only: the part
that decides, under the installed transformers, what `trust_remote_code` loading does (it fails since transformers
5 removed LLAMA_INPUTS_DOCSTRING); synthalign_ray.models.armorm loads the folder instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from synthalign_ray.zoo.language import LLAMA3_ASSISTANT_TURN, LLAMA3_CHAT_TEMPLATE, byte_level_tokenizer
from synthalign_ray.zoo.registry import building_on, capped, paper_config, register, register_paper, seeded_torch

LLAMA3_BPE_SIZE = 128000
LLAMA3_NAMED_SPECIAL_TOKENS = {
    128000: "<|begin_of_text|>",
    128001: "<|end_of_text|>",
    128006: "<|start_header_id|>",
    128007: "<|end_header_id|>",
    128009: "<|eot_id|>",
}
LLAMA3_SPECIAL_TOKEN_COUNT = 256
ARMORM_PAD_TOKEN = "[PAD]"
# Ordinary BPE tokens the gating pattern contains, at their Llama-3 ids ("\n\n" is "ĊĊ" in byte-level BPE).
LLAMA3_PINNED_TOKENS = {"assistant": 78191, "ĊĊ": 271}
RELEASED_MODELING_FILE = "modeling_custom.py"
_RELEASED_IMPORT_LINE = '''"""The twin's stand-in for the release's modeling_custom.py: its first import, nothing else.

See synthalign_ray/zoo/armorm.py."""

from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING  # noqa: F401
'''
# Llama-3-8B's fields other than the sizes, as ArmoRM's config.json has them.
_LLAMA3_FIELDS = dict(
    bos_token_id=128000,
    eos_token_id=128009,
    max_position_embeddings=8192,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    attention_bias=False,
    tie_word_embeddings=False,
    # Llama-3's 128256 rows plus [PAD]'s: LlamaModel's embedding needs the pad id inside the table.
    vocab_size=LLAMA3_BPE_SIZE + LLAMA3_SPECIAL_TOKEN_COUNT + 1,
)
_TWIN_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1
)


def _special_tokens() -> dict[int, str]:
    reserved = (f"<|reserved_special_token_{k}|>" for k in range(LLAMA3_SPECIAL_TOKEN_COUNT))
    tokens = {
        token_id: LLAMA3_NAMED_SPECIAL_TOKENS.get(token_id) or next(reserved)
        for token_id in range(LLAMA3_BPE_SIZE, LLAMA3_BPE_SIZE + LLAMA3_SPECIAL_TOKEN_COUNT)
    }
    tokens[LLAMA3_BPE_SIZE + LLAMA3_SPECIAL_TOKEN_COUNT] = ARMORM_PAD_TOKEN
    return tokens


def armorm_tokenizer():
    """The zoo's byte-level BPE re-numbered to Llama-3's ids, with ArmoRM's special tokens and post-processor."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(byte_level_tokenizer().to_str())
    trained = sorted(spec["model"]["vocab"], key=spec["model"]["vocab"].get)
    free_ids = iter(i for i in range(LLAMA3_BPE_SIZE) if i not in LLAMA3_PINNED_TOKENS.values())
    vocab = {token: LLAMA3_PINNED_TOKENS.get(token, -1) for token in trained}
    vocab = {token: token_id if token_id >= 0 else next(free_ids) for token, token_id in vocab.items()}
    # "<|...|>" never comes out of Llama-3's split regex as one piece, so no text ever maps to a filler.
    vocab |= {f"<|twin_unused_{token_id}|>": token_id for token_id in free_ids}
    spec["model"]["vocab"] = vocab
    spec["added_tokens"] = [
        {"id": token_id, "content": content, "special": True}
        | dict.fromkeys(("single_word", "lstrip", "rstrip", "normalized"), False)
        for token_id, content in _special_tokens().items()
    ]
    # ArmoRM's tokenizer.json post-processes with ByteLevel only: no <|begin_of_text|> added on encode.
    spec["post_processor"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=ARMORM_PAD_TOKEN,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )


@register("armorm", "Twin of ArmoRM-Llama3-8B-v0.1: released config, keys and Llama-3 token ids, tiny width, random")
def build_armorm(dest: Path, seed: int) -> None:
    from transformers import LlamaConfig

    from synthalign_ray.models import armorm

    tokenizer = armorm_tokenizer()
    config = LlamaConfig(
        **_LLAMA3_FIELDS,
        **_TWIN_SIZES,
        pad_token_id=tokenizer.pad_token_id,
        num_labels=1,
        num_objectives=armorm.DEFAULT_NUM_OBJECTIVES,
        gating_temperature=armorm.DEFAULT_GATING_TEMPERATURE,
        gating_hidden_dim=armorm.DEFAULT_GATING_HIDDEN_DIM,
        gating_n_hidden=armorm.DEFAULT_GATING_N_HIDDEN,
        auto_map={"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"},
    )
    _write_armorm(dest, seed, config, tokenizer)


# RLHFlow/ArmoRM-Llama3-8B-v0.1's config.json under paper_configs/: Llama-3-8B's sizes, vocab 128257 ([PAD] at
# 128256), eos 128001, the gating fields. Its weights are bfloat16 (the twin's dtype), whatever its torch_dtype says.
ARMORM_RELEASE = "ArmoRM-Llama3-8B-v0.1"


@register_paper("armorm", "RLHFlow/ArmoRM-Llama3-8B-v0.1: Llama-3-8B backbone + gating and regression heads, bf16")
def build_armorm_paper(dest: Path, seed: int, device: str, layers: int | None) -> None:
    from transformers import LlamaConfig

    config = LlamaConfig.from_dict(paper_config(ARMORM_RELEASE, "config.json"))
    config.num_hidden_layers = capped(config.num_hidden_layers, layers)
    _write_armorm(dest, seed, config, armorm_tokenizer(), device=device, dtype="bfloat16")


def _write_armorm(dest: Path, seed: int, config, tokenizer, *, device: str = "cpu", dtype: str = "float32") -> None:
    """ArmoRM's files for `config`: the model made on `device` in `dtype`, seeded by `seed`, saved in bfloat16 with
    the tokenizer and the release's modeling_custom.py import line."""
    import torch

    from synthalign_ray.models import armorm

    pattern = tokenizer.encode(LLAMA3_ASSISTANT_TURN, add_special_tokens=False)
    if tuple(pattern) != armorm.GATING_TOKEN_PATTERN:
        raise AssertionError(f"the twin's tokenizer encodes the gating pattern as {pattern}")
    if config.pad_token_id != tokenizer.pad_token_id:
        raise AssertionError(f"config pad id {config.pad_token_id} is not the tokenizer's {tokenizer.pad_token_id}")
    seeded_torch(seed)
    with building_on(device, getattr(torch, dtype)):
        model = armorm.LlamaForRewardModelWithGating(config)
    with torch.no_grad():
        # The released transform and scale are learned; identity and 1 would hide a mix-up.
        n = config.num_objectives
        model.reward_transform_matrix.copy_(torch.eye(n) + 0.1 * torch.randn(n, n))
        model.gating.logit_scale.fill_(2.5)
        # He-scaled gating layers: at the default init (std 0.02) the gate is uniform to 1e-4 after the
        # temperature, so reading the wrong token would not change a score.
        for layer in model.gating.layers:
            layer.weight.normal_(0.0, (2.0 / layer.in_features) ** 0.5)
            layer.bias.normal_(0.0, 0.1)
        model.gating.layers[-1].weight.mul_(8.0)
    model.to(torch.bfloat16).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    (dest / RELEASED_MODELING_FILE).write_text(_RELEASED_IMPORT_LINE)
