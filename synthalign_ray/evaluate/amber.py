"""AMBER (Wang et al. 2023, github.com/junyangwang0410/AMBER): an LLM-free hallucination benchmark with a
generative task (describe the image; CHAIR, Cover, Hal, Cog over AMBER's object annotations) and a
discriminative one (yes/no questions on existence, attribute (state, number, action) and relation; F1
with "no" as the positive class). Answered by the LVLM in the shared inference pass (greedy), scored as
AMBER's `inference.py` scores them (`metrics.amber_generative`, `metrics.amber_discriminative`).

Input, AMBER's own `data/` folder (`amber.data_dir`; any file can be named on its own instead):

    query/query_all.json    [{"id": 1, "image": "AMBER_1.jpg", "query": "Describe this image."}, ...]
                            (amber.query_file; or query_generative.json, query_discriminative.json,
                            query_discriminative-{existence,attribute,relation}.json for one task)
    annotations.json        [{"id": 1, "type": "generative", "truth": ["sky", ...], "hallu": ["cloud", ...]},
                             {"id": 1005, "type": "discriminative-attribute-state", "truth": "yes"}, ...]
    relation.json           {"person": ["people", "man", ...], ...}: the word association (generative)
    safe_words.txt          words never counted as hallucinated (generative)
    metrics.txt             not read: its starting values (counts at 0.001) are built into the metrics

and `amber.image_dir`, the folder (or URI) of the images (AMBER_<n>.jpg, from the Google Drive link in
AMBER's README). Every query's id must have an annotation, every object of a queried generative
annotation must be in relation.json (the script fails on it otherwise), and every image must exist;
errors name the file and line. A generative query goes to the model as is ("Describe this image.",
`amber.max_tokens` 512); a discriminative one gets LLaVA's single-word suffix, as POPE
(`amber.prompt_suffix`), and the `generation.max_tokens` budget.

What differs from AMBER's script, and why:
- Discriminative answers are normalized to "Yes"/"No" with POPE's parser (`metrics.amber_response`);
  the script compares the raw response with "Yes"/"No" exactly and expects the user to have cleaned it.
- Nouns of a description: by default (`amber.nouns: rules`) every word (case kept, hyphenated words
  whole) singularized by rule, not NLTK's tokenizer, POS tagger (nouns only) and WordNet lemmatizer,
  whose data cannot be downloaded here; a verb or adjective spelled like an AMBER word ("can", "watch")
  counts as a noun. `amber.nouns: nltk` runs the script's own extraction where NLTK and its data
  (punkt, averaged_perceptron_tagger, wordnet) are installed.
- The script's spaCy fallback (a noun counts as an annotated object when en_core_web_lg's similarity
  exceeds 0.8) runs only with `amber.spacy_model: en_core_web_lg` installed; without it only exact
  words and relation.json's associations match, so CHAIR and Hal can come out higher and Cover and Cog
  lower than the script's.

Output per model: `amber.json` (generative CHAIR / Cover / Hal / Cog; discriminative accuracy,
precision, recall, F1 per dimension and overall; in percent, as AMBER reports) and
`amber_predictions.parquet` (one row per query: id, task, type, dimension, image_file, query, answer,
finish_reason; discriminative: truth, response, correct; generative: truth_objects, hallu_objects,
nouns, hallucinated).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from synthalign_ray import store
from synthalign_ray.config import ConfigError
from synthalign_ray.evaluate.common import BenchmarkFileError, check_record, image_location, read_json_list, read_string_lists, read_text
from synthalign_ray.evaluate.metrics import (
    AMBER_DIMENSIONS,
    AMBER_GENERATIVE,
    AMBER_GROUPS,
    AmberResources,
    amber_dimension,
    amber_discriminative,
    amber_generative,
    amber_response,
)
from synthalign_ray.evaluate.pope import LLAVA_POPE_SUFFIX, pope_prompt
from synthalign_ray.base import StrictModel

AMBER_TYPES = (AMBER_GENERATIVE, *AMBER_GROUPS)
DATA_FILES = {
    "query_file": "query/query_all.json",
    "annotation_file": "annotations.json",
    "relation_file": "relation.json",
    "safe_words_file": "safe_words.txt",
}
GENERATIVE_METRICS = ("chair", "cover", "hal", "cog")
DISCRIMINATIVE_METRICS = ("accuracy", "precision", "recall", "f1")
COMPARED_DIMENSIONS = ("existence", "attribute", "relation", "all")  # amber.json has state / number / action too
HEADLINE_METRICS = (*GENERATIVE_METRICS, "accuracy", "f1")  # accuracy and F1: discriminative, all dimensions


class AmberConfig(StrictModel):
    data_dir: str | None = Field(None, description="AMBER's data/ folder (query/, annotations.json, relation.json, safe_words.txt)")
    query_file: str | None = Field(None, description="query file (default <data_dir>/query/query_all.json)")
    annotation_file: str | None = Field(None, description="annotations (default <data_dir>/annotations.json)")
    relation_file: str | None = Field(None, description="word association (default <data_dir>/relation.json)")
    safe_words_file: str | None = Field(None, description="safe words (default <data_dir>/safe_words.txt)")
    image_dir: str = Field(description="folder or URI of the images named by the queries' `image` field")
    prompt_suffix: str = Field(LLAVA_POPE_SUFFIX, description="appended to each discriminative (yes/no) query, as POPE's")
    max_tokens: int = Field(512, ge=1, description="description budget of the generative task (yes/no answers: generation.max_tokens)")
    limit: int | None = Field(None, ge=1, description="first N queries of each task (smoke tests)")
    nouns: Literal["rules", "nltk"] = Field("rules", description="noun extraction: rule based, or AMBER's NLTK (needs NLTK's data)")
    spacy_model: str | None = Field(None, description="spaCy model of AMBER's similarity fallback (en_core_web_lg); none: exact words")
    similarity_score: float = Field(0.8, gt=0, lt=1, description="similarity above which two words match (AMBER: 0.8)")

    @model_validator(mode="after")
    def _files_named(self):
        if self.data_dir is None and (self.query_file is None or self.annotation_file is None):
            raise ValueError("set data_dir (AMBER's data/ folder), or query_file and annotation_file")
        return self

    def file(self, name: str) -> str | None:
        """A data file: the one named in the config, else its place under data_dir (None without both)."""
        named = getattr(self, name)
        return named if named is not None or self.data_dir is None else store.join(self.data_dir, DATA_FILES[name])


def _records(path: str, what: str, fields: tuple[str, ...]):
    """(where, line, record) of an AMBER JSON list, each record checked: an object with `fields`, an integer
    id that no earlier record has. `where` is "file:line"."""
    seen: dict[int, int] = {}
    for line, record in read_json_list(path, what):
        where = f"{path}:{line}"
        check_record(record, where, fields, f"{what} records")
        if not isinstance(record["id"], int) or isinstance(record["id"], bool):
            raise BenchmarkFileError(f"{where}: id {record['id']!r} is not an integer")
        if record["id"] in seen:
            raise BenchmarkFileError(f"{where}: id {record['id']} repeats line {seen[record['id']]}")
        seen[record["id"]] = line
        yield where, line, record


def read_queries(path: str) -> list[dict[str, Any]]:
    """The records of a query file, checked: objects with an integer id (unique), an image file name and a
    non-empty query. Errors name the file and line."""
    queries = []
    for where, line, record in _records(path, "AMBER query", ("id", "image", "query")):
        if not isinstance(record["image"], str) or not record["image"]:
            raise BenchmarkFileError(f"{where}: `image` must be a file name")
        if not isinstance(record["query"], str) or not record["query"].strip():
            raise BenchmarkFileError(f"{where}: empty query")
        queries.append({"amber_id": record["id"], "image_file": record["image"], "query": record["query"], "line": line})
    if not queries:
        raise BenchmarkFileError(f"{path}: no queries")
    return queries


def read_annotations(path: str) -> dict[int, dict[str, Any]]:
    """id -> annotation of an annotations.json, checked: a known `type`; a generative one has `truth` and
    `hallu` lists of object words, a discriminative one `truth` "yes" or "no". Errors name the file and line."""
    annotations = {}
    for where, line, record in _records(path, "AMBER annotation", ("id", "type", "truth")):
        if record["type"] not in AMBER_TYPES:
            raise BenchmarkFileError(f"{where}: type {record['type']!r} is not one of {list(AMBER_TYPES)}")
        if record["type"] == AMBER_GENERATIVE:
            for name in ("truth", "hallu"):
                words = record.get(name)
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise BenchmarkFileError(f"{where}: `{name}` of a generative annotation must be a list of object words")
        elif record["truth"] not in ("yes", "no"):
            raise BenchmarkFileError(f"{where}: truth {record['truth']!r} is not 'yes' or 'no'")
        annotations[record["id"]] = {"type": record["type"], "truth": record["truth"], "hallu": record.get("hallu"), "line": line}
    return annotations


def read_resources(relation_path: str, safe_words_path: str) -> AmberResources:
    """relation.json ({object: [associated words]}) and safe_words.txt (a word a line), checked."""
    association = read_string_lists(relation_path, "associated words", "object: [associated words]")
    safe_words = frozenset(line for line in read_text(safe_words_path, "AMBER safe words").splitlines() if line)
    return AmberResources(association, safe_words)


def load_queries(cfg: AmberConfig, yes_no_max_tokens: int) -> tuple[list[dict[str, Any]], AmberResources | None]:
    """Prompt rows (`common.answer_prompts`), one per query, in the query file's order, joined to their
    annotations; and AMBER's word files when there are generative queries. Everything checked."""
    query_file, annotation_file = cfg.file("query_file"), cfg.file("annotation_file")
    if query_file is None or annotation_file is None:  # the validator's rule, for a config changed after it ran
        raise ConfigError("amber: set data_dir, or query_file and annotation_file")
    annotations = read_annotations(annotation_file)
    rows, taken = [], Counter()
    for q in read_queries(query_file):
        where = f"{query_file}:{q['line']}"
        annotation = annotations.get(q["amber_id"])
        if annotation is None:
            raise BenchmarkFileError(f"{where}: query id {q['amber_id']} has no annotation in {annotation_file}")
        generative = annotation["type"] == AMBER_GENERATIVE
        task = "generative" if generative else "discriminative"
        if cfg.limit is not None and taken[task] == cfg.limit:
            continue
        taken[task] += 1
        rows.append(
            {
                **q, "id": f"amber/{q['amber_id']}", "task": task, "type": annotation["type"],
                "dimension": task if generative else amber_dimension(annotation["type"]),
                "truth": annotation["truth"], "hallu": annotation["hallu"], "annotation_line": annotation["line"],
                "prompt": q["query"] if generative else pope_prompt(q["query"], cfg.prompt_suffix),
                "max_tokens": cfg.max_tokens if generative else yes_no_max_tokens,
                "image_uri": image_location(cfg.image_dir, q["image_file"], where, "amber.image_dir"),
            }
        )  # fmt: skip
    if not taken["generative"]:
        return rows, None
    relation_file, safe_words_file = cfg.file("relation_file"), cfg.file("safe_words_file")
    if relation_file is None or safe_words_file is None:
        raise ConfigError("amber: generative queries need relation_file and safe_words_file (or data_dir)")
    resources = read_resources(relation_file, safe_words_file)
    for row in rows:
        unknown = [w for w in (row["truth"] + row["hallu"] if row["task"] == "generative" else []) if w not in resources.association]
        if unknown:
            raise BenchmarkFileError(
                f"{annotation_file}:{row['annotation_line']}: id {row['amber_id']}: object(s) {unknown} not in {relation_file}"
            )
    return rows, resources


def scorers(cfg: AmberConfig) -> tuple[Callable[[str], list[str]] | None, Callable[[str, str], bool] | None]:
    """(noun extractor, similarity test) of the generative scoring, built and tried before Ray starts:
    None, None by default (`metrics.amber_nouns`, exact words); AMBER's NLTK extraction and spaCy
    similarity when configured, failing here when they are not installed."""
    return (_nltk_nouns() if cfg.nouns == "nltk" else None), (_spacy_similarity(cfg) if cfg.spacy_model else None)


def _nltk_nouns() -> Callable[[str], list[str]]:
    """AMBER's extract_nouns: NLTK's tokenizer and POS tags, nouns (NN*) lemmatized by WordNet."""
    try:
        import nltk
        from nltk.stem import WordNetLemmatizer
    except ImportError:
        raise ConfigError("amber.nouns: nltk needs the nltk package (pip install nltk)") from None
    lemmatizer = WordNetLemmatizer()

    def extract(text: str) -> list[str]:
        return [lemmatizer.lemmatize(word) for word, pos in nltk.pos_tag(nltk.word_tokenize(text)) if pos.startswith("NN")]

    try:
        extract("A dog runs.")
    except LookupError as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if line.startswith("Resource")), lines[0] if lines else "LookupError")
        raise ConfigError(f"amber.nouns: nltk: NLTK's data is missing ({reason})") from None
    return extract


def _spacy_similarity(cfg: AmberConfig) -> Callable[[str, str], bool]:
    """AMBER's check_synonyms_word: spaCy similarity of the two words above `similarity_score`."""
    try:
        import spacy

        nlp = spacy.load(cfg.spacy_model)
    except (ImportError, OSError) as error:
        raise ConfigError(f"amber.spacy_model: cannot load spaCy model {cfg.spacy_model!r} ({error})") from None
    doc = functools.lru_cache(maxsize=None)(nlp)
    return lambda a, b: doc(a).similarity(doc(b)) > cfg.similarity_score


PREDICTION_SCHEMA = pa.schema(
    [("amber_id", pa.int64()), ("task", pa.string()), ("type", pa.string()), ("dimension", pa.string()),
     ("image_file", pa.string()), ("query", pa.string()), ("answer", pa.string()), ("finish_reason", pa.string()),
     ("truth", pa.string()), ("response", pa.string()), ("correct", pa.bool_()),
     ("truth_objects", pa.list_(pa.string())), ("hallu_objects", pa.list_(pa.string())),
     ("nouns", pa.list_(pa.string())), ("hallucinated", pa.list_(pa.string()))]
)  # fmt: skip


def score(
    rows: list[dict[str, Any]],
    answers: dict[str, dict[str, str]],
    resources: AmberResources | None,
    nouns: Callable[[str], list[str]] | None = None,
    similar: Callable[[str, str], bool] | None = None,
) -> tuple[pa.Table, dict[str, Any]]:
    """The predictions table (one row per query, in order) and the scores: `generative` and
    `discriminative` (per dimension), each present when the run has queries of that task."""
    generative = [row for row in rows if row["task"] == "generative"]
    discriminative = [row for row in rows if row["task"] == "discriminative"]
    scores: dict[str, Any] = {}
    details: dict[str, dict[str, Any]] = {}
    if generative:
        records = [(answers[row["id"]]["answer"], row["truth"], row["hallu"]) for row in generative]
        metrics = amber_generative(records, resources, similar=similar, nouns=nouns)
        for row, found in zip(generative, metrics.pop("per_response")):
            details[row["id"]] = {"truth_objects": row["truth"], "hallu_objects": row["hallu"], **found}
        scores["generative"] = metrics
    if discriminative:
        for row in discriminative:
            response = amber_response(answers[row["id"]]["answer"])
            details[row["id"]] = {"truth": row["truth"], "response": response, "correct": response.lower() == row["truth"]}
        scores["discriminative"] = amber_discriminative((row["type"], row["truth"], details[row["id"]]["response"]) for row in discriminative)
    table = pa.Table.from_pylist(
        [
            {
                "amber_id": row["amber_id"], "task": row["task"], "type": row["type"], "dimension": row["dimension"],
                "image_file": row["image_file"], "query": row["query"], "answer": answers[row["id"]]["answer"],
                "finish_reason": answers[row["id"]]["finish_reason"], **details[row["id"]],
            }
            for row in rows
        ],
        schema=PREDICTION_SCHEMA,
    )  # fmt: skip
    return table, scores


def headline(scores: dict[str, Any]) -> dict[str, float | None]:
    """CHAIR, Cover, Hal, Cog (generative) and accuracy, F1 (discriminative, all dimensions), in percent;
    None for a task the run did not have."""
    generative, overall = scores.get("generative", {}), scores.get("discriminative", {}).get("all", {})
    return {**{name: generative.get(name) for name in GENERATIVE_METRICS}, "accuracy": overall.get("accuracy"), "f1": overall.get("f1")}


def comparison_rows(scores: dict[str, Any]) -> list[tuple[str, str, float | None, bool]]:
    """The comparison table's (group, metric, value, is a fraction) rows: AMBER's percentages as fractions."""
    groups = [("generative", scores["generative"], GENERATIVE_METRICS)] if "generative" in scores else []
    by_dimension = scores.get("discriminative", {})
    groups += [(name, by_dimension[name], DISCRIMINATIVE_METRICS) for name in AMBER_DIMENSIONS if name in COMPARED_DIMENSIONS and name in by_dimension]
    return [(group, metric, values[metric] / 100, True) for group, values, metrics in groups for metric in metrics]
