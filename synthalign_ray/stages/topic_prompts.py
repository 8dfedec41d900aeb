"""Topic prompts: an LLM writes the text-to-image prompts, topic by topic (paper step 1).

The paper has GPT-4 write prompts over 10 topics (art, school, transport, weather, daily activities,
...). `synthalign prompts --config topics.yaml --output prompts.jsonl` does that with any chat model
(`stages/chat.py`: vLLM, or an OpenAI-compatible endpoint such as GPT-4 itself) and writes a prompt
file the image stages read (`prompts.path`), so it can be reviewed and edited before GPUs are spent on
images. Beside it, `<output>.report.json` counts what was asked, kept and removed, and why.

- One chat request per wanted prompt (`per_topic` x `oversample` per topic), each with its own sampling
  seed (run seed, topic, index): sampled answers differ, and a rerun reproduces them. Asking for one
  prompt per request keeps parsing trivial; the oversampling makes up for duplicates and bad replies.
- The reply's first line that is not a label or list marker becomes the prompt (`clean_prompt`).
- Deduplication over all topics, first occurrence kept (topic order, then request index): exact
  duplicates after normalisation (case, punctuation, whitespace), then near duplicates by Jaccard
  similarity of character 5-gram shingles >= `near_duplicate_threshold`, found with MinHash LSH so that
  100K prompts never need 10^10 comparisons (`dedupe`).
- Each kept prompt gets a stable id from its topic and normalised text (`topic_prompt_id`): the same
  prompt gets the same id in every run, whatever its position.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from synthalign_ray import store
from synthalign_ray.config import ResourcesConfig
from synthalign_ray.stages.chat import ChatModelConfig, ChatReply, ChatRequest, add_chat_stage, user_message
from synthalign_ray.base import STATUS_OK, StrictModel, model_source
from synthalign_ray.stages.instructions import template_fields
from synthalign_ray.stages.prompts import prompt_seed

DEFAULT_REQUEST = (
    "Write one detailed text-to-image prompt for a diffusion model about the topic '{topic}' ({description}). "
    "Describe a concrete scene: the objects, their colours, counts and positions, the setting and the style. "
    "Reply with the prompt only, on one line."
)
REQUEST_FIELDS = {"topic", "description", "index"}
DROP_EMPTY = "empty"
DROP_TOO_SHORT = "too_short"
DROP_TOO_LONG = "too_long"
DROP_EXACT = "exact_duplicate"
DROP_NEAR = "near_duplicate"
DROP_SURPLUS = "surplus"  # valid and unique, but the topic already has `per_topic` prompts
REPLY_FIELDS = [pa.field("reply", pa.string())]
_LABEL = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022]|prompt\s*\d*\s*:)\s*", re.IGNORECASE)


class Topic(StrictModel):
    category: str = Field(min_length=1, description="the `category` of its prompts")
    description: str | None = Field(None, description="what the topic covers, for the LLM (default: the category)")


class TopicPromptsConfig(StrictModel):
    seed: int = Field(0, ge=0, description="run seed of the sampling seeds")
    topics: list[Topic] = Field(min_length=1)
    per_topic: int = Field(ge=1, description="prompts wanted per topic")
    oversample: float = Field(1.5, ge=1, description="requests per wanted prompt, to make up for removed ones")
    model: ChatModelConfig
    request: str = Field(DEFAULT_REQUEST, description="format string over topic, description, index")
    near_duplicate_threshold: float = Field(
        0.8, gt=0, le=1, description="Jaccard similarity of character 5-grams at which two prompts are duplicates"
    )
    min_chars: int = Field(10, ge=1)
    max_chars: int = Field(1000, ge=1)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="as in the generation config")

    @field_validator("topics", mode="before")
    @classmethod
    def _topic_names(cls, topics: Any) -> Any:
        if isinstance(topics, list):
            return [{"category": t} if isinstance(t, str) else t for t in topics]
        return topics

    @model_validator(mode="after")
    def _settings(self):
        categories = [t.category for t in self.topics]
        repeated = sorted({c for c in categories if categories.count(c) > 1})
        if repeated:
            raise ValueError(f"topics: category {repeated} listed twice")
        unknown = template_fields(self.request) - REQUEST_FIELDS
        if unknown:
            raise ValueError(f"request uses unknown field(s) {sorted(unknown)}; known: {sorted(REQUEST_FIELDS)}")
        if self.model.temperature == 0:
            raise ValueError(
                "model.temperature is 0: greedy decoding writes the same prompt for every request of a topic; "
                "set it > 0 (e.g. 1.0)"
            )
        if self.max_chars < self.min_chars:
            raise ValueError(f"max_chars ({self.max_chars}) < min_chars ({self.min_chars})")
        return self

    def requests_per_topic(self) -> int:
        return math.ceil(self.per_topic * self.oversample)


def clean_prompt(reply: str) -> str:
    """The prompt in a reply: the first non-empty line without a list marker or "Prompt:" label, and
    without surrounding quotes ("" when there is none)."""
    for line in reply.splitlines():
        line = _LABEL.sub("", line.strip()).strip().strip("\"'\u201c\u201d").strip()
        if line:
            return line
    return ""


def normalize_prompt(text: str) -> str:
    """Lower case, letters and digits only, single spaces: what makes two prompts exact duplicates."""
    return " ".join(re.sub(r"[^\w]+", " ", text.lower()).split())


def topic_prompt_id(category: str, text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "topic"
    return f"{slug}-{hashlib.sha1(normalize_prompt(text).encode()).hexdigest()[:12]}"


def shingles(text: str, k: int = 5) -> set[str]:
    norm = normalize_prompt(text)
    return {norm[i : i + k] for i in range(max(1, len(norm) - k + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


class _MinHashIndex:
    """MinHash LSH over shingle sets: candidate pairs share a band of the signature; callers verify the
    Jaccard similarity exactly, so LSH only decides what gets compared."""

    PRIME = (1 << 31) - 1

    def __init__(self, num_perm: int = 64, bands: int = 16, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.PRIME, num_perm, dtype=np.uint64)
        self.b = rng.integers(0, self.PRIME, num_perm, dtype=np.uint64)
        self.rows = num_perm // bands
        self.buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]

    def _bands(self, items: set[str]) -> list[bytes]:
        hashes = np.array([zlib.crc32(s.encode()) for s in items], dtype=np.uint64) % np.uint64(self.PRIME)
        signature = ((np.outer(hashes, self.a) + self.b) % np.uint64(self.PRIME)).min(axis=0)
        return [signature[i * self.rows : (i + 1) * self.rows].tobytes() for i in range(len(self.buckets))]

    def candidates(self, items: set[str]) -> tuple[set[int], list[bytes]]:
        keys = self._bands(items)
        found = set()
        for bucket, key in zip(self.buckets, keys):
            found.update(bucket.get(key, ()))
        return found, keys

    def add(self, key: int, band_keys: list[bytes]) -> None:
        for bucket, band in zip(self.buckets, band_keys):
            bucket.setdefault(band, []).append(key)


@dataclass(frozen=True)
class Removed:
    index: int
    reason: str
    duplicate_of: int | None = None


def dedupe(texts: list[str], near_threshold: float = 0.8) -> tuple[list[int], list[Removed]]:
    """Indexes of the texts kept (first occurrence wins) and the removed ones with their reason and
    the kept text they duplicate. `near_threshold` 1.0 removes exact duplicates only."""
    kept: list[int] = []
    removed: list[Removed] = []
    exact: dict[str, int] = {}
    index = _MinHashIndex()
    kept_shingles: dict[int, set[str]] = {}
    for i, text in enumerate(texts):
        norm = normalize_prompt(text)
        if norm in exact:
            removed.append(Removed(i, DROP_EXACT, exact[norm]))
            continue
        if near_threshold < 1:  # at 1.0 only exact duplicates go: no shingles, no LSH
            items = shingles(text)
            candidates, bands = index.candidates(items)
            near = next((j for j in sorted(candidates) if jaccard(items, kept_shingles[j]) >= near_threshold), None)
            if near is not None:
                removed.append(Removed(i, DROP_NEAR, near))
                continue
            kept_shingles[i] = items
            index.add(i, bands)
        exact[norm] = i
        kept.append(i)
    return kept, removed


def request_rows(cfg: TopicPromptsConfig) -> pa.Table:
    """One row per request: the topic, the request's index in it, and its seed."""
    rows = []
    for topic in cfg.topics:
        for k in range(cfg.requests_per_topic()):
            request_id = f"{topic.category}#{k}"
            rows.append(
                {
                    "id": request_id,
                    "category": topic.category,
                    "description": topic.description or topic.category,
                    "index": k,
                    "seed": prompt_seed(cfg.seed, request_id),
                }
            )
    n = len(rows)
    return pa.Table.from_pylist(rows).append_column("status", pa.array([STATUS_OK] * n, pa.string())).append_column(
        "error", pa.nulls(n, pa.string())
    ).append_column("failed_stage", pa.nulls(n, pa.string())).append_column("drop_reason", pa.nulls(n, pa.string()))


def select_prompts(cfg: TopicPromptsConfig, replies: list[dict[str, Any]]) -> tuple[list[dict], dict[str, Any]]:
    """The prompt file's records and the report, from the request rows with their `reply` (or error)."""
    order = {t.category: i for i, t in enumerate(cfg.topics)}
    replies = sorted(replies, key=lambda r: (order[r["category"]], r["index"]))
    reasons: Counter = Counter()
    failed = [r for r in replies if r["status"] != STATUS_OK]
    candidates = []
    for row in replies:
        if row["status"] != STATUS_OK:
            continue
        text = clean_prompt(row["reply"] or "")
        if not text:
            reasons[DROP_EMPTY] += 1
        elif len(text) < cfg.min_chars:
            reasons[DROP_TOO_SHORT] += 1
        elif len(text) > cfg.max_chars:
            reasons[DROP_TOO_LONG] += 1
        else:
            candidates.append((row, text))
    kept, removed = dedupe([text for _, text in candidates], cfg.near_duplicate_threshold)
    reasons.update(r.reason for r in removed)
    per_topic: Counter = Counter()
    records = []
    for i in kept:
        row, text = candidates[i]
        if per_topic[row["category"]] >= cfg.per_topic:
            reasons[DROP_SURPLUS] += 1
            continue
        per_topic[row["category"]] += 1
        records.append({"id": topic_prompt_id(row["category"], text), "category": row["category"], "prompt": text})
    report = {
        "requests": len(replies),
        "failed_requests": len(failed),
        "errors": sorted({r["error"] for r in failed})[:10],
        "removed": dict(sorted(reasons.items())),
        "prompts": len(records),
        "per_topic": {t.category: per_topic[t.category] for t in cfg.topics},
        "short_topics": {t.category: cfg.per_topic - per_topic[t.category] for t in cfg.topics if per_topic[t.category] < cfg.per_topic},
        "model": cfg.model.model,
    }
    return records, report


def write_topic_prompts(cfg: TopicPromptsConfig, output: str) -> dict[str, Any]:
    """Ask the model for prompts, clean and deduplicate them, write `output` (JSONL: id, category,
    prompt) and `output.report.json`; returns the report."""
    import ray

    from synthalign_ray.runtime import check_chat_environment, init_ray

    check_chat_environment({"model": cfg.model})
    if cfg.model.backend == "vllm":
        model_source(cfg.model.model)  # a zoo model is built once on the driver, before the engines race to
    init_ray(cfg.resources, [cfg.model])

    def request(row: dict[str, Any]) -> ChatRequest:
        text = cfg.request.format(topic=row["category"], description=row["description"], index=row["index"])
        return ChatRequest([user_message(text)], seed=row["seed"])

    def output_fn(row: dict[str, Any], reply: ChatReply) -> dict[str, Any]:
        return {"reply": reply.text}

    table = request_rows(cfg)
    step = cfg.resources.rows_per_block
    ds = ray.data.from_arrow([table.slice(start, step) for start in range(0, table.num_rows, step)])
    ds = add_chat_stage(
        ds, cfg.model, stage="topic_prompts", request=request, output=output_fn, output_fields=REPLY_FIELDS, run_seed=cfg.seed
    )
    columns = ["category", "index", "status", "error", "reply"]
    replies = [{name: row[name] for name in columns} for row in ds.select_columns(columns).iter_rows()]
    records, report = select_prompts(cfg, replies)
    store.write_bytes(output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode())
    store.write_json(f"{output}.report.json", report)
    return report
