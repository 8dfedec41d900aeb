"""Image scores: ImageReward scores every candidate image against its prompt; the best one is kept.

Paper section 3.1 (eq. 2-3): ImageReward-v1.0 rates the K images, the argmax becomes the row's
`image`. CLIP and BLIP scores are optional: they are the paper's comparison scorers (Table 4, top-k
agreement) and are recorded beside ImageReward's without changing the selection unless `select_by`
says so. CLIP score is the cosine of CLIP's image and text embeddings; BLIP score is the cosine of
BLIP's ITC projections, as ImageReward's own BLIPScore baseline computes it.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray import selection
from synthalign_ray.hf_image import IMAGE_TYPE, decode_image
from synthalign_ray.stages.common import ActorPoolConfig, RowStage
from synthalign_ray.base import ModelRef, StrictModel, resolve_model_path

SCORE_COLUMNS = {"image_reward": "image_scores", "clip": "clip_scores", "blip": "blip_scores"}


class ImageScoresConfig(StrictModel):
    model: ModelRef = Field(description="ImageReward folder (ImageReward.pt, med_config.json, vocab.txt) or zoo:NAME")
    tokenizer: ModelRef | None = Field(None, description="BERT tokenizer folder if not inside `model`")
    clip: ModelRef | None = Field(None, description="CLIP model for the optional clip_scores column")
    blip: ModelRef | None = Field(None, description="BLIP retrieval model for the optional blip_scores column")
    select_by: Literal["image_reward", "clip", "blip"] = "image_reward"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=4))

    @model_validator(mode="after")
    def _selector_is_scored(self):
        if self.select_by != "image_reward" and getattr(self, self.select_by) is None:
            raise ValueError(f"select_by={self.select_by!r} needs image_scores.{self.select_by} to name a model")
        return self

    def score_columns(self) -> list[str]:
        return [SCORE_COLUMNS[s] for s in ("image_reward", "clip", "blip") if s == "image_reward" or getattr(self, s)]


class ImageScorer(RowStage):
    """Scores all K candidates of every row in a batch with each configured scorer."""

    name = "image_scores"

    def __init__(self, cfg: ImageScoresConfig):
        import torch

        from synthalign_ray.models.image_reward import load_image_reward

        super().__init__(cfg.pool.max_batch_retries, cfg.pool.crash_retries)
        self.cfg = cfg
        self.device = cfg.pool.torch_device(self.name)
        dtype = getattr(torch, cfg.dtype)
        tokenizer = resolve_model_path(cfg.tokenizer) if cfg.tokenizer else None
        self.scorers = {
            "image_scores": load_image_reward(
                resolve_model_path(cfg.model), device=self.device, dtype=dtype, tokenizer=tokenizer
            ).score
        }
        if cfg.clip:
            self.scorers["clip_scores"] = _ClipScore(resolve_model_path(cfg.clip), self.device, dtype)
        if cfg.blip:
            self.scorers["blip_scores"] = _BlipScore(resolve_model_path(cfg.blip), self.device, dtype)
        self.output_fields = [pa.field(column, pa.list_(pa.float32())) for column in self.scorers]

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        prompts = [row["t2i_prompt"] for row in rows for _ in row["candidate_images"]]
        images = [decode_image(im) for row in rows for im in row["candidate_images"]]
        flat = {column: score(prompts, images) for column, score in self.scorers.items()}
        out, start = [], 0
        for row in rows:
            k = len(row["candidate_images"])
            out.append({column: [float(s) for s in scores[start : start + k]] for column, scores in flat.items()})
            start += k
        return out


class _DualEncoderScore:
    """Cosine similarity of a transformers dual encoder's image and text embeddings, per pair."""

    model_class: str  # the transformers class the subclass loads

    def __init__(self, path: str, device: str, dtype):
        import transformers

        self.processor = transformers.AutoProcessor.from_pretrained(path)
        model_class = getattr(transformers, self.model_class)
        self.model = model_class.from_pretrained(path, dtype=dtype).to(device).eval()
        self.device = device

    def __call__(self, prompts: list[str], images: list) -> list[float]:
        import torch

        inputs = self.processor(text=prompts, images=images, return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            return self.similarity(inputs.to(self.device)).float().tolist()

    def similarity(self, inputs):
        import torch

        out = self.model(**inputs)
        image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        return (image * text).sum(-1)


class _ClipScore(_DualEncoderScore):
    model_class = "CLIPModel"


class _BlipScore(_DualEncoderScore):
    model_class = "BlipForImageTextRetrieval"

    def similarity(self, inputs):
        # use_itm_head=False: the ITC head, the cosine of the projected image and text features
        # (a prompts x images matrix; its diagonal holds the pairs).
        return self.model(**inputs, use_itm_head=False).itm_score.diagonal()


class ImageSelector(RowStage):
    """Keeps the best-scoring candidate of each row (pure: runs as a Ray task, not an actor)."""

    name = "select_image"
    output_fields = [pa.field("image", IMAGE_TYPE), pa.field("image_index", pa.int32())]

    def __init__(self, score_column: str = "image_scores"):
        super().__init__(max_batch_retries=0)
        self.score_column = score_column

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for row in rows:
            index = selection.argmax(row[self.score_column])
            out.append({"image": row["candidate_images"][index], "image_index": index})
        return out
