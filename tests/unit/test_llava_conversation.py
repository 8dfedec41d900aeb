"""LLaVA-1.5's vicuna_v1 conversation, pinned as exact strings."""

from synthalign_ray.formats.llava_conversation import VICUNA_V1_SYSTEM, llava_v1_pair, llava_v1_prompt
from synthalign_ray.stages.pairs import trl_columns

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)


def test_the_prompt_is_llavas_vicuna_v1_conversation():
    assert VICUNA_V1_SYSTEM == SYSTEM
    assert llava_v1_prompt("What is in the picture?") == f"{SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT:"


def test_a_pair_row_becomes_the_strings_trl_tokenizes_as_llava_does():
    row = trl_columns({"bytes": b"", "path": None}, "What is in the picture?", "A dog.", "A cat.")
    rendered = llava_v1_pair(row, bos="<s>", eos="</s>", image_token="<image>")
    assert rendered["prompt"] == f"<s> {SYSTEM} USER: <image>\nWhat is in the picture? ASSISTANT:"
    assert (rendered["chosen"], rendered["rejected"]) == ("A dog.</s>", "A cat.</s>")
    assert rendered["images"] == row["images"]
    # A system message in the row takes the place of LLaVA's sentence.
    row = trl_columns({"bytes": b"", "path": None}, "Count the birds.", "Three.", "Two.", system_prompt="Be brief.")
    rendered = llava_v1_pair(row, bos="<s>", eos="</s>", image_token="<image>")
    assert rendered["prompt"] == "<s> Be brief. USER: <image>\nCount the birds. ASSISTANT:"
