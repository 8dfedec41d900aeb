"""Pure parts of the LLM stages: backend config, request building, reply parsing, ranking scores."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image
from pydantic import ValidationError

from synthalign_ray import selection, store, zoo
from synthalign_ray.stages.chat import ChatModelConfig, ChatRequest, openai_messages, sampling_seed, user_message
from synthalign_ray.engines.vllm_engine import chat_prompt_token_ids
from synthalign_ray.stages.instructions import InstructionsConfig, clean_instruction
from synthalign_ray.stages.judge import JudgeConfig, numbered_answers, parse_judge_scores

ENDPOINT = {"backend": "openai", "model": "gpt-4o", "base_url": "http://localhost:8000/v1"}


def test_chat_backends_take_only_their_settings():
    assert ChatModelConfig(model="zoo:chat-llm").backend == "vllm"
    with pytest.raises(ValidationError, match="unknown zoo model"):
        ChatModelConfig(model="zoo:nope")
    with pytest.raises(ValidationError, match="base_url only apply to backend=openai"):
        ChatModelConfig(model="zoo:chat-llm", base_url="http://x/v1")
    with pytest.raises(ValidationError, match="needs base_url"):
        ChatModelConfig(backend="openai", model="gpt-4o")
    with pytest.raises(ValidationError, match="engine_kwargs only apply"):
        ChatModelConfig(**ENDPOINT, engine_kwargs={"dtype": "float32"})
    # An endpoint's model name is whatever it serves: not checked as a path or hub id.
    assert ChatModelConfig(**ENDPOINT, api_key_env="OPENAI_API_KEY").model == "gpt-4o"


def test_missing_api_key_variable_is_named_before_anything_starts(monkeypatch):
    cfg = ChatModelConfig(**ENDPOINT, api_key_env="SYNTHALIGN_TEST_KEY")
    monkeypatch.delenv("SYNTHALIGN_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match="judge.model.api_key_env: environment variable SYNTHALIGN_TEST_KEY is not set"):
        cfg.check_environment("judge.model")
    monkeypatch.setenv("SYNTHALIGN_TEST_KEY", "secret")
    cfg.check_environment("judge.model")


def test_sampling_seed_is_reproducible_and_distinct_per_stage():
    assert sampling_seed(0, 5, "judge") == sampling_seed(0, 5, "judge")
    assert sampling_seed(0, 5, "judge") != sampling_seed(0, 5, "instructions")
    assert sampling_seed(0, 5, "judge") != sampling_seed(1, 5, "judge")
    assert sampling_seed(0, None, "judge") is None


def test_openai_messages_carry_the_image_as_a_png_data_url():
    image = store.encode_image(Image.new("RGB", (8, 6), (200, 10, 10)))
    messages = openai_messages(ChatRequest([user_message("what is red?", with_image=True)], image=image))
    image_part, text_part = messages[0]["content"]
    assert text_part == {"type": "text", "text": "what is red?"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (8, 6) and decoded.getpixel((0, 0)) == (200, 10, 10)
    # Text-only messages stay plain strings (what text-only chat templates expect).
    assert openai_messages(ChatRequest([user_message("hi")])) == [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no image"):
        openai_messages(ChatRequest([user_message("x", with_image=True)]))


# A Mistral-style template that writes the BOS itself, on a SentencePiece-style tokenizer.
BOS_FIRST_TEMPLATE = "{{ bos_token }}[INST] {{ messages[0]['content'] }} [/INST]"


@pytest.mark.parametrize(
    "name, with_image, template, bos_in_template",
    [
        ("chat-llm", False, None, True),  # Llama-3: <|begin_of_text|> in the template
        ("lvlm-llava", True, None, False),  # LLaVA-1.5 and -NeXT: no BOS in the template
        ("lvlm-llava-next", True, None, False),
        ("lvlm-llava", False, BOS_FIRST_TEMPLATE, True),
    ],
)
def test_the_vllm_stage_sends_chat_prompts_with_one_bos(name, with_image, template, bos_in_template):
    """The prompt ids vLLM generates from: the ids `chat_prompt_token_ids` gives, else vLLM's own encoding
    of the rendered text (special tokens added). Exactly one BOS, and transformers' ids for the chat."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(zoo.build(name))
    tokenizer = getattr(processor, "tokenizer", processor)
    messages = [user_message("describe the dog near the river", with_image=with_image)]
    prompt = processor.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)

    ids = chat_prompt_token_ids(prompt, tokenizer)
    assert (ids is not None) == bos_in_template
    engine_ids = ids if ids is not None else tokenizer.encode(prompt)
    assert engine_ids[0] == tokenizer.bos_token_id != engine_ids[1], engine_ids[:4]
    if bos_in_template:  # what transformers' apply_chat_template(tokenize=True) gives
        reference = tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        assert engine_ids == list(reference["input_ids"])
    else:  # what LLaVA's processor gives (the prompt of transformers' generate)
        assert engine_ids == tokenizer(prompt)["input_ids"]


def test_llm_instruction_source_needs_a_model_and_known_fields():
    with pytest.raises(ValidationError, match="source=llm needs instructions.llm"):
        InstructionsConfig(source="llm")
    with pytest.raises(ValidationError, match="llm_prompt uses unknown field"):
        InstructionsConfig(source="llm", llm={"model": "zoo:chat-llm"}, llm_prompt="{caption}")
    cfg = InstructionsConfig(source="llm", llm={"model": "zoo:chat-llm"})
    assert "{t2i_prompt}" in cfg.llm_prompt


@pytest.mark.parametrize(
    "reply, instruction",
    [
        ("What is the dog doing?", "What is the dog doing?"),
        ('\n  Instruction: "Describe the red car."\nThanks!', "Describe the red car."),
        ("question: how many birds are there?", "how many birds are there?"),
        ("\u201cWhere is the cat?\u201d", "Where is the cat?"),
    ],
)
def test_clean_instruction(reply, instruction):
    assert clean_instruction(reply) == instruction


@pytest.mark.parametrize("reply", ["", "   \n\n", '""', "Instruction:"])
def test_an_empty_llm_reply_is_an_error(reply):
    with pytest.raises(ValueError, match="no instruction"):
        clean_instruction(reply)


def test_judge_prompt_numbers_every_answer_and_marks_failed_ones():
    text = numbered_answers(["A dog.", None, "  ", "x" * 50], max_chars=10)
    assert text == "Answer 1:\nA dog.\n\nAnswer 2:\n(no answer)\n\nAnswer 3:\n(no answer)\n\nAnswer 4:\n" + "x" * 10


def test_parse_judge_scores():
    reply = "Answer 1: 7\nanswer 3 - 2.5\nAnswer #2: 11\nAnswer 1: 3\nAnswer 9: 5\nOverall: 4"
    # 2 is off the 1..10 scale, 1's second score is ignored, 9 is not an answer, "Overall" is not a line.
    assert parse_judge_scores(reply, 3, 1, 10) == [7.0, None, 2.5]
    assert parse_judge_scores("I like them all.", 2, 1, 10) == [None, None]


def test_judge_config_checks_scale_and_rubric():
    model = {"model": "zoo:lvlm-llava"}
    with pytest.raises(ValidationError, match="must be above low"):
        JudgeConfig(model=model, low=5, high=5)
    with pytest.raises(ValidationError, match=r"put \{answers\}"):
        JudgeConfig(model=model, rubric="Rate {instruction}")
    with pytest.raises(ValidationError, match="unknown field"):
        JudgeConfig(model=model, rubric="{answers} {image_size}")


def test_standardized():
    assert selection.standardized([1.0, 3.0, None, float("nan")]) == [-1.0, 1.0, None, None]
    assert selection.standardized([2.0, 2.0]) == [0.0, 0.0]
    assert selection.standardized([None]) == [None]


def test_ranking_scores():
    reward = [0.1, 0.9, 0.5, None]
    judge = [9.0, 1.0, None, 5.0]
    assert selection.ranking_scores(reward, judge, "reward") == reward
    assert selection.ranking_scores(reward, judge, "judge") == judge
    # mix: only answers 0 and 1 have both scores; standardized they are -1/+1 (reward) and +1/-1 (judge).
    assert selection.ranking_scores(reward, judge, "mix", 0.5) == [0.0, 0.0, None, None]
    assert selection.ranking_scores(reward, judge, "mix", 0.75) == [0.5, -0.5, None, None]
    assert selection.ranking_scores(reward, judge, "mix", 0.0) == [-1.0, 1.0, None, None]
    with pytest.raises(ValueError, match="needs judge scores"):
        selection.ranking_scores(reward, None, "judge")
    with pytest.raises(ValueError, match="4 reward scores but 3 judge"):
        selection.ranking_scores(reward, judge[:3], "mix")
