"""A tiny POPE-format benchmark made from drawn images, for tests and the offline demo config:

    python -m synthalign_ray.evaluate.fixture runs/pope-tiny      # then configs/eval_tiny.yaml

Each image shows a known set of shapes standing for objects (a red circle "ball", a blue square "box",
a green triangle "kite") on a plain background; each split asks about every image once for an object
it shows (label yes) and once for one it does not (label no), in POPE's question format. The
labels are true of the pictures, so a real LVLM can be sanity-checked on it; the zoo's random models
answer noise.
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


def write_pope_fixture(folder: str | Path, seed: int = 0) -> Path:
    """images/ and questions/coco_pope_<split>.json under `folder`; returns the folder."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "questions").mkdir(parents=True, exist_ok=True)
    for name, objects in IMAGES.items():
        draw(objects).save(folder / "images" / name)
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


if __name__ == "__main__":
    print(write_pope_fixture(sys.argv[1] if len(sys.argv) > 1 else "runs/pope-tiny"))
