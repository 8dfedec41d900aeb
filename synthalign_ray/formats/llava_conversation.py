"""LLaVA-1.5's own conversation format (`conv_vicuna_v1` in LLaVA's llava/conversation.py) for training rows
and evaluation prompts.

LLaVA-1.5 was trained, and its authors evaluate it, on the vicuna_v1 conversation, tokenized with the BOS
token in front:

    {system} USER: <image>\\n{question} ASSISTANT: {answer}</s>

with the system sentence below, " " between the system sentence and the turns, and "</s>" after each answer.
llava-hf's chat template renders `USER: <image>\\n{question} ASSISTANT:` with no system sentence. So
`prompt_format: chat_template` trains a LLaVA-1.5 model on a slightly different context from the one the
paper's numbers come from, and `prompt_format: llava_v1` reproduces the official one.
"""

from __future__ import annotations

from typing import Any

VICUNA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def llava_v1_prompt(question: str, *, system: str = VICUNA_V1_SYSTEM, image_token: str = "<image>") -> str:
    """The vicuna_v1 prompt for one image and one question, up to the assistant's turn."""
    return f"{system} USER: {image_token}\n{question} ASSISTANT:"


def llava_v1_chat_template(*, system: str = VICUNA_V1_SYSTEM, image_token: str = "<image>") -> str:
    """A Jinja chat template that renders one user turn (an image, then its question) as `llava_v1_prompt`
    does, for the engines' chat-template step (`processor.apply_chat_template(..., chat_template=...)`):
    the image placeholder first and a newline, as LLaVA's evaluation scripts put it, whatever the order of
    the message's parts. The tokenizer adds BOS, as LLaVA's does."""
    return (
        f"{system} USER: "
        "{% for message in messages if message.role == 'user' %}"
        "{% for part in message.content if part.type == 'image' %}" + image_token + "\n{% endfor %}"
        "{% for part in message.content if part.type == 'text' %}{{ part.text }}{% endfor %}"
        "{% endfor %} ASSISTANT:"
    )


def _texts(messages: list[dict[str, Any]], role: str) -> str:
    """The text parts of the messages of `role`, joined (TRL's content lists or plain strings)."""
    parts = []
    for message in messages:
        if message["role"] != role:
            continue
        content = message["content"]
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [part["text"] for part in content if part.get("type") == "text" and part.get("text")]
    return "".join(parts)


def llava_v1_pair(example: dict[str, Any], *, bos: str, eos: str, image_token: str) -> dict[str, Any]:
    """A TRL conversational vision pair (message lists) as the three strings TRL's vision collator tokenizes
    without special tokens, so that prompt + answer are exactly LLaVA's ids for the whole conversation.

    The BOS token is written out, followed by a space that the tokenizer folds into the first word's "▁"
    (as when it adds BOS itself); each answer ends with EOS, LLaVA's "</s>" separator. A system message in
    the row replaces LLaVA's system sentence."""
    system = _texts(example["prompt"], "system") or VICUNA_V1_SYSTEM
    prompt = llava_v1_prompt(_texts(example["prompt"], "user"), system=system, image_token=image_token)
    return {
        **example,
        "prompt": f"{bos} {prompt}",
        "chosen": _texts(example["chosen"], "assistant") + eos,
        "rejected": _texts(example["rejected"], "assistant") + eos,
    }
