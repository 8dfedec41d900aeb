"""ArmoRM: the `armorm` twin has the released files, and the project's module scores them as the released forward does.

The reference below is written from the released forward's description (synthalign_ray/models/armorm.py's
docstring), not from the module: the reward at the token before the first pad id, the gate at the start of the last
`<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n`, softmax(mlp / temperature) * logit_scale, and
sum(gate * (rewards @ transform)). Only the Llama backbone is shared, as it is with the released code.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from synthalign_ray import zoo
from synthalign_ray.models.armorm import LlamaForRewardModelWithGating, last_pattern_start
from synthalign_ray.stages.response_scores import ResponseScorer, ResponseScoresConfig

ARMORM = "zoo:armorm"
# Llama-3's ids, which the released modeling code hard-codes.
RELEASED_PATTERN = [128009, 128006, 78191, 128007, 271]
RELEASED_SPECIAL_IDS = {
    "<|begin_of_text|>": 128000,
    "<|end_of_text|>": 128001,
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eot_id|>": 128009,
    "<|reserved_special_token_250|>": 128255,
    "[PAD]": 128256,
}
CONVERSATIONS = [
    [("what is in the picture", "a dog")],
    [("describe the scene in detail", "a busy street with a red bus and many people walking near the station")],
    [("what color is the car", "red"), ("and the sky", "blue with a few white clouds over the city")],
    [("count the birds", "three birds fly over the lake at sunset")],
]
# Measured on this machine (2026-12-06): the fp32 module against the fp32 reference, 4.5e-8 on scores and 3.6e-7 on
# the gate; bf16 weights and activations against the fp32 reference, 1.4e-3 on scores of about 0.1.
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 5e-3


@pytest.fixture(scope="module")
def folder():
    return zoo.build("armorm")


@pytest.fixture(scope="module")
def scorer():
    return ResponseScorer(ResponseScoresConfig(model=ARMORM, dtype="float32", micro_batch_size=4))


def encode(tokenizer, conversation) -> list[int]:
    messages = [
        {"role": role, "content": text} for turn in conversation for role, text in zip(("user", "assistant"), turn)
    ]
    return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]


def reference_forward(folder, batch: list[list[int]]) -> dict[str, torch.Tensor]:
    """ArmoRM's released forward on a right-padded batch, from its description, in float32."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig.from_pretrained(folder)
    weights = {key: tensor.float() for key, tensor in load_file(folder / "model.safetensors").items()}
    backbone = LlamaModel(config).float().eval()
    backbone.load_state_dict({key[len("model.") :]: t for key, t in weights.items() if key.startswith("model.")})
    input_ids, attention_mask = pad_right(batch, config.pad_token_id)
    width = input_ids.shape[1]
    with torch.no_grad():
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    rows = torch.arange(len(batch))
    before_first_pad = (torch.eq(input_ids, config.pad_token_id).int().argmax(-1) - 1) % width
    gate_at = []
    for ids in input_ids.tolist():
        n = len(RELEASED_PATTERN)
        gate_at.append([j for j in range(len(ids) - n + 1) if ids[j : j + n] == RELEASED_PATTERN][-1])
    rewards = hidden[rows, before_first_pad] @ weights["regression_layer.weight"].T
    x = hidden[rows, gate_at]
    n_layers = len([key for key in weights if key.startswith("gating.layers.") and key.endswith(".weight")])
    for i in range(n_layers):
        x = x @ weights[f"gating.layers.{i}.weight"].T + weights[f"gating.layers.{i}.bias"]
        if i < n_layers - 1:
            x = torch.relu(x)
    gate = torch.softmax(x / config.gating_temperature, dim=1) * weights["gating.logit_scale"][0]
    score = (gate * (rewards @ weights["reward_transform_matrix"])).sum(dim=1)
    return {"score": score, "rewards": rewards, "gate": gate}


def pad_right(batch: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
    return input_ids, (input_ids != pad).long()


def test_twin_has_the_released_layout(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForRewardModelWithGating"]
    assert config["auto_map"] == {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}
    assert (folder / "modeling_custom.py").is_file()
    released = dict(num_objectives=19, gating_temperature=10, gating_hidden_dim=1024, gating_n_hidden=3)
    assert {key: config[key] for key in released} == released
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (128000, 128009, 128256)
    assert config["dtype"] == "bfloat16"

    weights = load_file(folder / "model.safetensors")
    heads = {key: list(t.shape) for key, t in weights.items() if not key.startswith("model.")}
    hidden = config["hidden_size"]
    assert heads == {
        "regression_layer.weight": [19, hidden],
        "reward_transform_matrix": [19, 19],
        "gating.layers.0.weight": [1024, hidden],
        "gating.layers.0.bias": [1024],
        "gating.layers.1.weight": [1024, 1024],
        "gating.layers.1.bias": [1024],
        "gating.layers.2.weight": [1024, 1024],
        "gating.layers.2.bias": [1024],
        "gating.layers.3.weight": [19, 1024],
        "gating.layers.3.bias": [19],
        "gating.logit_scale": [1],
    }
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert list(weights["model.embed_tokens.weight"].shape) == [config["vocab_size"], hidden]


def test_twin_tokenizer_has_llama3_ids(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert {token: tokenizer.convert_tokens_to_ids(token) for token in RELEASED_SPECIAL_IDS} == RELEASED_SPECIAL_IDS
    assert tokenizer.pad_token == "[PAD]" and tokenizer.eos_token == "<|eot_id|>"
    turn = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert tokenizer.encode(turn, add_special_tokens=False) == RELEASED_PATTERN
    # As ArmoRM's tokenizer.json: no BOS on a plain encode; the chat template writes the one BOS.
    text = "a young woman is riding a bicycle"
    assert tokenizer(text)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert len(tokenizer(text)["input_ids"]) <= len(text.split()) + 2  # corpus words stay whole
    unseen = "Café, 42 dogs! Über-große Äpfel?"
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen
    ids = encode(tokenizer, CONVERSATIONS[0])
    assert ids.count(128000) == 1 and ids[0] == 128000
    assert tokenizer.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nwhat is in the picture<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na dog<|eot_id|>"
    )


def test_released_code_does_not_import_under_installed_transformers(folder):
    """Why the project loads ArmoRM itself: the release's own code path fails at its first import."""
    from transformers import AutoModelForSequenceClassification

    with pytest.raises(ImportError, match="LLAMA_INPUTS_DOCSTRING"):
        AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)


def test_stage_loads_the_twin_without_remote_code(scorer):
    assert isinstance(scorer.model, LlamaForRewardModelWithGating)
    assert not scorer.cfg.trust_remote_code
    assert scorer.num_rewards == 19 and scorer.pad_id == 128256


def test_scores_match_the_released_forward_on_padded_batches(folder, scorer):
    batch = [encode(scorer.tokenizer, conversation) for conversation in CONVERSATIONS]
    assert len({len(ids) for ids in batch}) == len(batch)  # every row padded by a different amount
    got = scorer._forward(batch)
    want = reference_forward(folder, batch)
    score_error = (got["score"] - want["score"]).abs().max().item()
    rewards_error = (got["rewards"] - want["rewards"]).abs().max().item()
    with torch.no_grad():
        gate = scorer.model(*pad_right(batch, scorer.pad_id)).gating_output
    gate_error = (gate - want["gate"]).abs().max().item()
    print(f"ArmoRM parity, fp32, batch of {len(batch)}: score {score_error:.2e}, rewards {rewards_error:.2e}, "
          f"gate {gate_error:.2e}")
    assert score_error < FP32_TOLERANCE and rewards_error < FP32_TOLERANCE and gate_error < FP32_TOLERANCE
    assert want["score"].abs().min() > 10 * FP32_TOLERANCE  # the comparison is not between zeros
    # The two-turn conversation has the pattern twice: the gate must read the last one.
    ids = batch[2]
    starts = [j for j in range(len(ids) - 4) if ids[j : j + 5] == RELEASED_PATTERN]
    assert len(starts) == 2 and last_pattern_start(ids) == starts[1]


def test_bfloat16_scores_stay_close(folder):
    """The paper's dtype: bf16 weights and activations against the fp32 reference."""
    scorer = ResponseScorer(ResponseScoresConfig(model=ARMORM, dtype="bfloat16"))
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    batch = [encode(scorer.tokenizer, conversation) for conversation in CONVERSATIONS]
    got = scorer._forward(batch)
    want = reference_forward(folder, batch)
    error = (got["score"] - want["score"]).abs().max().item()
    print(f"ArmoRM bf16 vs fp32 reference: score {error:.3e} (scores {want['score'].tolist()})")
    assert error < BF16_TOLERANCE


def test_module_refuses_left_padding_and_a_chat_without_assistant_turn(scorer):
    ids = encode(scorer.tokenizer, CONVERSATIONS[0])
    left = torch.tensor([[scorer.pad_id] + ids])
    with pytest.raises(ValueError, match="pad the batch on the right"):
        scorer.model(input_ids=left, attention_mask=torch.tensor([[0] + [1] * len(ids)]))
    with pytest.raises(ValueError, match="not in the input"):
        last_pattern_start(scorer.tokenizer("a dog in the park")["input_ids"])
