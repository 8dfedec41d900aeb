"""The Hugging Face `datasets` Image feature's storage, as the shards hold images: its Arrow type, and PIL
images to and from it. Model-free and without Ray, so the stages that make and read images run where
only PyTorch and the model libraries are installed (a GPU check machine)."""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa

# `load_dataset("parquet")` decodes this struct to PIL.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def encode_image(image) -> dict[str, Any]:
    """PIL image -> the HF Image struct, as lossless PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def decode_image(struct: dict[str, Any]):
    """HF Image struct -> RGB PIL image (from `bytes`, else from `path`, as `datasets` does)."""
    from PIL import Image

    data = struct.get("bytes")
    with Image.open(io.BytesIO(data) if data else struct["path"]) as opened:
        return opened.convert("RGB")
