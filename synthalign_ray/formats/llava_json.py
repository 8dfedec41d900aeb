"""The LLaVA / PDS-DPO JSON format: export our pairs to it, import published data from it.

The official PDS-DPO release trains LLaVA on a JSON list of single-turn preference pairs:

    [{"id": "...", "image": "NAME.png",
      "conversations":          [{"from": "human", "value": "<image>\\nINSTRUCTION"}, {"from": "gpt", "value": CHOSEN}],
      "rejected_conversations": [{"from": "human", "value": "<image>\\nINSTRUCTION"}, {"from": "gpt", "value": REJECTED}]},
     ...]

with `image` relative to an image folder. `export_llava` writes that JSON (streamed, one entry at a
time) and the PNG files in `OUT/images/`; `import_llava` reads it back into rows of our pairs schema
(TRL columns included, so imported data trains like generated data). Unknown values (category, the
answers' models and scores, the margin) are null.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from synthalign_ray import store
from synthalign_ray.errors import UserError
from synthalign_ray.base import STATUS_OK
from synthalign_ray.stages.pairs import PAIR_FIELDS, trl_columns
from synthalign_ray.stages.prompts import INPUT_SCHEMA

IMAGES_SUBDIR = "images"
DEFAULT_JSON_NAME = "llava_pairs.json"
IMAGE_TOKEN = "<image>"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_EXPORT_COLUMNS = ("id", "image", "instruction", "chosen_text", "rejected_text", "status", "drop_reason")
_MAX_REPORTED = 20

# The rows import_llava produces: the prompt table's columns, the image, the instruction, the pair.
IMPORT_SCHEMA = pa.schema(
    [
        *INPUT_SCHEMA,
        pa.field("image", store.IMAGE_TYPE),
        pa.field("image_index", pa.int32()),
        pa.field("instruction", pa.string()),
        *PAIR_FIELDS,
    ]
)


class LlavaFormatError(UserError, ValueError):
    """A LLaVA JSON file with malformed entries or missing images; lists every problem found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        if len(problems) == 1:
            super().__init__(f"{source}: {problems[0]}")
            return
        shown = "\n  ".join(problems[:_MAX_REPORTED])
        more = f"\n  ... and {len(problems) - _MAX_REPORTED} more" if len(problems) > _MAX_REPORTED else ""
        super().__init__(f"{source}: {len(problems)} problem(s):\n  {shown}{more}")


@dataclass(frozen=True)
class LlavaExport:
    json_path: str
    images_dir: str
    pairs: int  # entries written
    skipped: int  # rows that were not pairs (dropped / failed / no texts)


def image_file_name(row_id: str) -> str:
    """A file name for a row's image: the id where it is a safe file name, else a sanitised id plus a
    hash of the original (two ids never share a file)."""
    safe = _SAFE_NAME.sub("_", row_id)
    if safe != row_id or not safe or safe.startswith("."):
        safe = f"{safe.lstrip('.')}-{hashlib.sha1(row_id.encode()).hexdigest()[:10]}"
    return f"{safe}.png"


def _png_bytes(image: dict[str, Any]) -> bytes:
    data = image.get("bytes")
    if data and data.startswith(_PNG_MAGIC):
        return data  # as stored: no re-encoding, the exact bytes
    return store.encode_image(store.decode_image(image))["bytes"]


def _batches(source) -> Iterator[pa.RecordBatch]:
    """Record batches of a table, of several tables, or of the Parquet shards behind a URI."""
    if isinstance(source, (pa.Table, pa.RecordBatch)):
        yield from (source.to_batches(max_chunksize=256) if isinstance(source, pa.Table) else [source])
        return
    if not isinstance(source, str):
        for item in source:
            yield from _batches(item)
        return
    fs, path = store.filesystem(source)
    if path.endswith(".parquet"):
        shards = [path]
    else:
        pairs_dir = store.join(source, store.FOLDERS[STATUS_OK])
        shards = store.list_shards(pairs_dir) or store.list_shards(source)
        if not shards:
            raise LlavaFormatError(source, [f"no Parquet shards in {pairs_dir} or {source}"])
    for shard in shards:
        with fs.open_input_file(shard) as handle:
            parquet = pq.ParquetFile(handle)
            names = set(parquet.schema_arrow.names)
            yield from parquet.iter_batches(batch_size=256, columns=[c for c in _EXPORT_COLUMNS if c in names])


def export_llava(
    pairs_tables_or_uri: pa.Table | Iterable[pa.Table] | str,
    out_dir: str,
    *,
    json_name: str = DEFAULT_JSON_NAME,
) -> LlavaExport:
    """Write the LLaVA / PDS-DPO JSON and its PNG images (`out_dir/images/`) for every pair.

    `pairs_tables_or_uri`: a table, an iterable of tables, a run folder (its `pairs/` shards), a folder
    of shards, or one .parquet file. Rows that are not pairs (status other than ok, a drop reason, no
    chosen / rejected text) are skipped and counted. Streams: one batch in memory at a time.
    """
    fs, out_path = store.filesystem(out_dir)
    images_path = store.join(out_path, IMAGES_SUBDIR)
    fs.create_dir(images_path, recursive=True)
    json_path = store.join(out_path, json_name)
    tmp = f"{json_path}.tmp-{uuid.uuid4().hex}"
    seen: set[str] = set()
    written = skipped = 0
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(b"[")
            for batch in _batches(pairs_tables_or_uri):
                for row in batch.to_pylist():
                    if (
                        row.get("status", STATUS_OK) != STATUS_OK
                        or row.get("drop_reason") is not None
                        or row.get("chosen_text") is None
                        or row.get("rejected_text") is None
                    ):
                        skipped += 1
                        continue
                    row_id = str(row["id"])
                    if row_id in seen:
                        raise ValueError(f"duplicate id {row_id!r}: ids must be unique")
                    seen.add(row_id)
                    if not row.get("image"):
                        raise ValueError(f"pair {row_id!r} has no image")
                    name = image_file_name(row_id)
                    with fs.open_output_stream(store.join(images_path, name)) as image_out:
                        image_out.write(_png_bytes(row["image"]))
                    human = {"from": "human", "value": f"{IMAGE_TOKEN}\n{row['instruction']}"}
                    entry = {
                        "id": row_id,
                        "image": name,
                        "conversations": [human, {"from": "gpt", "value": row["chosen_text"]}],
                        "rejected_conversations": [human, {"from": "gpt", "value": row["rejected_text"]}],
                    }
                    out.write((",\n" if written else "\n").encode() + json.dumps(entry, ensure_ascii=False).encode())
                    written += 1
            out.write(b"\n]\n")
        fs.move(tmp, json_path)
    finally:
        if fs.get_file_info(tmp).type != pafs.FileType.NotFound:
            fs.delete_file(tmp)
    return LlavaExport(json_path=json_path, images_dir=images_path, pairs=written, skipped=skipped)


def _instruction(value: str) -> str:
    """The instruction of a human turn, without LLaVA's image token."""
    if value.startswith(IMAGE_TOKEN + "\n"):
        return value[len(IMAGE_TOKEN) + 1 :]
    if value.endswith("\n" + IMAGE_TOKEN):
        return value[: -len(IMAGE_TOKEN) - 1]
    return value.replace(IMAGE_TOKEN, "").strip()


def _single_turn(conversation: Any, key: str) -> tuple[str, str]:
    """(human value, gpt value) of a one-turn conversation; ValueError says what is wrong."""
    if not isinstance(conversation, list):
        raise ValueError(f"`{key}` must be a list of turns, got {type(conversation).__name__}")
    if len(conversation) != 2:
        raise ValueError(f"`{key}` must have 2 turns (human, gpt), got {len(conversation)}")
    for turn, role in zip(conversation, ("human", "gpt")):
        if not isinstance(turn, dict) or turn.get("from") != role or not isinstance(turn.get("value"), str):
            raise ValueError(f"`{key}` turns must be {{'from': 'human'|'gpt', 'value': str}} in that order, got {turn!r}")
    return conversation[0]["value"], conversation[1]["value"]


def _parse_entry(entry: Any) -> dict[str, str]:
    if not isinstance(entry, dict):
        raise ValueError(f"entry must be an object, got {type(entry).__name__}")
    missing = [key for key in ("id", "image", "conversations", "rejected_conversations") if key not in entry]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(missing)}")
    if not isinstance(entry["id"], (str, int)) or isinstance(entry["id"], bool) or entry["id"] == "":
        raise ValueError(f"`id` must be a non-empty string or an integer, got {entry['id']!r}")
    if not isinstance(entry["image"], str) or not entry["image"]:
        raise ValueError(f"`image` must be a file name, got {entry['image']!r}")
    question, chosen = _single_turn(entry["conversations"], "conversations")
    rejected_question, rejected = _single_turn(entry["rejected_conversations"], "rejected_conversations")
    if question != rejected_question:
        raise ValueError("`conversations` and `rejected_conversations` ask different questions")
    return {
        "id": str(entry["id"]),
        "image": entry["image"],
        "instruction": _instruction(question),
        "chosen": chosen,
        "rejected": rejected,
    }


def import_llava(json_path: str, images_dir: str | None = None, *, system_prompt: str | None = None) -> pa.Table:
    """Rows of our pairs schema (IMPORT_SCHEMA) from a LLaVA / PDS-DPO JSON file and its image folder
    (default: `images/` next to the JSON file). Image bytes are kept as they are in the files.

    Every problem is collected before failing: malformed entries are reported with their index (and id
    when known), missing image files with their path, duplicate ids with both indexes.
    """
    fs, path = store.filesystem(json_path)
    if images_dir is None:
        images_dir = store.join(json_path.rsplit("/", 1)[0] if "/" in json_path else ".", IMAGES_SUBDIR)
    image_fs, images_path = store.filesystem(images_dir)
    try:
        with fs.open_input_stream(path) as stream:
            entries = json.loads(stream.read())
    except (FileNotFoundError, IsADirectoryError) as error:
        raise LlavaFormatError(json_path, [f"cannot read it ({error.strerror or error})"]) from None
    except json.JSONDecodeError as error:
        raise LlavaFormatError(json_path, [f"not valid JSON: {error}"]) from None
    if not isinstance(entries, list):
        raise LlavaFormatError(json_path, [f"top level must be a list of entries, got {type(entries).__name__}"])

    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    first_index: dict[str, int] = {}
    for index, entry in enumerate(entries):
        label = f"entry {index}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
        try:
            parsed = _parse_entry(entry)
        except ValueError as error:
            problems.append(f"{label}: {error}")
            continue
        if parsed["id"] in first_index:
            problems.append(f"{label}: duplicate id, first seen at entry {first_index[parsed['id']]}")
            continue
        first_index[parsed["id"]] = index
        image_path = store.join(images_path, parsed["image"])
        try:
            with image_fs.open_input_stream(image_path) as image_in:
                data = image_in.read()
        except (FileNotFoundError, IsADirectoryError, OSError):
            problems.append(f"{label}: image file not found: {image_path}")
            continue
        rows.append({**parsed, "image_bytes": data})
    if problems:
        raise LlavaFormatError(json_path, problems)

    columns: dict[str, list] = {field.name: [] for field in IMPORT_SCHEMA}
    for row in rows:
        image = {"bytes": row["image_bytes"], "path": None}
        values = {
            "id": row["id"],
            "status": STATUS_OK,
            "image": image,
            "instruction": row["instruction"],
            "chosen_text": row["chosen"],
            "rejected_text": row["rejected"],
            **trl_columns(image, row["instruction"], row["chosen"], row["rejected"], system_prompt),
        }
        for name, column in columns.items():
            column.append(values.get(name))
    return pa.table({field.name: pa.array(columns[field.name], field.type) for field in IMPORT_SCHEMA}, schema=IMPORT_SCHEMA)
