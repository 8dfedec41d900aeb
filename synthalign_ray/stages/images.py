"""Images: K candidate images per prompt from a diffusers text-to-image pipeline, one per guidance scale.

Paper section 3.1: Stable Diffusion renders four images per prompt at guidance scales 5, 7, 9 and 11.
Every image k of a row has its own seed (`image_seed(row seed, k)`), so an image does not depend on
which other prompts shared its batch, and a rerun renders the same pixels.

All K scales of a batch of prompts go through ONE denoising call: classifier-free guidance is
`uncond + g * (text - uncond)`, which broadcasts a per-image guidance tensor of shape (N, 1, 1, 1) as
well as a float. Pipelines only compare the scale to 1 to decide whether to run CFG at all, so
`PerImageGuidance` answers that comparison for the whole batch. Images match one call per scale
within uint8 rounding (tests/integration/test_images_stage.py). `batch_guidance: false` makes one
call per scale, for pipelines that use the scale differently (e.g. as an embedding, as Flux does).
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator

from synthalign_ray.hf_image import IMAGE_TYPE, encode_image
from synthalign_ray.stages.common import ActorPoolConfig, RowStage
from synthalign_ray.base import ModelRef, StrictModel, resolve_model_path
from synthalign_ray.stages.prompts import image_seed


class ImagesConfig(StrictModel):
    model: ModelRef = Field(description="diffusers text-to-image pipeline: zoo:NAME, local folder or hub id (org/name[@REVISION])")
    guidance_scales: list[float] = Field([5.0, 7.0, 9.0, 11.0], min_length=1)
    steps: int = Field(28, ge=1, description="denoising steps")
    height: int | None = Field(None, ge=8, description="pixels; None = the pipeline's default")
    width: int | None = Field(None, ge=8)
    negative_prompt: str | None = None
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    batch_guidance: bool = Field(True, description="all guidance scales of a batch in one denoising call")
    pool: ActorPoolConfig = Field(default_factory=lambda: ActorPoolConfig(batch_size=2))

    @field_validator("guidance_scales")
    @classmethod
    def _cfg_scales(cls, scales: list[float]) -> list[float]:
        # A scale <= 1 switches classifier-free guidance off in diffusers: the K images would not be
        # comparable renderings of the same guided process.
        bad = [s for s in scales if s <= 1.0]
        if bad:
            raise ValueError(f"guidance scales must be > 1 (classifier-free guidance), got {bad}")
        if len(set(scales)) != len(scales):
            raise ValueError(f"guidance scales must be distinct, got {scales}")
        return scales


def per_image_guidance(scales: list[float], device, dtype):
    """A (N, 1, 1, 1) guidance tensor that diffusers pipelines accept in place of a float, on the
    pipeline's device and in its dtype: a float32 CPU tensor would upcast the guided noise prediction,
    so a half-precision pipeline fails at its next layer, and on a GPU it sits on the wrong device."""
    import torch

    class PerImageGuidance(torch.Tensor):
        # `guidance_scale > 1` decides whether CFG runs: true only if it holds for every image.
        def __gt__(self, other):
            return bool((self.as_subclass(torch.Tensor) > other).all())

        # Arithmetic yields plain tensors, so latents never carry the subclass.
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            out = super().__torch_function__(func, types, args, kwargs or {})
            return out.as_subclass(torch.Tensor) if isinstance(out, torch.Tensor) else out

    return torch.tensor(scales, dtype=dtype, device=device).view(-1, 1, 1, 1).as_subclass(PerImageGuidance)


class ImageGenerator(RowStage):
    name = "images"
    output_fields = [
        pa.field("guidance_scales", pa.list_(pa.float32())),
        pa.field("candidate_images", pa.list_(IMAGE_TYPE)),
    ]

    def __init__(self, cfg: ImagesConfig):
        import torch
        from diffusers import AutoPipelineForText2Image

        super().__init__(cfg.pool.max_batch_retries, cfg.pool.crash_retries)
        self.cfg = cfg
        self.device = cfg.pool.torch_device(self.name)
        self.pipe = AutoPipelineForText2Image.from_pretrained(
            resolve_model_path(cfg.model), dtype=getattr(torch, cfg.dtype)
        ).to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    def process(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        scales = self.cfg.guidance_scales
        if self.cfg.batch_guidance:
            prompts = [row["t2i_prompt"] for row in rows for _ in scales]
            seeds = [image_seed(row["seed"], k) for row in rows for k in range(len(scales))]
            images = self._render(prompts, seeds, per_image_guidance(scales * len(rows), self.pipe.device, self.pipe.dtype))
        else:
            by_scale = [
                self._render(
                    [row["t2i_prompt"] for row in rows], [image_seed(row["seed"], k) for row in rows], scale
                )
                for k, scale in enumerate(scales)
            ]
            images = [by_scale[k][i] for i in range(len(rows)) for k in range(len(scales))]
        k = len(scales)
        return [
            {"guidance_scales": list(scales), "candidate_images": [encode_image(im) for im in images[i * k : (i + 1) * k]]}
            for i in range(len(rows))
        ]

    def _render(self, prompts: list[str], seeds: list[int], guidance) -> list:
        import torch

        generators = [torch.Generator(self.device).manual_seed(s) for s in seeds]
        negative = [self.cfg.negative_prompt] * len(prompts) if self.cfg.negative_prompt else None
        return self.pipe(
            prompts,
            negative_prompt=negative,
            guidance_scale=guidance,
            num_inference_steps=self.cfg.steps,
            height=self.cfg.height,
            width=self.cfg.width,
            generator=generators,
            output_type="pil",
        ).images
