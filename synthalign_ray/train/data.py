"""Training data: preference pairs in TRL's vision format, read from Parquet and checked before any
worker starts.

`DATA` is a run folder (its `pairs/` is read), a folder of Parquet files, or one Parquet file, local
or any pyarrow filesystem URI (s3://, gs://). Remote files are copied to a node-local cache first, so
`datasets` memory-maps them like local ones (a dataset with its images is larger than RAM at scale).
Only TRL's columns are loaded (`images` or `image`, `prompt`, `chosen`, `rejected`): our pairs also
carry every candidate image, which training never reads.

`check_pairs` runs on the driver with the base model's processor and fails in seconds, naming the file,
row and column: no rows, missing columns, null texts, images that do not decode, a processor without
an image token. Pairs longer than `trl.max_length` (prompt with its image tokens + answer, measured
with the processor exactly as TRL's collator builds them) are skipped and counted, refused, or left to
TRL's truncation, as `too_long` says.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pyarrow import fs as pafs

from synthalign_ray import store
from synthalign_ray.errors import UserError
from synthalign_ray.formats.llava_conversation import llava_v1_pair

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
IMAGE_COLUMNS = ("images", "image")  # TRL takes a list of images or a single image
_MAX_REPORTED = 10


class DataError(UserError, ValueError):
    """Training data that cannot be trained on; the message names the file, row and column."""


@dataclass
class DataReport:
    files: list[str]
    rows: int
    image_column: str
    skipped_too_long: list[int] = field(default_factory=list)  # row indices over max_length
    max_tokens: int = 0  # longest pair seen (prompt + answer), in tokens

    @property
    def trained_rows(self) -> int:
        return self.rows - len(self.skipped_too_long)

    def summary(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "rows": self.rows,
            "trained_rows": self.trained_rows,
            "skipped_too_long": len(self.skipped_too_long),
            "max_tokens": self.max_tokens,
        }


def parquet_files(data: str) -> list[str]:
    """The Parquet files behind DATA: a file, a run folder (DATA/pairs) or a folder; sorted, as URIs or paths."""
    fs, path = store.filesystem(data)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{data}: no such file or folder")
    if info.type == pafs.FileType.File:
        files = [path]
    else:
        pairs = store.join(path, store.FOLDERS["ok"])
        folder = pairs if fs.get_file_info(pairs).type == pafs.FileType.Directory else path
        listing = fs.get_file_info(pafs.FileSelector(folder))
        files = sorted(i.path for i in listing if i.type == pafs.FileType.File and i.path.endswith(".parquet"))
    if not files:
        raise DataError(f"{data}: no Parquet files (looked in {data} and its pairs/ folder)")
    return [_as_uri(data, f) for f in files]


def _as_uri(data: str, path: str) -> str:
    """A filesystem path under DATA as a URI of DATA's scheme, with DATA's query (endpoint_override=...)."""
    if "://" not in data:
        return path
    _, separator, query = data.partition("?")
    return f"{data.split('://', 1)[0]}://{path}{separator}{query}"


def local_copies(files: list[str], cache_root: str | None = None) -> list[str]:
    """Local paths of the files: remote ones are copied once into a node-local cache."""
    root = Path(cache_root or Path.home() / ".cache" / "synthalign" / "train-data")
    local = []
    for uri in files:
        if "://" not in uri:
            local.append(uri)
            continue
        fs, path = store.filesystem(uri)
        size = fs.get_file_info(path).size
        key = hashlib.sha1(f"{uri}:{size}".encode()).hexdigest()[:16]
        target = root / key / os.path.basename(path)
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(f".tmp-{os.getpid()}")
            pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            tmp.rename(target)
        local.append(str(target))
    return local


def image_column(files: list[str]) -> str:
    """The image column every file has (`images` preferred); missing columns are errors naming the file."""
    found = None
    for uri in files:
        fs, path = store.filesystem(uri)
        names = set(pq.read_schema(path, filesystem=fs).names)
        missing = [c for c in TEXT_COLUMNS if c not in names]
        images = next((c for c in IMAGE_COLUMNS if c in names), None)
        if images is None:
            missing.append("images (or image)")
        if missing:
            raise DataError(
                f"{uri}: missing column(s) {', '.join(missing)}; TRL's vision preference format needs "
                f"images (or image), prompt, chosen, rejected"
            )
        if found is not None and images != found:
            raise DataError(f"{uri}: image column {images!r}, but {files[0]} has {found!r}")
        found = images
    return found


def load_pairs(files: list[str], image_col: str, decode: bool = True):
    """The TRL columns of the files as one `datasets.Dataset` (images decoded to PIL unless decode=False)."""
    import datasets

    dataset = datasets.load_dataset(
        "parquet", data_files=local_copies(files), split="train", columns=[image_col, *TEXT_COLUMNS]
    )
    image_feature = datasets.Image(decode=decode)
    if image_col == "images":
        return dataset.cast_column("images", datasets.List(image_feature))
    return dataset.cast_column("image", image_feature)


def row_counts(files: list[str]) -> list[int]:
    """Rows per file, from the Parquet footers (no data read)."""
    counts = []
    for uri in files:
        fs, path = store.filesystem(uri)
        counts.append(pq.ParquetFile(path, filesystem=fs).metadata.num_rows)
    return counts


def _row_locator(files: list[str], counts: list[int]):
    """Row index of the concatenated dataset -> 'FILE row N (id X)' for error messages."""

    def locate(index: int) -> str:
        for uri, n in zip(files, counts):
            if index < n:
                fs, path = store.filesystem(uri)
                row_id = ""
                if "id" in pq.read_schema(path, filesystem=fs).names:
                    ids = pq.read_table(path, columns=["id"], filesystem=fs).column("id")
                    row_id = f" (id {ids[index].as_py()!r})"
                return f"{uri} row {index}{row_id}"
            index -= n
        raise IndexError(index)

    return locate


def processor_image_token(processor, model: str) -> str:
    """The processor's image placeholder token, which must be a real token of its tokenizer."""
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not token:
        raise DataError(f"{model}: the processor has no image token (not a vision-language processor?)")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise DataError(f"{model}: the processor's image token {token!r} is not in its tokenizer's vocabulary")
    return token


def render_kwargs(processor, prompt_format: str) -> dict[str, str] | None:
    """What `render_pair` needs from the processor under `prompt_format`; None: pairs go to TRL as stored."""
    if prompt_format == "chat_template":
        return None
    tokenizer = processor.tokenizer
    return {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "image_token": processor.image_token}


def render_pair(example: dict[str, Any], kwargs: dict[str, str] | None) -> dict[str, Any]:
    """A pair as TRL gets it: as stored (TRL applies the chat template), or LLaVA-1.5's vicuna_v1 strings."""
    return example if kwargs is None else llava_v1_pair(example, **kwargs)


def render_pairs(dataset, processor, prompt_format: str):
    """`render_pair` over a `datasets` dataset. `map` rewrites the dataset's cache once, images included."""
    kwargs = render_kwargs(processor, prompt_format)
    if kwargs is None:
        return dataset
    return dataset.map(llava_v1_pair, fn_kwargs=kwargs, desc="LLaVA vicuna_v1 prompts")


def pair_lengths(processor, example: dict[str, Any], images: list) -> tuple[int, int]:
    """Tokens of prompt + chosen and prompt + rejected, built as TRL's vision collator builds them."""
    from trl.data_utils import apply_chat_template, is_conversational, prepare_multimodal_messages

    example = dict(example)
    if is_conversational(example):
        example["prompt"] = prepare_multimodal_messages(example["prompt"], images=images)
        example["chosen"] = prepare_multimodal_messages(example["chosen"])
        example["rejected"] = prepare_multimodal_messages(example["rejected"])
        example = apply_chat_template(example, processor)
    prompt = processor(images=images or None, text=[example["prompt"]], add_special_tokens=False)
    prompt_tokens = len(prompt["input_ids"][0])
    answer_tokens = [
        len(processor(text=[example[key]], add_special_tokens=False)["input_ids"][0]) for key in ("chosen", "rejected")
    ]
    return prompt_tokens + answer_tokens[0], prompt_tokens + answer_tokens[1]


def check_pairs(
    data: str, processor, model: str, max_length: int, too_long: str, prompt_format: str = "chat_template"
) -> DataReport:
    """Check every pair before training (see the module docstring); returns what to train on."""
    files = parquet_files(data)
    image_col = image_column(files)
    processor_image_token(processor, model)
    render = render_kwargs(processor, prompt_format)
    counts = row_counts(files)
    if sum(counts) == 0:
        raise DataError(f"{data}: no pairs (0 rows in {len(files)} Parquet file(s))")
    files, counts = [f for f, n in zip(files, counts) if n], [n for n in counts if n]  # `datasets` fails on empty files
    dataset = load_pairs(files, image_col, decode=False)
    locate = _row_locator(files, counts)
    report = DataReport(files=files, rows=len(dataset), image_column=image_col)
    problems = []
    for index, row in enumerate(dataset):
        nulls = [c for c in TEXT_COLUMNS if not row[c]]
        structs = row[image_col] if image_col == "images" else [row[image_col]]
        if nulls or structs is None:
            problems.append(f"{locate(index)}: empty {', '.join(nulls or [image_col])}")
            continue
        try:
            images = [store.decode_image(struct) for struct in structs]
        except Exception as e:
            problems.append(f"{locate(index)}: column {image_col}: image does not decode ({type(e).__name__}: {e})")
            continue
        texts = render_pair({c: row[c] for c in TEXT_COLUMNS}, render)
        longest = max(pair_lengths(processor, texts, images))
        report.max_tokens = max(report.max_tokens, longest)
        if longest > max_length and too_long != "truncate":
            if too_long == "fail":
                problems.append(f"{locate(index)}: {longest} tokens > trl.max_length {max_length}")
            else:
                report.skipped_too_long.append(index)
        if len(problems) >= _MAX_REPORTED:
            break
    if problems:
        raise DataError(f"{data}: bad training rows:\n  " + "\n  ".join(problems))
    if report.trained_rows == 0:
        raise DataError(
            f"{data}: all {report.rows} pairs are longer than trl.max_length {max_length} "
            f"(longest {report.max_tokens} tokens); raise trl.max_length or set too_long: truncate"
        )
    return report
