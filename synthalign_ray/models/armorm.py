"""ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1), loaded from its released files without running their code.

The released folder names its own class in config.json (`auto_map` -> modeling_custom.py). That file imports
`LLAMA_INPUTS_DOCSTRING` from transformers' Llama module, which transformers 5 no longer has, so loading it with
`trust_remote_code` fails with an ImportError. Running a folder's code is also something to avoid where it is not
needed. This module reads the same config.json and safetensors into a class of our own, chosen by `architectures`:

    model.*                      Llama backbone (LlamaModel), config.json's Llama fields
    regression_layer.weight      (num_objectives, hidden): one reward per objective, no bias
    gating.layers.{i}.weight/bias  MLP, gating_n_hidden hidden layers of gating_hidden_dim, ReLU between
    gating.logit_scale           (1,)
    reward_transform_matrix      (num_objectives, num_objectives)

Forward, as the released model computes it:
- the rewards are read at the last real token (the released code: "the token before the first pad id");
- the gate reads the hidden state at the first token of the last occurrence of Llama-3's
  `<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n` (ids hard-coded there, as here), where the prompt
  ends;
- gate = softmax(mlp(x) / gating_temperature) * logit_scale, and score = sum(gate * (rewards @ transform)).

One deliberate difference, invisible on well-formed right-padded input: the last real token comes from the attention
mask rather than from the first pad id, so a "[PAD]" typed inside an answer cannot move it.
tests/integration/test_armorm.py checks the scores against a reference written from the released forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.modeling_outputs import ModelOutput
from transformers.models.llama.modeling_llama import LlamaModel, LlamaPreTrainedModel

# Llama-3 token ids of "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", as the released code has them.
GATING_TOKEN_PATTERN = (128009, 128006, 78191, 128007, 271)
# The released config's values, which its code also uses as defaults.
DEFAULT_NUM_OBJECTIVES = 19
DEFAULT_GATING_TEMPERATURE = 10.0
DEFAULT_GATING_HIDDEN_DIM = 1024
DEFAULT_GATING_N_HIDDEN = 3


def last_pattern_start(ids: Sequence[int], pattern: Sequence[int] = GATING_TOKEN_PATTERN) -> int:
    """Index where the last occurrence of `pattern` in `ids` starts; ValueError if it does not occur."""
    ids, pattern = list(ids), list(pattern)
    for start in range(len(ids) - len(pattern), -1, -1):
        if ids[start : start + len(pattern)] == pattern:
            return start
    raise ValueError(
        "ArmoRM needs a user turn followed by an assistant turn in Llama-3's chat format; the token pattern "
        f"{pattern} (<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n) is not in the input"
    )


@dataclass
class ArmoRMOutput(ModelOutput):
    """score (batch,): the preference; rewards (batch, objectives); gating_output (batch, objectives): the mix;
    hidden_state and prompt_embedding: the hidden states the rewards and the gate read; logits = score."""

    score: torch.FloatTensor | None = None
    rewards: torch.FloatTensor | None = None
    gating_output: torch.FloatTensor | None = None
    hidden_state: torch.FloatTensor | None = None
    prompt_embedding: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None


class GatingNetwork(nn.Module):
    def __init__(self, in_features: int, out_features: int, temperature: float, hidden_dim: int, n_hidden: int):
        super().__init__()
        widths = [in_features] + [hidden_dim] * n_hidden + [out_features]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths, widths[1:]))
        self.logit_scale = nn.Parameter(torch.ones(1))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return F.softmax(self.layers[-1](x) / self.temperature, dim=1) * self.logit_scale[0]


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    """ArmoRM's released architecture under its released name, so that `save_pretrained` writes the same config."""

    config_class = LlamaConfig

    def __init__(self, config: LlamaConfig):
        super().__init__(config)
        n = getattr(config, "num_objectives", DEFAULT_NUM_OBJECTIVES)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, n, bias=False)
        self.gating = GatingNetwork(
            config.hidden_size,
            n,
            temperature=getattr(config, "gating_temperature", DEFAULT_GATING_TEMPERATURE),
            hidden_dim=getattr(config, "gating_hidden_dim", DEFAULT_GATING_HIDDEN_DIM),
            n_hidden=getattr(config, "gating_n_hidden", DEFAULT_GATING_N_HIDDEN),
        )
        self.reward_transform_matrix = nn.Parameter(torch.eye(n), requires_grad=False)
        self.post_init()

    def forward(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> ArmoRMOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = attention_mask.sum(-1)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
            raise ValueError("ArmoRM reads each text's last token: pad the batch on the right")
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        hidden_state = hidden[rows, lengths - 1]
        prompt_end = [last_pattern_start(ids[:n].tolist()) for ids, n in zip(input_ids, lengths)]
        prompt_embedding = hidden[rows, torch.tensor(prompt_end, device=input_ids.device)]
        rewards = self.regression_layer(hidden_state)
        gating_output = self.gating(prompt_embedding)
        score = torch.sum(gating_output * (rewards @ self.reward_transform_matrix), dim=1)
        return ArmoRMOutput(
            score=score,
            rewards=rewards,
            gating_output=gating_output,
            hidden_state=hidden_state,
            prompt_embedding=prompt_embedding,
            logits=score,
        )
