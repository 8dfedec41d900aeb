"""CHAIR on free captions (Object HalBench style): the model describes each image in detail (greedy), and
`metrics.chair_metrics` counts the COCO objects its caption mentions that the image does not have.

Input: a folder (or URI) of images, `chair.image_dir`, and their objects in one of two layouts:

- `chair.objects_file`: a JSON object mapping an image file name (under image_dir) to its objects,
  COCO category names or any synonym in the table:
      {"COCO_val2014_000000000042.jpg": ["dog", "person"], "shapes_1.png": ["kite"]}
- `chair.coco_instances` (+ optional `chair.coco_captions`): COCO's annotations/instances_val2014.json
  (and captions_val2014.json), as CHAIR's own script reads them (LisaAnne/Hallucination utils/chair.py):
  an image's objects are its segmentation categories plus the objects its human captions mention.
  The images are those listed in the instances file's `images` (`file_name` under image_dir).

`chair.sample: N` evaluates N images drawn with `chair.seed` (OPERA and Object HalBench use a few hundred
random COCO val2014 images); `chair.synonyms` points at CHAIR's data/synonyms.txt for comparable
numbers (default: the package's shorter table, `coco_synonyms.py`).

Output per model: `chair.json` (CHAIRs, CHAIRi, recall, counts) and `chair_predictions.parquet` (one row
per image: image_file, objects, caption, finish_reason, mentioned, hallucinated).
"""

from __future__ import annotations

import random
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray.evaluate.common import BenchmarkFileError, image_location, read_json, read_string_lists, read_text
from synthalign_ray.evaluate.metrics import ChairVocabulary, chair_metrics, coco_ground_truth, parse_synonyms
from synthalign_ray.base import StrictModel

CAPTION_PROMPT = "Please describe this image in detail."
HEADLINE_METRICS = ("chair_s", "chair_i", "recall")


class ChairConfig(StrictModel):
    image_dir: str = Field(description="folder or URI of the images")
    objects_file: str | None = Field(None, description="JSON {image file name: [object names]}")
    coco_instances: str | None = Field(None, description="COCO instances_*.json (instead of objects_file)")
    coco_captions: str | None = Field(None, description="COCO captions_*.json: objects of the human captions count too")
    synonyms: str | None = Field(None, description="CHAIR's synonyms.txt (default: the package's table)")
    prompt: str = Field(CAPTION_PROMPT, description="the caption request")
    max_tokens: int = Field(512, ge=1, description="caption length budget (OPERA's CHAIR runs allow 512 new tokens)")
    sample: int | None = Field(None, ge=1, description="evaluate N images drawn at random with `seed` (default: all)")
    seed: int = 0

    @model_validator(mode="after")
    def _one_annotation_layout(self):
        if (self.objects_file is None) == (self.coco_instances is None):
            raise ValueError("set exactly one of objects_file or coco_instances")
        if self.coco_captions is not None and self.coco_instances is None:
            raise ValueError("coco_captions goes with coco_instances")
        return self


def vocabulary(cfg: ChairConfig) -> ChairVocabulary:
    if cfg.synonyms is None:
        return ChairVocabulary.from_table()
    table = parse_synonyms(read_text(cfg.synonyms, "CHAIR synonym table"))
    if not table:
        raise BenchmarkFileError(f"{cfg.synonyms}: empty CHAIR synonym table")
    return ChairVocabulary.from_table(table)


def read_objects_file(path: str) -> dict[str, list[str]]:
    """{image file name: [object names]}, checked."""
    return read_string_lists(path, "objects", "image file name: [object names]")


def coco_objects(instances_path: str, captions_path: str | None, vocab: ChairVocabulary) -> dict[str, set[str]]:
    """{image file name: objects} of every image in a COCO instances file (and its captions)."""
    instances = read_json(instances_path, "COCO instances file")
    missing = [key for key in ("images", "annotations", "categories") if key not in instances]
    if missing:
        raise BenchmarkFileError(f"{instances_path}: not a COCO instances file (no {', '.join(missing)})")
    captions = read_json(captions_path, "COCO captions file") if captions_path else None
    if captions is not None and "annotations" not in captions:
        raise BenchmarkFileError(f"{captions_path}: not a COCO captions file (no annotations)")
    by_id = coco_ground_truth(instances, captions, vocab)
    return {image["file_name"]: by_id.get(image["id"], set()) for image in instances["images"]}


def load_images(cfg: ChairConfig, vocab: ChairVocabulary) -> tuple[list[dict[str, Any]], dict[str, set[str]]]:
    """Prompt rows (`common.answer_prompts`), one per image, and every image's objects (canonical names)."""
    if cfg.objects_file is not None:
        source = cfg.objects_file
        objects = {name: {vocab.synonym_to_object.get(o, o) for o in names} for name, names in read_objects_file(source).items()}
    else:
        source = cfg.coco_instances
        objects = coco_objects(cfg.coco_instances, cfg.coco_captions, vocab)
    names = sorted(objects)
    if cfg.sample is not None and cfg.sample < len(names):
        names = sorted(random.Random(cfg.seed).sample(names, cfg.sample))
    rows = [
        {
            "id": f"chair/{name}", "image_file": name, "prompt": cfg.prompt, "max_tokens": cfg.max_tokens,
            "image_uri": image_location(cfg.image_dir, name, source, "chair.image_dir"),
        }
        for name in names
    ]  # fmt: skip
    return rows, {name: objects[name] for name in names}


def score(
    rows: list[dict[str, Any]], answers: dict[str, dict[str, str]], objects: dict[str, set[str]], vocab: ChairVocabulary
) -> tuple[pa.Table, dict[str, Any]]:
    """The predictions table (one row per image) and the CHAIR metrics of the captions."""
    metrics = chair_metrics([(row["image_file"], answers[row["id"]]["answer"]) for row in rows], objects, vocab)
    per_caption = metrics.pop("per_caption")
    table = pa.Table.from_pylist(
        [
            {
                "image_file": row["image_file"], "objects": sorted(objects[row["image_file"]]),
                "caption": answers[row["id"]]["answer"], "finish_reason": answers[row["id"]]["finish_reason"],
                "mentioned": caption["mentioned"], "hallucinated": caption["hallucinated"],
            }
            for row, caption in zip(rows, per_caption)
        ],
        schema=pa.schema(
            [("image_file", pa.string()), ("objects", pa.list_(pa.string())), ("caption", pa.string()), ("finish_reason", pa.string()),
             ("mentioned", pa.list_(pa.string())), ("hallucinated", pa.list_(pa.string()))]
        ),
    )  # fmt: skip
    return table, metrics
