"""`prompt_format: llava_v1` on the LLaVA-1.5 twin. Training: TRL's own vision collator, given the rendered pair,
builds exactly the ids LLaVA builds for the whole conversation (BOS, system sentence, USER/ASSISTANT, </s>),
with the loss on the answer and its </s> only. Evaluation: the engines' chat-template step renders a
benchmark question as LLaVA's evaluation scripts prompt it."""

import pytest
import torch
import yaml
from PIL import Image
from transformers import AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from synthalign_ray import zoo
from synthalign_ray.engines.vllm_engine import image_chat_request
from synthalign_ray.evaluate.runner import GenerationConfig
from synthalign_ray.hf_image import encode_image
from synthalign_ray.formats.llava_conversation import VICUNA_V1_SYSTEM
from synthalign_ray.stages.pairs import trl_columns
from synthalign_ray.train.data import render_kwargs, render_pair
from tests.conftest import REPO

QUESTION, CHOSEN, REJECTED = "what is in the picture", "a dog in the park", "a red bus"


@pytest.fixture(scope="module")
def processor():
    return AutoProcessor.from_pretrained(zoo.build("lvlm-llava"))


def test_trl_collates_llavas_ids(processor):
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    row = trl_columns({"bytes": b"", "path": None}, QUESTION, CHOSEN, REJECTED)
    example = render_pair(row, render_kwargs(processor, "llava_v1")) | {"images": [image]}
    batch = DataCollatorForVisionPreference(processor=processor)([example])
    for k, answer in enumerate((CHOSEN, REJECTED)):
        ids = batch["input_ids"][k][batch["attention_mask"][k].bool()]
        # LLaVA tokenizes the whole conversation at once, BOS added by the tokenizer.
        llava = f"{VICUNA_V1_SYSTEM} USER: <image>\n{QUESTION} ASSISTANT: {answer}</s>"
        want = processor(images=[image], text=[llava], return_tensors="pt")["input_ids"][0]
        assert torch.equal(ids, want), (processor.tokenizer.convert_ids_to_tokens(ids[:6]), processor.tokenizer.convert_ids_to_tokens(want[:6]))
        trained = ids[batch["completion_mask"][k][batch["attention_mask"][k].bool()].bool()]
        assert processor.tokenizer.decode(trained) == f"{answer}</s>"
    assert render_kwargs(processor, "chat_template") is None and render_pair(row, None) is row


def test_eval_prompts_are_llavas_vicuna_v1_prompt(processor):
    """What `answer_prompts` sends for a POPE question, rendered as ray.data.llm's chat-template step renders
    it (`apply_chat_template` with the configured template), then tokenized as vLLM's processor does."""
    question = "Is there a dog in the image? Answer the question using a single word or phrase."
    image = Image.new("RGB", (32, 32), (120, 30, 200))
    request = image_chat_request(question, encode_image(image))
    assert yaml.safe_load((REPO / "configs/eval_paper.yaml").read_text())["generation"]["prompt_format"] == "llava_v1"
    rendered = processor.apply_chat_template(
        request["messages"], tokenize=False, chat_template=GenerationConfig(prompt_format="llava_v1").chat_template(),
        add_generation_prompt=True, continue_final_message=False,
    )  # fmt: skip
    assert rendered == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nIs there a dog in the image? Answer "
        "the question using a single word or phrase. ASSISTANT:"
    )
    # The default keeps the model's own template: llava-hf's, without LLaVA's system sentence.
    assert GenerationConfig().chat_template() is None
    own = processor.apply_chat_template(request["messages"], tokenize=False, add_generation_prompt=True)
    assert own.startswith("USER: <image>\n") and rendered.endswith(own)
    ids, own_ids = (processor(images=[image], text=[text])["input_ids"][0] for text in (rendered, own))
    assert ids[0] == processor.tokenizer.bos_token_id and ids[1] != processor.tokenizer.bos_token_id  # BOS once
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ids.count(image_token) == own_ids.count(image_token) > 1  # the placeholder expands as with the model's own
