"""`synthalign report RUN`: read a generation output shard by shard and write its report.

Pass 1 streams every shard of pairs/, dropped/ and failed/ as record batches of the STATS_COLUMNS it
has into `RunStats`, and keeps a uniform sample of pair ids (the `sample_size` smallest hashes of the
id: the same sample whatever the shard order). Pass 2 reads pairs/ again and keeps the sampled rows
only, with their images, for the browsable page. Nothing else of a row outlives its batch.

Writes into OUTPUT (default RUN/report, local or a pyarrow URI):
  README.md     the Hugging Face dataset card (card.py)
  stats.json    every number in the card, and the run's manifest summary
  plots/*.png   plots.py
  index.html    the card, the plots and the sample, as one static page (html.py)
  samples/      the sampled pairs' images (kept image and candidates, JPEG thumbnails)
"""

from __future__ import annotations

import hashlib
import heapq
import io
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from synthalign_ray import store
from synthalign_ray.errors import UserError
from synthalign_ray.report import card, html, plots
from synthalign_ray.report.stats import STATS_COLUMNS, RunStats, classify_instruction, hard_negative_kind, word_count

BATCH_ROWS = 256
SAMPLE_COLUMNS = (
    "id", "category", "t2i_prompt", "instruction", "image", "image_index", "guidance_scales", "candidate_images",
    "image_scores", "clip_scores", "blip_scores", "responses", "response_scores", "chosen_index", "rejected_index",
    "chosen_model", "rejected_model", "chosen_text", "rejected_text", "margin",
)  # fmt: skip
IMAGE_SIDE, CANDIDATE_SIDE = 384, 160  # thumbnail sizes (px, longest side)


class ReportError(UserError, ValueError):
    """The run folder cannot be reported on (no shards, unreadable file): the message names it."""


@dataclass
class ReportResult:
    output: str
    files: list[str]
    stats: dict[str, Any]


def run_shards(run: str) -> dict[str, list[str]]:
    """The committed Parquet shards of each output folder of a run."""
    return {folder: store.list_shards(store.join(run, folder)) for folder in store.FOLDERS.values()}


def iter_batches(run: str, shard: str, wanted: tuple[str, ...]):
    """Record batches of the columns of `wanted` the shard has (a failed row's shard lacks later ones)."""
    fs, _ = store.filesystem(run)
    try:
        parquet = pq.ParquetFile(fs.open_input_file(shard))
    except (OSError, pa.ArrowInvalid) as e:
        raise ReportError(f"{shard}: not a readable Parquet file ({e})") from e
    columns = [c for c in wanted if c in parquet.schema_arrow.names]
    if "id" not in columns:
        raise ReportError(f"{shard}: no `id` column; is this a synthalign run folder?")
    yield from parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def _id_hash(row_id: str) -> int:
    return int.from_bytes(hashlib.sha1(row_id.encode()).digest()[:8], "big")


def collect(run: str, sample_size: int, near_miss_margin: float | None) -> tuple[RunStats, list[str], dict | None]:
    """Pass 1: the statistics, the sampled pair ids, and the `datasets` features of the pairs' schema."""
    shards = run_shards(run)
    if not any(shards.values()):
        raise ReportError(f"{run}: no Parquet shards in {', '.join(f'{f}/' for f in store.FOLDERS.values())}")
    stats = RunStats(near_miss_margin=near_miss_margin)
    sample: list[tuple[int, str]] = []  # max-heap of the smallest hashes, as (-hash, id)
    features = None
    fs, _ = store.filesystem(run)
    for folder, paths in shards.items():
        for shard in paths:
            if folder == store.FOLDERS["ok"] and features is None:
                metadata = pq.read_schema(fs.open_input_file(shard)).metadata or {}
                if b"huggingface" in metadata:
                    features = json.loads(metadata[b"huggingface"])["info"]["features"]
            for batch in iter_batches(run, shard, STATS_COLUMNS):
                stats.add_batch(batch)
                if folder != store.FOLDERS["ok"] or not sample_size:
                    continue
                for row_id in batch.column("id").to_pylist():
                    item = (-_id_hash(row_id), row_id)
                    if len(sample) < sample_size:
                        heapq.heappush(sample, item)
                    elif item > sample[0]:
                        heapq.heapreplace(sample, item)
    return stats, sorted((row_id for _, row_id in sample), key=_id_hash), features


def _thumbnail(struct: dict[str, Any] | None, side: int) -> bytes | None:
    if not struct or not (struct.get("bytes") or struct.get("path")):
        return None
    image = store.decode_image(struct)
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return buffer.getvalue()


def sample_rows(run: str, ids: list[str], output: str, near_miss_margin: float | None) -> tuple[list[dict], list[str]]:
    """Pass 2: the sampled pairs as the page shows them; their thumbnails are written to OUTPUT/samples/."""
    if not ids:
        return [], []
    order = {row_id: i for i, row_id in enumerate(ids)}
    wanted = pa.array(ids)
    rows: list[dict] = []
    written: list[str] = []
    for shard in store.list_shards(store.join(run, store.FOLDERS["ok"])):
        for batch in iter_batches(run, shard, SAMPLE_COLUMNS):
            batch = batch.filter(pc.is_in(batch.column("id"), value_set=wanted))
            for row in batch.to_pylist():
                n = order[row["id"]]
                image_file = f"samples/{n:05d}.jpg"
                data = _thumbnail(row.get("image"), IMAGE_SIDE)
                if data is not None:
                    store.write_bytes(store.join(output, image_file), data)
                    written.append(image_file)
                candidates = []
                for k, struct in enumerate(row.get("candidate_images") or []):
                    file = f"samples/{n:05d}-c{k}.jpg"
                    data = _thumbnail(struct, CANDIDATE_SIDE)
                    if data is not None:
                        store.write_bytes(store.join(output, file), data)
                        written.append(file)
                    candidates.append({
                        "file": file if data is not None else None,
                        "guidance_scale": _at(row.get("guidance_scales"), k),
                        "image_score": _at(row.get("image_scores"), k),
                        "clip_score": _at(row.get("clip_scores"), k),
                        "blip_score": _at(row.get("blip_scores"), k),
                        "kept": k == row.get("image_index"),
                    })  # fmt: skip
                answers = [
                    {"model": r.get("model"), "text": r.get("text"), "finish_reason": r.get("finish_reason"),
                     "score": _at(row.get("response_scores"), i)}
                    for i, r in enumerate(row.get("responses") or [])
                ]  # fmt: skip
                margin = row.get("margin")
                rows.append({
                    "n": n, "id": row["id"], "category": row.get("category"), "t2i_prompt": row.get("t2i_prompt"),
                    "instruction": row.get("instruction"), "instruction_class": classify_instruction(row.get("instruction")),
                    "image": image_file if image_file in written else None, "candidates": candidates,
                    "chosen": {"model": row.get("chosen_model"), "text": row.get("chosen_text"),
                               "score": _at(row.get("response_scores"), row.get("chosen_index")),
                               "words": word_count(row.get("chosen_text"))},
                    "rejected": {"model": row.get("rejected_model"), "text": row.get("rejected_text"),
                                 "score": _at(row.get("response_scores"), row.get("rejected_index")),
                                 "words": word_count(row.get("rejected_text"))},
                    "margin": margin, "answers": answers,
                    "negative_kind": hard_negative_kind(row.get("rejected_text"), row.get("chosen_text"),
                                                        margin if margin is not None else float("nan"),
                                                        near_miss_margin if near_miss_margin is not None else float("-inf")),
                })  # fmt: skip
    return sorted(rows, key=lambda r: r["n"]), written


def _at(values, index):
    return values[index] if values is not None and index is not None and 0 <= index < len(values) else None


def read_manifest(run: str) -> dict[str, Any] | None:
    uri = store.join(run, store.MANIFEST)
    fs, path = store.filesystem(uri)
    if fs.get_file_info(path).type == store.pafs.FileType.NotFound:
        return None
    try:
        return store.read_json(uri)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{uri}: unreadable manifest ({e})") from e


def write_report(
    run: str,
    output: str | None = None,
    *,
    license: str = "unknown",
    pretty_name: str | None = None,
    sample_size: int = 200,
    near_miss_margin: float | None = None,
) -> ReportResult:
    """Write the card, stats.json, plots, index.html and sample images of run folder `run` into `output`."""
    output = output or store.join(run, "report")
    manifest = read_manifest(run)
    stats, sample_ids, features = collect(run, sample_size, near_miss_margin)
    numbers = stats.result()
    pngs = plots.all_plots(stats, numbers)
    files = []
    for name, png in pngs.items():
        store.write_bytes(store.join(output, "plots", name), png)
        files.append(f"plots/{name}")
    samples, sample_files = sample_rows(run, sample_ids, output, numbers["hard_negatives"]["near_miss_margin"])
    files += sample_files
    report = card.report_stats(numbers, manifest, run=run, license=license, plots=list(pngs), sample_size=len(samples))
    store.write_json(store.join(output, "stats.json"), report)
    card_text = card.render_card(report, features=features, pretty_name=pretty_name)
    store.write_bytes(store.join(output, "README.md"), card_text.encode())
    store.write_bytes(store.join(output, "index.html"), html.render_page(card_text, report, samples).encode())
    files = ["README.md", "stats.json", "index.html", *files]
    return ReportResult(output=output, files=files, stats=report)
