"""The AMBER runner without a model: AMBER's file layout checked with the file and line named, prompt rows
of both tasks, scoring of answers against hand-computed numbers, the optional NLTK / spaCy scorers, the
comparison table and the evaluate command's errors before Ray starts."""

from __future__ import annotations

import json
import sys
import types

import pytest
from synthalign_ray.config import ConfigError
from synthalign_ray.evaluate import amber
from synthalign_ray.evaluate.common import BenchmarkFileError, read_json_list
from synthalign_ray.evaluate.fixture import IMAGES, write_amber_fixture
from synthalign_ray.evaluate.pope import LLAVA_POPE_SUFFIX
from synthalign_ray.evaluate.runner import ModelUnderTest, benchmark_list, comparison_table, headline, load_eval_config, summary_line
from tests.unit.test_eval_chair_mmhal import evaluate_cli


def _config(data, **overrides) -> amber.AmberConfig:
    return amber.AmberConfig(data_dir=str(data), image_dir=str(data.parent.parent / "images"), **overrides)


def test_fixture_queries_become_prompt_rows(tmp_path):
    data = write_amber_fixture(tmp_path)
    rows, resources = amber.load_queries(_config(data), yes_no_max_tokens=8)
    # 4 generative (one per image) + per image 2 existence, 2 state, 1 number + 2 relation (two-object images)
    assert len(rows) == 4 + 4 * 5 + 2
    assert [row["amber_id"] for row in rows] == list(range(1, 27)) and [row["id"] for row in rows][:2] == ["amber/1", "amber/2"]
    generative, first_question = rows[0], rows[4]
    assert generative["task"] == "generative" and generative["prompt"] == "Describe this image." and generative["max_tokens"] == 512
    assert generative["truth"] == list(IMAGES[generative["image_file"]]) and generative["image_uri"] == str(tmp_path / "images" / "shapes_0.png")
    assert first_question["prompt"] == "Is there a ball in this image?" + LLAVA_POPE_SUFFIX and first_question["max_tokens"] == 8
    assert {row["dimension"] for row in rows} == {"generative", "existence", "attribute", "relation"}
    assert resources.association["box"] == ["square", "cube"] and resources.safe_words == {"shape"}

    limited, _ = amber.load_queries(_config(data, limit=2), yes_no_max_tokens=8)
    assert [(row["task"], row["amber_id"]) for row in limited] == [("generative", 1), ("generative", 2), ("discriminative", 5), ("discriminative", 6)]


def test_discriminative_queries_alone_need_no_word_files(tmp_path):
    data = write_amber_fixture(tmp_path)
    queries = json.loads((data / "query" / "query_all.json").read_text())
    (data / "query" / "query_discriminative.json").write_text(json.dumps(queries[4:], indent=4))
    (data / "relation.json").unlink()
    cfg = _config(data, query_file=str(data / "query" / "query_discriminative.json"))
    rows, resources = amber.load_queries(cfg, 8)
    assert len(rows) == 22 and resources is None


def test_files_default_to_amber_data_folder_and_can_be_named_alone(tmp_path):
    cfg = amber.AmberConfig(data_dir="d", image_dir="i", relation_file="r.json")
    assert [cfg.file(name) for name in amber.DATA_FILES] == ["d/query/query_all.json", "d/annotations.json", "r.json", "d/safe_words.txt"]
    with pytest.raises(ValueError, match="set data_dir"):
        amber.AmberConfig(image_dir="i", query_file="q.json")


def test_json_list_records_know_their_line(tmp_path):
    path = tmp_path / "list.json"
    path.write_text('[\n    {\n        "id": 1\n    },\n    {"id": 2}, 3\n]\n')
    assert read_json_list(str(path), "test") == [(2, {"id": 1}), (5, {"id": 2}), (5, 3)]


# Files written with indent=4: "[" on line 1, then each flat 3-field record over 5 lines (2-6, 7-11, ...).
QUERIES = [{"id": 1, "image": "shapes_0.png", "query": "Describe this image."}, {"id": 2, "image": "shapes_1.png", "query": "Is there a box?"}]
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["ball"], "hallu": ["kite"]},  # lines 2-11 (lists open over lines)
    {"id": 2, "type": "discriminative-hallucination", "truth": "yes"},  # lines 12-16
]


@pytest.mark.parametrize(
    ("queries", "annotations", "message"),
    [
        ([*QUERIES[:1], {"id": 2, "image": "shapes_1.png"}], ANNOTATIONS, r"query_all.json:7: missing field\(s\) \['query'\]"),
        ([*QUERIES[:1], {**QUERIES[1], "id": "2"}], ANNOTATIONS, r"query_all.json:7: id '2' is not an integer"),
        ([*QUERIES[:1], {**QUERIES[1], "id": 1}], ANNOTATIONS, r"query_all.json:7: id 1 repeats line 2"),
        ([*QUERIES[:1], {**QUERIES[1], "query": " "}], ANNOTATIONS, r"query_all.json:7: empty query"),
        ([*QUERIES[:1], {**QUERIES[1], "image": "missing.jpg"}], ANNOTATIONS, r"query_all.json:7: image 'missing.jpg' not found in amber.image_dir"),
        ([*QUERIES, {"id": 3, "image": "shapes_0.png", "query": "Is it?"}], ANNOTATIONS, r"query_all.json:12: query id 3 has no annotation in .*annotations.json"),
        (QUERIES, [ANNOTATIONS[0], {**ANNOTATIONS[1], "truth": "maybe"}], r"annotations.json:12: truth 'maybe' is not 'yes' or 'no'"),
        (QUERIES, [ANNOTATIONS[0], {**ANNOTATIONS[1], "type": "discriminative-colour"}], r"annotations.json:12: type 'discriminative-colour' is not one of"),
        (QUERIES, [{**ANNOTATIONS[0], "hallu": "kite"}, ANNOTATIONS[1]], r"annotations.json:2: `hallu` of a generative annotation must be a list"),
        (QUERIES, [ANNOTATIONS[0], {"id": 2, "type": "discriminative-hallucination"}], r"annotations.json:12: missing field\(s\) \['truth'\]"),
        (QUERIES, [ANNOTATIONS[0], {**ANNOTATIONS[1], "id": 1}], r"annotations.json:12: id 1 repeats line 2"),
        (QUERIES, [{**ANNOTATIONS[0], "hallu": ["kite", "dragon"]}, ANNOTATIONS[1]], r"annotations.json:2: id 1: object\(s\) \['dragon'\] not in .*relation.json"),
        ({"id": 1}, ANNOTATIONS, r"query_all.json: expected a JSON list of AMBER query records, got dict"),
        ([1], ANNOTATIONS, r"query_all.json:2: expected a JSON object, got int"),
    ],
)
def test_malformed_amber_files_name_file_and_line(tmp_path, queries, annotations, message):
    data = write_amber_fixture(tmp_path)
    (data / "query" / "query_all.json").write_text(json.dumps(queries, indent=4))
    (data / "annotations.json").write_text(json.dumps(annotations, indent=4))
    with pytest.raises(BenchmarkFileError, match=message):
        amber.load_queries(_config(data), 8)


def test_missing_and_broken_word_files(tmp_path):
    data = write_amber_fixture(tmp_path)
    (data / "safe_words.txt").unlink()
    with pytest.raises(BenchmarkFileError, match=r"safe_words.txt: cannot read AMBER safe words"):
        amber.load_queries(_config(data), 8)
    (data / "relation.json").write_text('{"ball": "circle"}')
    with pytest.raises(BenchmarkFileError, match=r"relation.json: associated words of 'ball' must be a list of strings"):
        amber.load_queries(_config(data), 8)
    (data / "annotations.json").write_text('[\n{"id": 1,\n"type": }]')
    with pytest.raises(BenchmarkFileError, match=r"annotations.json:3: AMBER annotation is not valid JSON"):
        amber.load_queries(_config(data), 8)


def test_score_by_hand(tmp_path):
    data = write_amber_fixture(tmp_path)
    rows, resources = amber.load_queries(_config(data), 8)
    answers = {
        row["id"]: {"answer": "A red ball and a square box." if row["task"] == "generative" else "Yes.", "finish_reason": "stop"}
        for row in rows
    }
    answers["amber/6"]["answer"] = "No, there is not."  # "Is there a box" in shapes_0 (truth no): right
    table, scores = amber.score(rows, answers, resources)
    # Nouns of every description: ball, square (box's associated word), box; "red" is no AMBER word.
    # shapes_0 (truth ball; hallu box, kite): square, box flagged 2/3; Cover 1/1; Cog box 1/2.
    # shapes_1 (box, kite; ball): ball flagged 1/3; Cover box 1/2; Cog 1/1.
    # shapes_2 (ball, box; kite): 0/3, clean; Cover 2/2; Cog 0/1.  shapes_3 (kite; ball, box): 3/3; 0/1; 2/2.
    # CHAIR 6/12.001 = 50.0; Cover 4/6.001 = 66.7; Hal 100 - 1/4.001 * 100 = 75.0; Cog 4/6.001 = 66.7
    assert scores["generative"] == {"n": 4, "chair": 50.0, "cover": 66.7, "hal": 75.0, "cog": 66.7}
    # existence: 8 questions, 4 truth no; all "Yes" but one right "No": accuracy 5/8.001 = 62.5;
    # precision 1/1.001 = 99.9; recall 1/4.001 = 25.0; F1 = 2 * .999 * .25 / (1.249 + .001) = .3996 -> 40.0
    assert scores["discriminative"]["existence"] == {"n": 8, "accuracy": 62.5, "precision": 99.9, "recall": 25.0, "f1": 40.0}
    # relation: both truth "no", both answered "Yes": 0 right
    assert scores["discriminative"]["relation"] == {"n": 2, "accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
    # all 22: right = 4 existence yes + 1 existence no + 4 state yes + 4 number yes = 13 -> 13/22.001 = 59.1
    assert scores["discriminative"]["all"]["accuracy"] == 59.1 and scores["discriminative"]["attribute"]["n"] == 12

    predictions = table.to_pylist()
    assert len(predictions) == 26 and [row["amber_id"] for row in predictions] == list(range(1, 27))
    assert predictions[0] == {
        "amber_id": 1, "task": "generative", "type": "generative", "dimension": "generative", "image_file": "shapes_0.png",
        "query": "Describe this image.", "answer": "A red ball and a square box.", "finish_reason": "stop",
        "truth": None, "response": None, "correct": None, "truth_objects": ["ball"], "hallu_objects": ["box", "kite"],
        "nouns": ["ball", "square", "box"], "hallucinated": ["square", "box"],
    }  # fmt: skip
    assert {k: predictions[5][k] for k in ("dimension", "truth", "response", "correct", "nouns")} == {
        "dimension": "existence", "truth": "no", "response": "No", "correct": True, "nouns": None
    }  # fmt: skip
    assert amber.headline(scores) == {"chair": 50.0, "cover": 66.7, "hal": 75.0, "cog": 66.7, "accuracy": 59.1, "f1": scores["discriminative"]["all"]["f1"]}


def test_nltk_scorer_is_amber_extract_nouns(monkeypatch):
    nltk = types.ModuleType("nltk")
    stem = types.ModuleType("nltk.stem")
    nltk.word_tokenize = lambda text: text.rstrip(".").split()
    nltk.pos_tag = lambda tokens: [(t, "NNS" if t.endswith("s") else "NN" if t[0].islower() else "DT") for t in tokens]
    stem.WordNetLemmatizer = lambda: types.SimpleNamespace(lemmatize=lambda word: word.removesuffix("s"))
    nltk.stem = stem
    monkeypatch.setitem(sys.modules, "nltk", nltk)
    monkeypatch.setitem(sys.modules, "nltk.stem", stem)
    nouns, similar = amber.scorers(amber.AmberConfig(data_dir="d", image_dir="i", nouns="nltk"))
    assert nouns("The dogs bark.") == ["dog", "bark"] and similar is None  # only NN* words, lemmatized

    def missing_data(text):
        raise LookupError("\n****\n  Resource punkt_tab not found.\n  Please use the NLTK Downloader\n")

    nltk.word_tokenize = missing_data
    with pytest.raises(ConfigError, match=r"amber.nouns: nltk: NLTK's data is missing \(Resource punkt_tab not found.\)"):
        amber.scorers(amber.AmberConfig(data_dir="d", image_dir="i", nouns="nltk"))
    monkeypatch.setitem(sys.modules, "nltk", None)
    with pytest.raises(ConfigError, match="amber.nouns: nltk needs the nltk package"):
        amber.scorers(amber.AmberConfig(data_dir="d", image_dir="i", nouns="nltk"))


def test_spacy_scorer_is_amber_similarity(monkeypatch):
    vectors = {"puppy": 1.0, "dog": 0.85, "cat": 0.1}
    spacy = types.ModuleType("spacy")

    def load(name):
        if name != "en_core_web_lg":
            raise OSError(f"[E050] Can't find model '{name}'")
        return lambda word: types.SimpleNamespace(similarity=lambda other, w=word: 1 - abs(vectors[w] - vectors[other.word]), word=word)

    spacy.load = load
    monkeypatch.setitem(sys.modules, "spacy", spacy)
    nouns, similar = amber.scorers(amber.AmberConfig(data_dir="d", image_dir="i", spacy_model="en_core_web_lg"))
    assert nouns is None and similar("puppy", "dog") and not similar("puppy", "cat")  # 0.85 > 0.8, 0.1 not
    with pytest.raises(ConfigError, match=r"amber.spacy_model: cannot load spaCy model 'en_core_web_sm' \(\[E050\]"):
        amber.scorers(amber.AmberConfig(data_dir="d", image_dir="i", spacy_model="en_core_web_sm"))


# --- the runner ----------------------------------------------------------------------------------------


def test_benchmark_list_knows_amber():
    assert benchmark_list("amber,pope") == ["amber", "pope"]
    with pytest.raises(ConfigError, match="runnable benchmarks are pope, chair, mmhal, amber"):
        benchmark_list("amber,halbench")


def _scores(chair, existence_f1):
    disc = {"n": 4, "accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": existence_f1}
    return {"generative": {"n": 2, "chair": chair, "cover": 60.0, "hal": 50.0, "cog": 10.0}, "discriminative": {"existence": disc, "state": disc, "all": disc}}


def test_comparison_table_and_summary_with_amber():
    models = [ModelUnderTest("base", "llava"), ModelUnderTest("trained", "llava", "runs/dpo/adapter")]
    table = comparison_table({"base": {"amber": _scores(20.5, 66.6)}, "trained": {"amber": _scores(10.0, 70.0)}}, models)
    assert "| amber | generative | chair | 20.5 | 10.0 | -10.5 |" in table
    assert "| amber | existence | f1 | 66.6 | 70.0 | +3.4 |" in table
    assert "| amber | all | accuracy | 50.0 | 50.0 | +0.0 |" in table
    assert "| amber | state |" not in table  # the sub-dimensions are in amber.json only
    assert len([line for line in table.splitlines() if line.startswith("| amber |")]) == 4 + 2 * 4
    summary = {"results": {"base": {"amber": headline("amber", _scores(20.5, 66.6))}}}
    assert summary_line(summary) == "base amber CHAIR 20.5 Cover 60.0 Hal 50.0 Cog 10.0 F1 66.6"
    assert summary_line({"results": {"base": {"amber": headline("amber", {})}}}) == "base amber CHAIR n/a Cover n/a Hal n/a Cog n/a F1 n/a"


def test_eval_config_amber_paths_relative_to_the_config(tmp_path):
    write_amber_fixture(tmp_path / "bench")
    config = tmp_path / "eval.yaml"
    config.write_text("amber: {data_dir: bench/amber/data, image_dir: bench/images, safe_words_file: bench/amber/data/safe_words.txt}\n")
    cfg = load_eval_config(str(config))
    assert cfg.amber.data_dir == str(tmp_path / "bench" / "amber" / "data") and cfg.amber.image_dir == str(tmp_path / "bench" / "images")
    assert cfg.amber.safe_words_file == str(tmp_path / "bench" / "amber" / "data" / "safe_words.txt") and cfg.amber.query_file is None


def test_cli_reports_a_malformed_amber_file_before_ray(tmp_path):
    data = write_amber_fixture(tmp_path)
    annotations = json.loads((data / "annotations.json").read_text())
    annotations[4]["truth"] = "Yes"
    (data / "annotations.json").write_text(json.dumps(annotations, indent=4))
    result = evaluate_cli(tmp_path, "amber", data_dir=str(data), image_dir=str(tmp_path / "images"))
    # four generative records of 12-16 lines ("[" + 4 x (id, type, truth list, hallu list)), then line by line
    line = 1 + sum(len(json.dumps(a, indent=4).splitlines()) for a in annotations[:4]) + 1
    assert f"annotations.json:{line}: truth 'Yes' is not 'yes' or 'no'" in result.output
