"""`prompt_format: llava_v1` on the LLaVA-1.5 twin: TRL's own vision collator, given the rendered pair, builds
exactly the ids LLaVA builds for the whole conversation (BOS, system sentence, USER/ASSISTANT, </s>), with
the loss on the answer and its </s> only."""

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

from synthalign_ray import zoo
from synthalign_ray.llava_conversation import VICUNA_V1_SYSTEM
from synthalign_ray.stages.pairs import trl_columns
from synthalign_ray.train.data import render_kwargs, render_pair

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
