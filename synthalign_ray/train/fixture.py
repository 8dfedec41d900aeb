"""Preference pairs made without any model, for the training tests and `benchmarks/train.py` (which trains on
the data the tests check): prompt rows with a drawn image, an instruction, four answers (three of three
models, one failed) and their reward scores, as the pipeline's stages leave them before `pairs`."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from synthalign_ray import store
from synthalign_ray.stages.pairs import PairBuilder, PairsConfig
from synthalign_ray.stages.prompts import prompts_table
from synthalign_ray.stages.responses import RESPONSES_FIELD

WORDS = "a dog is sitting on the grass near a red car in the park".split()


def scored_rows(n: int) -> pa.Table:
    """`n` rows as `pairs` receives them; row i's answers grow with i, so the pairs differ in length."""
    table = prompts_table(
        [{"id": f"p{i}", "category": "c", "t2i_prompt": "a park", "seed": i, "source_line": i + 1} for i in range(n)]
    )
    images = [store.encode_image(Image.new("RGB", (48, 40), (30 * i, 90, 200 - 30 * i))) for i in range(n)]
    table = table.append_column(pa.field("image", store.IMAGE_TYPE), pa.array(images, store.IMAGE_TYPE))
    table = table.append_column("image_index", pa.array([0] * n, pa.int32()))
    table = table.append_column("instruction", pa.array([f"describe the image {i} please" for i in range(n)]))
    responses = [
        [
            {"model": f"m{k}", "text": " ".join(WORDS[k : k + 3 + i]), "finish_reason": "stop", "error": None}
            for k in range(3)
        ]
        + [{"model": "m3", "text": None, "finish_reason": None, "error": "engine died"}]
        for i in range(n)
    ]
    table = table.append_column(RESPONSES_FIELD, pa.array(responses, RESPONSES_FIELD.type))
    scores = [[0.1 * i, 1.0, -1.0, None] for i in range(n)]
    return table.append_column("response_scores", pa.array(scores, pa.list_(pa.float32())))


def pairs_table(n: int, pairs: PairsConfig | None = None) -> pa.Table:
    """The `n` pairs `PairBuilder` makes of `scored_rows(n)` (every row becomes one)."""
    built = PairBuilder(pairs or PairsConfig())(scored_rows(n))
    return built.filter(pc.equal(built.column("status"), "ok"))


def write_pairs(run: str, n: int) -> str:
    """A run folder holding `pairs_table(n)` as its one pairs shard, as `synthalign train --data` reads it."""
    store.write_table(store.join(run, "pairs", "part-0.parquet"), store.with_hf_features(pairs_table(n)))
    return run
