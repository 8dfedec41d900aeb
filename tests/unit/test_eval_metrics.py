"""Evaluation metrics against hand-computed cases: POPE's official parser on adversarial answers, POPE,
CHAIR and AMBER numbers worked out by hand from the official scripts' definitions."""

from __future__ import annotations

import pytest

from synthalign_ray.evaluate.metrics import (
    AmberResources,
    ChairVocabulary,
    amber_discriminative,
    amber_generative,
    amber_nouns,
    amber_response,
    chair_metrics,
    coco_ground_truth,
    parse_synonyms,
    pope_answer,
    pope_metrics,
    pope_prediction,
    singularize,
)

# What POPE's evaluate.py / LLaVA's eval_pope.py make of each answer (worked through their code by hand:
# first sentence, commas dropped, split on " ", then "No" / "not" / "no" among the words).
ADVERSARIAL_ANSWERS = {
    "Yes.": "yes",
    "No, there is not.": "no",
    "There is a dog.": "yes",
    "I cannot tell": "yes",  # "cannot" is not "not"
    "": "yes",  # nothing said counts as yes
    "yes, no": "no",
    "No": "no",
    "no": "no",
    "NO": "yes",  # only "No" and "no" are matched
    "Not sure.": "yes",  # "Not" is not "not"
    "Yes. There is no dog.": "yes",  # only the first sentence counts
    "There is not a cat in the image": "no",
    " No": "no",  # leading space: words are ["", "No"]
    "No\nthere is none": "yes",  # split on " " only: "No\nthere" is one word
    "Nope": "yes",
    "The answer is no.": "no",
    "...no": "yes",  # the text before the first period is empty
    "no, it's a cat": "no",
}


@pytest.mark.parametrize(("answer", "expected"), list(ADVERSARIAL_ANSWERS.items()))
def test_pope_parser_matches_the_official_scripts(answer, expected):
    assert pope_answer(answer) == expected


@pytest.mark.parametrize(
    ("generated", "expected"),
    [("\nNo.", "no"), ("No\n", "no"), ("  no", "no"), ("\n\nYes.", "yes"), ("\tNo", "no"), ("No\nthere is none", "yes")],
)
def test_pope_prediction_strips_the_generated_answer_as_llava_does(generated, expected):
    # LLaVA's model_vqa_loader.py strips the decoded answer before eval_pope.py parses it.
    assert pope_prediction(generated) == expected


def test_pope_metrics_yes_ratio_is_over_predictions():
    labels = ["yes", "yes", "no", "no"]
    predictions = ["yes", "yes", "yes", "no"]
    m = pope_metrics(predictions, labels)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 1, 1, 0)
    assert m["accuracy"] == 0.75
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == 1.0
    assert m["f1"] == pytest.approx(0.8)
    assert m["yes_ratio"] == 0.75  # lmms-eval would report the labels' 0.5


def test_pope_metrics_from_raw_answers():
    answers = ["Yes.", "No, there is not.", "There is a dog.", "I cannot tell", "", "yes, no"]
    labels = ["yes", "no", "no", "yes", "no", "yes"]
    m = pope_metrics([pope_answer(a) for a in answers], labels)
    # predictions: yes no yes yes yes no -> TP 2 (0, 3), FP 2 (2, 4), TN 1 (1), FN 1 (5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 1, 1)
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["yes_ratio"] == pytest.approx(4 / 6)


def test_pope_metrics_undefined_ratios_are_none():
    m = pope_metrics(["no", "no"], ["no", "no"])
    assert m["accuracy"] == 1.0 and m["yes_ratio"] == 0.0
    assert m["precision"] is None and m["recall"] is None and m["f1"] is None
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        pope_metrics(["no", "no"], ["no"])


def test_singularize_rules_and_vocabulary():
    vocabulary = {"tie", "glass", "scissors", "bus", "shoe"}
    assert singularize("dogs") == "dog"
    assert singularize("ties", vocabulary) == "tie"
    assert singularize("glasses", vocabulary) == "glass"
    assert singularize("scissors", vocabulary) == "scissors"
    assert singularize("buses", vocabulary) == "bus"
    assert singularize("shoes", vocabulary) == "shoe"
    assert singularize("women") == "woman"


def test_chair_by_hand():
    ground_truth = {1: {"dog", "person"}, 2: {"toilet"}, 3: {"bird"}, 4: {"cat"}}
    captions = [
        (1, "A man walks two dogs past a red car."),  # man -> person, dogs -> dog, car hallucinated
        (2, "A toilet seat in a small bathroom."),  # "toilet seat" is the toilet, not a chair
        (3, "A baby bird sits on a bench."),  # "baby bird" is a bird (not a person); bench hallucinated
        (4, "Nothing to see here."),  # no object mentioned: not hallucinated
    ]
    m = chair_metrics(captions, ground_truth)
    assert m["n"] == 4
    assert m["chair_s"] == pytest.approx(2 / 4)
    assert m["mentions"] == 3 + 1 + 2
    assert m["chair_i"] == pytest.approx(2 / 6)
    assert m["recall"] == pytest.approx((2 + 1 + 1 + 0) / (2 + 1 + 1 + 1))
    assert m["per_caption"][0]["hallucinated"] == ["car"]
    assert m["per_caption"][2]["mentioned"] == ["bird", "bench"]
    with pytest.raises(KeyError, match="image 9"):
        chair_metrics([(9, "a dog")], ground_truth)


def test_chair_with_a_user_synonym_table():
    vocabulary = ChairVocabulary.from_table(parse_synonyms("dog, hound, canine\ncat, feline\n"))
    m = chair_metrics([(1, "A hound chases a feline and a horse.")], {1: ["dog"]}, vocabulary)
    assert m["mentions"] == 2  # horse is not in this table
    assert m["chair_i"] == 0.5 and m["per_caption"][0]["hallucinated"] == ["feline"]


def test_coco_ground_truth_from_instances_and_captions():
    instances = {
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [{"image_id": 7, "category_id": 18}, {"image_id": 7, "category_id": 18}, {"image_id": 8, "category_id": 3}],
    }
    captions = {"annotations": [{"image_id": 7, "caption": "A woman with her puppy."}]}
    assert coco_ground_truth(instances, captions) == {7: {"dog", "person"}, 8: {"car"}}


def test_amber_discriminative_by_hand():
    records = [
        ("discriminative-hallucination", "no", "No"),
        ("discriminative-hallucination", "yes", "Yes"),
        ("discriminative-hallucination", "no", "Yes"),
        ("discriminative-attribute-state", "no", "No"),
        ("discriminative-attribute-number", "yes", "No"),
        ("discriminative-relation", "yes", "Yes."),  # not exactly "Yes": wrong, as in AMBER's script
    ]
    m = amber_discriminative(records)
    # Counts start at 0.001 (data/metrics.txt). existence: accuracy 2/3.001 = 66.64 -> 66.6; precision (said
    # "No" and right) 1/1.001 = 99.9; recall (truth "no" found) 1/2.001 = 49.98 -> 50.0;
    # F1 = 2 * .999 * .5 / (.999 + .5 + 0.001) = .666 -> 66.6.
    assert m["existence"] == {"n": 3, "accuracy": 66.6, "precision": 99.9, "recall": 50.0, "f1": 66.6}
    # attribute = state + number counters, each starting at 0.001: accuracy 1/2.003 = 49.9; precision
    # 1/2.003 = 49.9; recall 1/1.003 = 99.7; F1 = 2 * .499 * .997 / (.499 + .997 + .0001) = .66506 -> 66.5.
    assert m["attribute"] == {"n": 2, "accuracy": 49.9, "precision": 49.9, "recall": 99.7, "f1": 66.5}
    # state alone: 1/1.001 = 99.9 each; F1 = 2 * .999^2 / (1.998 + .0001) = .99895 -> 99.9
    assert m["state"] == {"n": 1, "accuracy": 99.9, "precision": 99.9, "recall": 99.9, "f1": 99.9}
    assert m["number"] == {"n": 1, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    # nothing said "No" and no "no" truth: 0 / 0.001 = 0.0, as the script (no division by zero)
    assert m["relation"] == {"n": 1, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    # all: 3 of 6 right -> 3/6.001 = 49.99 -> 50.0; precision 2/3.001 = 66.6; recall 2/3.001 = 66.6;
    # F1 = 2 * .666^2 / (1.332 + .0001) = .66595 -> 66.6
    assert m["all"] == {"n": 6, "accuracy": 50.0, "precision": 66.6, "recall": 66.6, "f1": 66.6}
    assert list(m) == ["existence", "attribute", "state", "number", "relation", "all"]  # no action question: no action


def test_amber_attribute_sums_three_counters_that_each_start_at_0001():
    records = [("discriminative-attribute-state", "no", "No"), ("discriminative-attribute-number", "no", "No"), ("discriminative-attribute-action", "no", "No")]
    m = amber_discriminative(records)
    assert m["attribute"]["accuracy"] == 99.9  # 3 / (3 + 3 * 0.001) = 99.90
    assert m["all"]["accuracy"] == 100.0  # 3 / 3.001 = 99.97
    assert m["action"] == {"n": 1, "accuracy": 99.9, "precision": 99.9, "recall": 99.9, "f1": 99.9}


def test_amber_response_normalizes_free_text():
    assert [amber_response(a) for a in ("Yes.", "No, there is not.", "I cannot tell", "yes, no")] == ["Yes", "No", "Yes", "No"]


def test_amber_generative_by_hand():
    resources = AmberResources(
        association={"dog": ["puppy"], "cat": ["kitten"], "car": [], "tree": [], "sky": []}, safe_words=frozenset({"sky"})
    )
    records = [
        # puppy covers dog, tree covered, car hallucinated (and a hallucination target hit), sky is safe
        ("A puppy and a car near a tree under the sky.", ["dog", "tree"], ["car", "cat"]),
        ("A kitten.", ["cat"], ["dog"]),  # kitten covers cat
    ]
    m = amber_generative(records, resources)
    # CHAIR: 1 flagged of 5 candidate nouns (puppy, car, tree, sky, kitten): a safe word is skipped but
    # still counted, as the script's len(safe_flag_list): 1/5.001 = 20.0. Cover 3/3.001 = 99.97 -> 100.0;
    # Hal 100 - 1/2.001 * 100 = 50.02 -> 50.0; Cog 1/3.001 = 33.3.
    assert m.pop("per_response") == [{"nouns": ["puppy", "car", "tree", "sky"], "hallucinated": ["car"]}, {"nouns": ["kitten"], "hallucinated": []}]
    assert m == {"n": 2, "chair": 20.0, "cover": 100.0, "hal": 50.0, "cog": 33.3}


def test_amber_generative_similarity_fallback():
    resources = AmberResources(association={"dog": [], "cat": [], "puppy": []}, safe_words=frozenset())
    records = [("A puppy.", ["dog"], ["cat"])]
    assert amber_generative(records, resources)["chair"] == 99.9  # 1 / 1.001
    similar = lambda a, b: {a, b} == {"puppy", "dog"}  # noqa: E731 (stands in for spaCy similarity > 0.8)
    m = amber_generative(records, resources, similar=similar)
    assert m["chair"] == 0.0 and m["cover"] == 99.9


def test_amber_nouns_keep_case_and_hyphenated_words():
    # NLTK keeps "e-book" one token and WordNet does not lowercase: "Dogs" -> "Dog" is no AMBER word
    assert amber_nouns("Dogs and an e-book; two dogs, one TV.", {"dog", "e-book", "book", "TV"}) == ["e-book", "dog", "TV"]
