"""Hallucination metrics, computed the way the benchmarks' official scripts compute them (pure Python:
no Ray, no torch), so a number here is comparable with the papers' numbers.

- POPE: `pope_answer` is the answer parser of POPE's `evaluate.py` (AoiDragon/POPE) and LLaVA's
  `llava/eval/eval_pope.py` (haotian-liu/LLaVA), line for line; `pope_metrics` their accuracy,
  precision, recall, F1 (positive class "yes") and yes-ratio = the share of PREDICTIONS that are "yes".
  lmms-eval's POPE task instead matches the lowercased answer exactly against "yes"/"no" and computes
  its yes-ratio from the ground truth; it is deliberately not followed.
- CHAIR (Rohrbach et al. 2018; LisaAnne/Hallucination utils/chair.py, with the Recall that OPERA's
  chair.py adds; Object HalBench uses the same): COCO object mentions of a caption through a synonym
  table and the script's double-word rules, against the objects annotated for the image.
- AMBER (junyangwang0410/AMBER inference.py): discriminative accuracy / precision / recall / F1 with
  "no" as the positive class per existence / attribute (state, number, action) / relation, and
  generative CHAIR / Cover / Hal / Cog, with the script's rounding and its counters' starting values
  (data/metrics.txt: every count starts at 0.001).

Where the official scripts need NLTK or spaCy models (tokenizer, POS tagger, WordNet lemmatizer, word
vectors), which cannot be downloaded here, the difference is named where it is made: words come from a
regex tokenizer and a rule-based singularizer restricted to the object vocabulary (no POS filter), and
AMBER's noun extractor and spaCy similarity fallback are caller-supplied functions (default: the
regex words, no similarity; `evaluate/amber.py` builds NLTK's and spaCy's where they are installed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from synthalign_ray.evaluate.coco_synonyms import COCO_SYNONYMS

YES, NO = "yes", "no"


# --- POPE ------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """"yes" or "no" for a model's answer, exactly as POPE's evaluate.py and LLaVA's eval_pope.py:
    keep the text before the first period, drop commas, split on single spaces; "No", "not" or "no"
    among the words means "no", anything else (an empty answer, "I cannot tell", "NO") means "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    text = text.replace(",", "")
    words = text.split(" ")  # one space, as the scripts do: "No\nthere" is one word
    if "No" in words or "not" in words or "no" in words:
        return NO
    return YES


def pope_prediction(generated: str) -> str:
    """The prediction LLaVA's POPE evaluation makes of a generated answer: model_vqa_loader.py strips the
    decoded text before it writes the answer file, then eval_pope.py parses it (`pope_answer`). Without
    the strip, "\nNo." would count as "yes"."""
    return pope_answer(generated.strip())


def pope_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict[str, Any]:
    """POPE's metrics of parsed predictions ("yes"/"no") against labels ("yes"/"no"), positive class "yes".

    As the official scripts: a label other than "no" counts as "yes"; yes_ratio is the share of
    predictions that are "yes". A ratio whose denominator is 0 (e.g. precision when nothing was
    predicted "yes") is None where the scripts raise ZeroDivisionError; F1 is 0.0 when precision and
    recall are both 0 (the scripts divide by zero there too)."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for prediction, label in zip(predictions, labels):
        predicted_yes, label_yes = prediction != NO, label != NO
        if predicted_yes and label_yes:
            tp += 1
        elif predicted_yes:
            fp += 1
        elif not label_yes:
            tn += 1
        else:
            fn += 1
    n = tp + fp + tn + fn
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, tp + fn)
    return {
        "n": n,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "accuracy": _ratio(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
        "yes_ratio": _ratio(tp + fp, n),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def _f1(precision: float | None, recall: float | None) -> float | None:
    if precision is None or recall is None:
        return None
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


# --- CHAIR -----------------------------------------------------------------------------------------

# The hard-coded rules of LisaAnne/Hallucination utils/chair.py (OPERA adds "train track"): pairs of words
# read as one object, and qualifiers that would otherwise fire "person" ("baby bird" is a bird).
COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal", "stop light",
    "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat", "baseball glove",
    "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear", "hair drier",
    "potted plant", "bow tie", "laptop computer", "stove top oven", "home plate", "train track",
)  # fmt: skip
ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "animal", "cub")
VEHICLE_WORDS = ("jet", "train")


def double_word_map() -> dict[str, str]:
    mapping = {words: words for words in COCO_DOUBLE_WORDS}
    for animal in ANIMAL_WORDS:
        mapping[f"baby {animal}"] = mapping[f"adult {animal}"] = animal
    for vehicle in VEHICLE_WORDS:
        mapping[f"passenger {vehicle}"] = vehicle
    mapping["bow tie"] = "tie"
    mapping["toilet seat"] = "toilet"
    mapping["wine glas"] = "wine glass"
    return mapping


def parse_synonyms(text: str) -> list[list[str]]:
    """A synonym table in the format of CHAIR's data/synonyms.txt: one object a line, its COCO name
    first, then its synonyms, separated by ", "."""
    return [[word.strip() for word in line.strip().split(", ")] for line in text.splitlines() if line.strip()]


# Irregular plurals the rule-based singularizer must know (WordNet's lemmatizer knows them).
_IRREGULAR = {
    "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth", "mice": "mouse",
    "geese": "goose", "buses": "bus", "knives": "knife", "wolves": "wolf", "leaves": "leaf", "shelves": "shelf",
}  # fmt: skip
_TOKEN = re.compile(r"[a-z]+")


def singularize(word: str, vocabulary: set[str] | frozenset[str] = frozenset()) -> str:
    """A word's singular by rule, kept as is when the word itself is in `vocabulary` (e.g. "glasses"
    stays when a table lists it). Stands in for CHAIR's pattern.en singularize / WordNet lemmatizer."""
    if word in vocabulary:
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, replacement in (("ies", "y"), ("ches", "ch"), ("shes", "sh"), ("sses", "ss"), ("xes", "x"), ("oes", "o")):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            candidate = word[: -len(suffix)] + replacement
            if not vocabulary or candidate in vocabulary:
                return candidate
    if word.endswith("s") and not word.endswith(("ss", "us", "is")) and len(word) > 3:
        return word[:-1]
    return word


@dataclass(frozen=True)
class ChairVocabulary:
    """CHAIR's object vocabulary: every synonym -> its COCO object (the table's first word)."""

    synonym_to_object: Mapping[str, str]
    double_words: Mapping[str, str] = field(default_factory=double_word_map)

    @classmethod
    def from_table(cls, table: Sequence[Sequence[str]] | None = None) -> "ChairVocabulary":
        """From a parsed synonym table (default: the small table shipped in `coco_synonyms.py`; pass
        `parse_synonyms(open("synonyms.txt").read())` for CHAIR's full one)."""
        table = table if table is not None else parse_synonyms(COCO_SYNONYMS)
        mapping = {}
        for words in table:
            for word in words:
                mapping[word] = words[0]
        return cls(mapping)

    def mentions(self, caption: str) -> list[tuple[str, str]]:
        """(word, COCO object) for every object mention in a caption, in order, as CHAIR's caption_to_words."""
        vocabulary = set(self.synonym_to_object) | {part for key in self.double_words for part in key.split()}
        words = [singularize(word, vocabulary) for word in _TOKEN.findall(caption.lower())]
        merged, i = [], 0
        while i < len(words):
            pair = " ".join(words[i : i + 2])
            if pair in self.double_words:
                merged.append(self.double_words[pair])
                i += 2
            else:
                merged.append(words[i])
                i += 1
        if "toilet" in merged and "seat" in merged:  # "the seat of the toilet" is not a chair
            merged = [word for word in merged if word != "seat"]
        return [(word, self.synonym_to_object[word]) for word in merged if word in self.synonym_to_object]


def chair_metrics(
    captions: Iterable[tuple[Any, str]],
    ground_truth: Mapping[Any, Iterable[str]],
    vocabulary: ChairVocabulary | None = None,
) -> dict[str, Any]:
    """CHAIRs (share of captions with a hallucinated object), CHAIRi (share of object mentions that
    are hallucinated), Recall (share of annotated objects mentioned; OPERA's addition), over
    (image id, caption) pairs; `ground_truth` maps an image id to its COCO objects (canonical names,
    e.g. from `coco_ground_truth`). Also per caption: mentions and hallucinated words."""
    vocabulary = vocabulary or ChairVocabulary.from_table()
    captions_n = hallucinated_captions = mentions_n = hallucinated_mentions = 0
    gt_total = gt_recalled = 0
    per_caption = []
    for image_id, caption in captions:
        if image_id not in ground_truth:
            raise KeyError(f"no ground-truth objects for image {image_id!r}")
        objects = {vocabulary.synonym_to_object.get(o, o) for o in ground_truth[image_id]}
        mentions = vocabulary.mentions(caption)
        hallucinated = [(word, obj) for word, obj in mentions if obj not in objects]
        recalled = {obj for _, obj in mentions if obj in objects}
        captions_n += 1
        hallucinated_captions += bool(hallucinated)
        mentions_n += len(mentions)
        hallucinated_mentions += len(hallucinated)
        gt_total += len(objects)
        gt_recalled += len(recalled)
        per_caption.append(
            {"image_id": image_id, "mentioned": [obj for _, obj in mentions], "hallucinated": [w for w, _ in hallucinated]}
        )
    return {
        "n": captions_n,
        "chair_s": _ratio(hallucinated_captions, captions_n),
        "chair_i": _ratio(hallucinated_mentions, mentions_n),
        "recall": _ratio(gt_recalled, gt_total),
        "mentions": mentions_n,
        "per_caption": per_caption,
    }


def coco_ground_truth(
    instances: Mapping[str, Any], captions: Mapping[str, Any] | None = None, vocabulary: ChairVocabulary | None = None
) -> dict[int, set[str]]:
    """Objects per COCO image id, as CHAIR builds them: the segmentation annotations' categories plus
    the objects mentioned in the human captions (parsed `instances_*.json` / `captions_*.json`)."""
    vocabulary = vocabulary or ChairVocabulary.from_table()
    names = {category["id"]: category["name"] for category in instances["categories"]}
    objects: dict[int, set[str]] = {}
    for annotation in instances["annotations"]:
        name = names[annotation["category_id"]]
        objects.setdefault(annotation["image_id"], set()).add(vocabulary.synonym_to_object.get(name, name))
    for annotation in (captions or {}).get("annotations", []):
        mentioned = {obj for _, obj in vocabulary.mentions(annotation["caption"])}
        objects.setdefault(annotation["image_id"], set()).update(mentioned)
    return objects


# --- AMBER -----------------------------------------------------------------------------------------

AMBER_GENERATIVE = "generative"
# inference.py's counter groups of the discriminative types (ha_, as_, an_, aa_; anything else is asso_).
AMBER_GROUPS = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "state",
    "discriminative-attribute-number": "number",
    "discriminative-attribute-action": "action",
    "discriminative-relation": "relation",
}
AMBER_ATTRIBUTE_GROUPS = ("state", "number", "action")
# The order of the discriminative results (as the script prints them), "all" last.
AMBER_DIMENSIONS = ("existence", "attribute", "state", "number", "action", "relation", "all")
# AMBER's data/metrics.txt starts every score counter at 0 and every count (denominator) at 0.001, so a
# ratio is score / (count + 0.001) and never divides by zero; attribute adds up three such counts.
AMBER_COUNT_START = 0.001


def amber_group(question_type: str) -> str:
    """inference.py's counter group of an annotation `type`: existence, state, number, action or relation
    (any other discriminative type counts as relation, as the script's else branch)."""
    return AMBER_GROUPS.get(question_type, "relation")


def amber_dimension(question_type: str) -> str:
    """existence / attribute / relation of an AMBER annotation's `type` (as inference.py branches)."""
    group = amber_group(question_type)
    return "attribute" if group in AMBER_ATTRIBUTE_GROUPS else group


def amber_response(text: str) -> str:
    """A free-form answer as AMBER's scorer expects it ("Yes" or "No", compared exactly), through the
    POPE parser. AMBER's own script compares the raw response, so callers must normalize; we do it
    the POPE way rather than count every "Yes." as wrong."""
    return "No" if pope_prediction(text) == NO else "Yes"


_AMBER_COUNTERS = ("n", "correct", "truth_no", "correct_no", "said_no", "said_no_right")


def amber_discriminative(records: Iterable[tuple[str, str, str]]) -> dict[str, dict[str, float | int]]:
    """AMBER discriminative metrics over (type, truth "yes"/"no", response "Yes"/"No") records, "no" the
    positive class, per dimension (existence, attribute and its state / number / action, relation) and
    overall ("all"), for the dimensions that have questions. As inference.py: percent rounded to 0.1,
    counts starting at 0.001 (data/metrics.txt; attribute sums three, so 0.003), F1 from the rounded
    precision and recall with epsilon 0.001 for existence and 0.0001 elsewhere. A response other than
    exactly "Yes"/"No" is wrong; a truth other than "yes" counts as "no"."""
    counts: dict[str, dict[str, int]] = {}
    for question_type, truth, response in records:
        for key in (amber_group(question_type), "all"):
            c = counts.setdefault(key, dict.fromkeys(_AMBER_COUNTERS, 0))
            c["n"] += 1
            if truth == YES:
                c["correct"] += response == "Yes"
            else:
                c["truth_no"] += 1
                if response == "No":
                    c["correct"] += 1
                    c["correct_no"] += 1
            if response == "No":
                c["said_no"] += 1
                c["said_no_right"] += truth == NO
    groups = {key: (c, 1) for key, c in counts.items()}
    attribute = [counts[key] for key in AMBER_ATTRIBUTE_GROUPS if key in counts]
    if attribute:
        groups["attribute"] = ({name: sum(c[name] for c in attribute) for name in _AMBER_COUNTERS}, len(AMBER_ATTRIBUTE_GROUPS))
    result = {}
    for key in (key for key in AMBER_DIMENSIONS if key in groups):
        c, starts = groups[key]
        start = starts * AMBER_COUNT_START
        precision = _amber_percent(c["said_no_right"], c["said_no"] + start)
        recall = _amber_percent(c["correct_no"], c["truth_no"] + start)
        epsilon = 0.001 if key == "existence" else 0.0001
        f1 = round(2 * (precision / 100) * (recall / 100) / ((precision / 100) + (recall / 100) + epsilon) * 100, 1)
        accuracy = _amber_percent(c["correct"], c["n"] + start)
        result[key] = {"n": c["n"], "accuracy": accuracy, "precision": precision, "recall": recall, "f1": f1}
    return result


def _amber_percent(score: float, count: float) -> float:
    return round(score / count * 100, 1)


# A word as NLTK's tokenizer keeps it for AMBER's vocabulary: letters, hyphenated words whole ("e-book").
_AMBER_TOKEN = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def amber_nouns(text: str, hallucination_words: set[str]) -> list[str]:
    """The candidate object words of a response: tokens (singularized) that are in AMBER's word list.
    AMBER tags nouns with NLTK and lemmatizes them with WordNet; here every token is a candidate (no POS
    filter: a verb or adjective spelled like an AMBER word, "can" or "watch", counts). Case is kept, as
    the script does not lowercase: a capitalized "Dog" is no AMBER word there either."""
    words = (singularize(word, hallucination_words) for word in _AMBER_TOKEN.findall(text))
    return [word for word in words if word in hallucination_words]


@dataclass(frozen=True)
class AmberResources:
    """AMBER's word files: `association` = data/relation.json (object -> related words), `safe_words`
    = data/safe_words.txt lines."""

    association: Mapping[str, Sequence[str]]
    safe_words: frozenset[str]

    @property
    def hallucination_words(self) -> set[str]:
        words = set(self.association)
        for related in self.association.values():
            words.update(related)
        return words


def amber_generative(
    records: Iterable[tuple[str, Sequence[str], Sequence[str]]],
    resources: AmberResources,
    similar: Callable[[str, str], bool] | None = None,
    nouns: Callable[[str], list[str]] | None = None,
) -> dict[str, Any]:
    """AMBER generative CHAIR, Cover, Hal and Cog (percent, rounded to 0.1, counts starting at 0.001 as
    data/metrics.txt) over (response, truth objects, hallucination objects) records, as inference.py
    scores them. `similar(noun, word)` is the script's spaCy similarity test (> 0.8 with en_core_web_lg);
    None skips that fallback. `nouns(text)` extracts the nouns (default `amber_nouns`). Also per
    response: its candidate nouns and the ones flagged as hallucinated."""
    vocabulary = resources.hallucination_words
    nouns = nouns or (lambda text: amber_nouns(text, vocabulary))
    totals = dict.fromkeys(("chair", "chair_n", "cover", "cover_n", "cog", "cog_n", "clean", "n"), 0)
    per_response = []
    for response, truth, hallu in records:
        candidates = [noun for noun in nouns(response) if noun in vocabulary]
        safe_words, safe_marks = _expand(truth, resources.association)
        hallu_words, hallu_marks = _expand(hallu, resources.association)
        flagged = [0] * len(candidates)
        for i, noun in enumerate(candidates):
            if noun in resources.safe_words:
                continue
            if noun in safe_words:
                _mark(safe_words.index(noun), safe_marks, len(truth))
                continue
            if noun in hallu_words:
                _mark(hallu_words.index(noun), hallu_marks, len(hallu))
            if similar is not None:
                j = next((j for j, word in enumerate(hallu_words) if similar(noun, word)), None)
                if j is not None:
                    _mark(j, hallu_marks, len(hallu))
                j = next((j for j, word in enumerate(safe_words) if similar(noun, word)), None)
                if j is not None:
                    _mark(j, safe_marks, len(truth))
                    continue
            flagged[i] = 1
        totals["chair"] += sum(flagged)
        totals["chair_n"] += len(flagged)
        # list[-0:] is the whole list: the script's slice, kept for identical numbers.
        totals["cover"] += sum(safe_marks[-len(truth) :])
        totals["cover_n"] += len(safe_marks[-len(truth) :])
        totals["cog"] += sum(hallu_marks[-len(hallu) :])
        totals["cog_n"] += len(hallu_marks[-len(hallu) :])
        totals["clean"] += sum(flagged) == 0
        totals["n"] += 1
        per_response.append({"nouns": candidates, "hallucinated": [noun for noun, flag in zip(candidates, flagged) if flag]})
    start = AMBER_COUNT_START
    return {
        "n": totals["n"],
        "chair": _amber_percent(totals["chair"], totals["chair_n"] + start),
        "cover": _amber_percent(totals["cover"], totals["cover_n"] + start),
        "hal": round(100 - totals["clean"] / (totals["n"] + start) * 100, 1),
        "cog": _amber_percent(totals["cog"], totals["cog_n"] + start),
        "per_response": per_response,
    }


def _expand(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> tuple[list[str], list[int]]:
    """inference.py's word and mark lists: every object's associated words (each mark holding the index
    of its object), then the objects themselves (marks 0, set to 1 when the object is covered)."""
    words, marks = [], []
    for index, obj in enumerate(objects):
        related = association.get(obj, [])
        words += list(related)
        marks += [index] * len(related)
    return words + list(objects), marks + [0] * len(objects)


def _mark(j: int, marks: list[int], n_objects: int) -> None:
    """A match of word j covers its object: an associated word marks the object it came from."""
    head = len(marks) - n_objects
    if j < head:
        marks[marks[j] + head] = 1
    else:
        marks[j] = 1
