"""Topic prompts: reply cleaning, stable ids, exact / near-duplicate removal, selection and its report."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from synthalign_ray.stages.topic_prompts import (
    DROP_EMPTY,
    DROP_EXACT,
    DROP_NEAR,
    DROP_SURPLUS,
    DROP_TOO_SHORT,
    TopicPromptsConfig,
    clean_prompt,
    dedupe,
    jaccard,
    request_rows,
    select_prompts,
    shingles,
    topic_prompt_id,
)

MODEL = {"model": "zoo:chat-llm", "temperature": 1.0}


def config(**overrides):
    return TopicPromptsConfig(**{"topics": ["art", {"category": "school"}], "per_topic": 2, "model": MODEL, **overrides})


@pytest.mark.parametrize(
    "reply, prompt",
    [
        ("a red boat on a lake", "a red boat on a lake"),
        ("\n1. A red boat on a lake.\n2. Another", "A red boat on a lake."),
        ('Prompt: "a cat on a sofa"', "a cat on a sofa"),
        ("- a train at night", "a train at night"),
        ("  \n \n", ""),
    ],
)
def test_clean_prompt(reply, prompt):
    assert clean_prompt(reply) == prompt


def test_ids_are_stable_and_ignore_case_and_punctuation():
    assert topic_prompt_id("Daily activities", "A cat, on a sofa!") == topic_prompt_id("Daily activities", "a cat on a sofa")
    assert topic_prompt_id("Daily activities", "a cat").startswith("daily-activities-")
    assert topic_prompt_id("art", "a cat") != topic_prompt_id("art", "a dog")


def test_dedupe_removes_exact_then_near_duplicates_keeping_the_first():
    texts = [
        "a watercolor painting of a red boat on a calm lake at sunset",
        "A watercolor painting of a red boat, on a calm lake at sunset!",  # exact after normalisation
        "a watercolor painting of a red boat on a calm lake at sunrise",  # near
        "children reading books in a bright classroom",
    ]
    assert jaccard(shingles(texts[0]), shingles(texts[2])) > 0.8
    kept, removed = dedupe(texts, near_threshold=0.8)
    assert kept == [0, 3]
    assert [(r.index, r.reason, r.duplicate_of) for r in removed] == [(1, DROP_EXACT, 0), (2, DROP_NEAR, 0)]
    # threshold 1.0: exact duplicates only
    assert dedupe(texts, near_threshold=1.0)[0] == [0, 2, 3]


def test_lsh_finds_near_duplicates_among_many_distinct_prompts():
    rng = random.Random(0)
    words = "red blue green boat car dog cat lake street city park tree house bird child snow rain sun".split()
    distinct = [" ".join(rng.choice(words) for _ in range(12)) + f" number {i}" for i in range(300)]
    near = [text.replace("number", "nr") for text in distinct[:20]]  # a small edit of each of the first 20
    kept, removed = dedupe(distinct + near, near_threshold=0.8)
    removed_near = {r.index - 300: r.duplicate_of for r in removed if r.reason == DROP_NEAR}
    # LSH only picks what to compare: it must find what a brute-force comparison finds.
    brute_force = {i for i in range(20) if jaccard(shingles(distinct[i]), shingles(near[i])) >= 0.8}
    assert 15 <= len(brute_force) < 20  # the edit puts some pairs on either side of the threshold
    assert removed_near == {i: i for i in brute_force}
    assert len(kept) == 300 + 20 - len(brute_force)


def test_config_checks():
    with pytest.raises(ValidationError, match="temperature is 0"):
        config(model={"model": "zoo:chat-llm"})
    with pytest.raises(ValidationError, match="listed twice"):
        config(topics=["art", "art"])
    with pytest.raises(ValidationError, match="unknown field"):
        config(request="{topic} {style}")
    assert config(oversample=1.5, per_topic=3).requests_per_topic() == 5


def test_requests_have_distinct_reproducible_seeds():
    rows = request_rows(config()).to_pylist()
    assert [(r["category"], r["index"]) for r in rows] == [("art", 0), ("art", 1), ("art", 2), ("school", 0), ("school", 1), ("school", 2)]
    assert len({r["seed"] for r in rows}) == 6
    assert rows == request_rows(config()).to_pylist()
    assert all(r["status"] == "ok" and r["description"] == r["category"] for r in rows)


def test_select_prompts_accounts_for_every_request():
    replies = [
        ("art", 0, "ok", None, "a red boat on a calm lake at sunset"),
        ("art", 1, "ok", None, "A red boat on a calm lake at sunset."),  # exact duplicate
        ("art", 2, "ok", None, "a museum hall with three marble statues"),
        ("art", 3, "ok", None, "an oil painting of a green forest"),  # surplus: art has 2 already
        ("school", 0, "ok", None, "   "),  # empty
        ("school", 1, "ok", None, "pens"),  # too short
        ("school", 2, "failed", "APIError: 500", None),
        ("school", 3, "ok", None, "children reading in a bright classroom"),
    ]
    rows = [dict(zip(["category", "index", "status", "error", "reply"], r)) for r in replies]
    records, report = select_prompts(config(oversample=2), list(reversed(rows)))  # order is restored
    assert [r["prompt"] for r in records] == [
        "a red boat on a calm lake at sunset",
        "a museum hall with three marble statues",
        "children reading in a bright classroom",
    ]
    assert [r["category"] for r in records] == ["art", "art", "school"]
    assert report["removed"] == {DROP_EMPTY: 1, DROP_EXACT: 1, DROP_SURPLUS: 1, DROP_TOO_SHORT: 1}
    assert report["failed_requests"] == 1 and report["errors"] == ["APIError: 500"]
    assert report["requests"] == report["prompts"] + sum(report["removed"].values()) + report["failed_requests"]
    assert report["short_topics"] == {"school": 1}
