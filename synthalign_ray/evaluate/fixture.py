"""Tiny POPE, CHAIR, MMHal-Bench and AMBER benchmarks made from drawn images, in each benchmark's own file
layout, for tests and the offline demo config:

    python -m synthalign_ray.evaluate.fixture runs/eval-tiny      # then configs/eval_tiny.yaml

    runs/eval-tiny/images/shapes_<i>.png                 the drawn images (shared)
    runs/eval-tiny/questions/coco_pope_<split>.json      POPE question files
    runs/eval-tiny/chair_objects.json                    CHAIR: {image file: [objects]}
    runs/eval-tiny/mmhal/response_template.json          MMHal-Bench records (image_src URLs end in the file names)
    runs/eval-tiny/amber/data/                           AMBER's data/ folder: query/query_all.json, annotations.json,
                                                         relation.json, safe_words.txt (images: images/)

Each image shows a known set of shapes standing for objects (a red circle "ball", a blue square "box",
a green triangle "kite") on a plain background; each POPE split asks about every image once for an
object it shows (label yes) and once for one it does not (label no); CHAIR's objects and MMHal-Bench's
image contents and human answers list what is drawn; AMBER asks for a description of each image (truth:
the drawn objects, hallu: the others) and yes/no questions on existence, colour (attribute-state),
count (attribute-number) and, for two-object images, whether they touch (relation). The labels are true of the pictures, so a real
LVLM can be sanity-checked on them; the zoo's random models answer noise.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from synthalign_ray.evaluate.pope import POPE_SPLITS

OBJECTS = ("ball", "box", "kite")
IMAGES = {"shapes_0.png": ("ball",), "shapes_1.png": ("box", "kite"), "shapes_2.png": ("ball", "box"), "shapes_3.png": ("kite",)}


def draw(objects: tuple[str, ...], size: int = 96):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 225))
    pen = ImageDraw.Draw(image)
    slots = [(8, 8), (52, 52), (8, 52), (52, 8)]
    for obj, (x, y) in zip(objects, slots):
        box = (x, y, x + 36, y + 36)
        if obj == "ball":
            pen.ellipse(box, fill=(200, 30, 30))
        elif obj == "box":
            pen.rectangle(box, fill=(30, 60, 200))
        else:
            pen.polygon([(x + 18, y), (x, y + 36), (x + 36, y + 36)], fill=(30, 160, 60))
    return image


def write_images(folder: Path) -> None:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, objects in IMAGES.items():
        draw(objects).save(folder / "images" / name)


def write_pope_fixture(folder: str | Path, seed: int = 0) -> Path:
    """images/ and questions/coco_pope_<split>.json under `folder`; returns the folder."""
    folder = Path(folder)
    write_images(folder)
    (folder / "questions").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for split in POPE_SPLITS:
        lines, question_id = [], 1
        for name, objects in IMAGES.items():
            absent = [obj for obj in OBJECTS if obj not in objects]
            for obj, label in ((rng.choice(objects), "yes"), (rng.choice(absent), "no")):
                lines.append({"question_id": question_id, "image": name, "text": f"Is there a {obj} in the image?", "label": label})
                question_id += 1
        (folder / "questions" / f"coco_pope_{split}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def write_chair_fixture(folder: str | Path) -> Path:
    """images/ and chair_objects.json under `folder`; returns the objects file."""
    folder = Path(folder)
    write_images(folder)
    path = folder / "chair_objects.json"
    path.write_text(json.dumps({name: list(objects) for name, objects in IMAGES.items()}, indent=1))
    return path


MMHAL_QUESTIONS = (  # (question_type, question, human answer of objects)
    ("attribute", "What color is the {0} in the image?", "The {0} is {1}."),
    ("counting", "How many objects are in the image?", "There are {2} objects."),
)
COLORS = {"ball": "red", "box": "blue", "kite": "green"}


def write_mmhal_fixture(folder: str | Path) -> Path:
    """images/ and mmhal/response_template.json (MMHal-Bench's record format) under `folder`; returns
    the response file. Two questions per image, one per question type."""
    folder = Path(folder)
    write_images(folder)
    records = []
    for name, objects in IMAGES.items():
        for question_type, question, answer in MMHAL_QUESTIONS:
            records.append(
                {
                    "question_type": question_type, "question_topic": "shapes", "image_id": name.removesuffix(".png"),
                    "image_src": f"https://example.invalid/mmhal/{name}", "image_content": [obj.title() for obj in objects],
                    "question": question.format(objects[0]), "gt_answer": answer.format(objects[0], COLORS[objects[0]], len(objects)),
                    "model_answer": "",
                }
            )  # fmt: skip
    path = folder / "mmhal" / "response_template.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(records, indent=1))
    return path


# AMBER's relation.json for the drawn shapes: each object's associated words ("shape" is a safe word).
AMBER_RELATION = {"ball": ["circle", "sphere"], "box": ["square", "cube"], "kite": ["triangle"], "shape": []}
AMBER_SAFE_WORDS = ("shape",)


def amber_records() -> tuple[list[dict], list[dict]]:
    """(queries, annotations) in AMBER's formats: ids 1..4 generative (one per image), then the
    discriminative questions, numbered on."""
    queries, annotations = [], []

    def add(image: str, query: str, annotation: dict) -> None:
        queries.append({"id": len(queries) + 1, "image": image, "query": query})
        annotations.append({"id": len(annotations) + 1, **annotation})

    for name, objects in IMAGES.items():
        add(name, "Describe this image.", {"type": "generative", "truth": list(objects), "hallu": [o for o in OBJECTS if o not in objects]})
    for name, objects in IMAGES.items():
        absent = next(o for o in OBJECTS if o not in objects)
        wrong_colour = next(c for c in COLORS.values() if c != COLORS[objects[0]])
        add(name, f"Is there a {objects[0]} in this image?", {"type": "discriminative-hallucination", "truth": "yes"})
        add(name, f"Is there a {absent} in this image?", {"type": "discriminative-hallucination", "truth": "no"})
        add(name, f"Is the {objects[0]} {COLORS[objects[0]]} in this image?", {"type": "discriminative-attribute-state", "truth": "yes"})
        add(name, f"Is the {objects[0]} {wrong_colour} in this image?", {"type": "discriminative-attribute-state", "truth": "no"})
        add(name, f"Is there one {objects[0]} in this image?", {"type": "discriminative-attribute-number", "truth": "yes"})
        if len(objects) == 2:  # drawn in opposite corners
            add(name, f"Is the {objects[0]} touching the {objects[1]} in this image?", {"type": "discriminative-relation", "truth": "no"})
    return queries, annotations


def write_amber_fixture(folder: str | Path) -> Path:
    """images/ and amber/data/ (AMBER's data folder layout) under `folder`; returns the data folder."""
    folder = Path(folder)
    write_images(folder)
    data = folder / "amber" / "data"
    (data / "query").mkdir(parents=True, exist_ok=True)
    queries, annotations = amber_records()
    (data / "query" / "query_all.json").write_text(json.dumps(queries, indent=4))
    (data / "annotations.json").write_text(json.dumps(annotations, indent=4))
    (data / "relation.json").write_text(json.dumps(AMBER_RELATION, indent=4))
    (data / "safe_words.txt").write_text("\n".join(AMBER_SAFE_WORDS))
    return data


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/eval-tiny")
    write_pope_fixture(target)
    write_chair_fixture(target)
    write_mmhal_fixture(target)
    write_amber_fixture(target)
    print(target)
