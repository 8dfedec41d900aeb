"""Run the official `image-reward` 1.5 package on transformers 5 -- for the parity test and the benchmark ONLY.

Production code never imports this module: `synthalign_ray.models.image_reward` is the scorer. This is the one place
where tests/integration/test_image_reward_parity.py and benchmarks/bench_image_reward.py get the reference
implementation running, so both compare against the same thing.

The package fails on transformers 5 in five places; `official_image_reward()` patches each for the duration of a `with`
block, without touching any installed file:
  1. AestheticScore.py / CLIPScore.py import OpenAI's `clip`, which the package does not declare: a stub module (scoring
     never uses CLIP). ReFL.py (fine-tuning) imports `datasets`: a stub too where it is not installed, as on the GPU
     machines of benchmarks/gpu_check.py.
  2. med.py imports `apply_chunking_to_forward`, `find_pruneable_heads_and_indices` and `prune_linear_layer` from
     transformers.modeling_utils: provided there again (from transformers.pytorch_utils; head pruning is never used).
  3. blip.py's init_tokenizer downloads bert-base-uncased from the hub (offline: a silent 5-token tokenizer) and reads
     `additional_special_tokens_ids`, gone in transformers 5: the same steps on a local tokenizer folder.
  4. med.py's BertModel never calls post_init(), which is what sets `all_tied_weights_keys` in transformers 5: an empty
     mapping (med's BERT ties nothing).
  5. `invert_attention_mask` and `get_head_mask`, removed from PreTrainedModel in transformers 5: transformers 4's
     versions for what scoring needs.
On exit the patches are undone, the package's modules and the stub leave sys.modules, and the logging verbosity and
warning filters the package changes globally at import are restored: use the package only inside the block.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import torch

PACKAGE = "ImageReward"


@contextlib.contextmanager
def official_image_reward(tokenizer_dir: Path) -> Iterator[types.ModuleType]:
    """Import the official package with the transformers 5 patches; yields the `ImageReward` module.

    `tokenizer_dir` holds the bert-base-uncased tokenizer files (vocab.txt) the package would otherwise download.
    """
    if PACKAGE in sys.modules:
        raise RuntimeError(f"{PACKAGE} is already imported: official_image_reward() imports it with its patches")
    import transformers
    import transformers.modeling_utils
    import transformers.pytorch_utils

    verbosity = transformers.logging.get_verbosity()
    with warnings.catch_warnings(), contextlib.ExitStack() as patches:
        stubs = {"clip": _unused_module("clip")}
        if importlib.util.find_spec("datasets") is None:
            stubs["datasets"] = _unused_module("datasets", "load_dataset")  # ReFL's one import from it
        patches.callback(_forget_package_modules, list(stubs))
        patches.callback(transformers.logging.set_verbosity, verbosity)
        sys.modules.update(stubs)
        for name, replacement in (
            ("apply_chunking_to_forward", transformers.pytorch_utils.apply_chunking_to_forward),
            ("find_pruneable_heads_and_indices", _head_pruning_unused),
            ("prune_linear_layer", transformers.pytorch_utils.prune_linear_layer),
        ):
            patches.enter_context(mock.patch.object(transformers.modeling_utils, name, replacement, create=True))

        package = __import__(PACKAGE)
        med = sys.modules[f"{PACKAGE}.models.BLIP.med"]
        blip_pretrain = sys.modules[f"{PACKAGE}.models.BLIP.blip_pretrain"]
        for target, name, replacement in (
            (blip_pretrain, "init_tokenizer", lambda: _init_tokenizer(tokenizer_dir)),
            (med.BertPreTrainedModel, "all_tied_weights_keys", {}),
            (med.BertModel, "invert_attention_mask", _invert_attention_mask),
            (med.BertModel, "get_head_mask", _get_head_mask),
        ):
            patches.enter_context(mock.patch.object(target, name, replacement, create=True))
        yield package


def _forget_package_modules(stubs: list[str]) -> None:
    for name in [name for name in sys.modules if name == PACKAGE or name.startswith(f"{PACKAGE}.")] + stubs:
        sys.modules.pop(name, None)


def _unused_module(name: str, *functions: str) -> types.ModuleType:
    """A stand-in for a module the package imports but scoring never uses, with the functions it imports from it,
    which fail if called."""

    def unused(*args, **kwargs):
        raise NotImplementedError(f"{name} is a stub in official_image_reward(): scoring does not use it")

    module = types.ModuleType(name)
    for function in functions:
        setattr(module, function, unused)
    return module


def _head_pruning_unused(*args, **kwargs):
    raise NotImplementedError("head pruning is not supported by the official ImageReward compatibility patches")


def _init_tokenizer(tokenizer_dir: Path):
    """blip.init_tokenizer on a local folder; enc_token_id looked up the transformers 5 way."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.convert_tokens_to_ids("[ENC]")
    return tokenizer


def _invert_attention_mask(self, encoder_attention_mask: torch.Tensor) -> torch.Tensor:
    """transformers 4's ModuleUtilsMixin.invert_attention_mask: 1 = attend -> 0, 0 = masked -> dtype's minimum."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers: int):
    """transformers 4's ModuleUtilsMixin.get_head_mask for the only case scoring uses: no head mask."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported by the official ImageReward compatibility patches")
    return [None] * num_hidden_layers
