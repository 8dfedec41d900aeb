"""`synthalign report` on a run folder written by the real stages and the real datasink (no models, no Ray).

Rows go through ImageSelector and PairBuilder (the pipeline's pure stages) and StatusSplitDatasink.write,
so the shards in pairs/, dropped/ and failed/ have exactly the generation's schemas; the manifest
counts come from accounting.accounting. The test then recomputes the report's numbers straight from the
Parquet, with its own code, and compares them with stats.json; checks the card, the plots (valid PNGs)
and the page's embedded sample.
"""

import json
import math
import re
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from synthalign_ray import store
from synthalign_ray.cli import app
from synthalign_ray.ids import IdSet
from synthalign_ray.accounting import accounting
from synthalign_ray.stages.image_scores import ImageSelector
from synthalign_ray.stages.pairs import PairBuilder, PairsConfig
from synthalign_ray.stages.prompts import PromptCheck, prompts_table

RESPONSE_TYPE = pa.struct([("model", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()), ("error", pa.string())])
SCALES = [5.0, 7.0, 9.0, 11.0]
CATEGORIES = ["animals", "city", "food"]
MODELS = ["llava-1.5", "llava-next", "internvl"]
N_ROWS = 30
TIE_ROW, SAME_TEXT_ROW, FAILED_ROW = 7, 11, 19
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _answer(rng, i, k):
    words = "a small brown dog sits on green grass beside a red bicycle under a tall tree at noon".split()
    n = int(rng.integers(1, len(words)))
    return " ".join(words[(k + i) % 3 : (k + i) % 3 + n]) or "dog"


def build_rows(n: int) -> tuple[pa.Table, list[dict]]:
    rng = np.random.default_rng(0)
    prompts = [
        {"id": f"p{i:03d}", "category": CATEGORIES[i % 3], "t2i_prompt": f"prompt {i}", "seed": i, "source_line": i + 1}
        for i in range(n)
    ]
    table = prompts_table(prompts)
    candidates = [
        [store.encode_image(Image.new("RGB", (32, 24), (int(c), 40 * k, 90))) for k, c in enumerate(rng.integers(0, 255, 4))]
        for _ in range(n)
    ]
    image_scores = [list(rng.normal(size=4)) for _ in range(n)]
    image_scores[FAILED_ROW] = [float("nan")] * 4  # no finite score: ImageSelector fails the row
    table = table.append_column(pa.field("guidance_scales", pa.list_(pa.float32())), pa.array([SCALES] * n, pa.list_(pa.float32())))
    table = table.append_column(pa.field("candidate_images", pa.list_(store.IMAGE_TYPE)), pa.array(candidates, pa.list_(store.IMAGE_TYPE)))
    for column, values in (
        ("image_scores", image_scores),
        ("clip_scores", [list(rng.normal(size=4)) for _ in range(n)]),
        ("blip_scores", [list(rng.normal(size=4)) for _ in range(n)]),
    ):
        table = table.append_column(pa.field(column, pa.list_(pa.float32())), pa.array(values, pa.list_(pa.float32())))
    table = ImageSelector()(table)
    instructions = ["Describe this image in detail.", "Why is the dog sitting there?", "What mood does the scene convey?"]
    table = table.append_column("instruction", pa.array([instructions[i % 3] for i in range(n)]))
    responses, scores = [], []
    for i in range(n):
        if i == FAILED_ROW:  # later stages skip a failed row: nulls, as in a real run
            responses.append(None)
            scores.append(None)
            continue
        texts = [_answer(rng, i, k) for k in range(3)]
        row_scores = list(rng.normal(size=3))
        if i == TIE_ROW:
            row_scores = [0.5, 0.5, 0.5]
        if i == SAME_TEXT_ROW:
            texts = ["the same answer"] * 3
        responses.append([{"model": m, "text": t, "finish_reason": "stop", "error": None} for m, t in zip(MODELS, texts)])
        scores.append(row_scores)
    table = table.append_column("responses", pa.array(responses, pa.list_(RESPONSE_TYPE)))
    table = table.append_column("response_scores", pa.array(scores, pa.list_(pa.float32())))
    return PairBuilder(PairsConfig())(table), prompts


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("report") / "run")
    table, prompts = build_rows(N_ROWS)
    sink = store.StatusSplitDatasink(run)
    # two blocks -> several shards per folder, as a real run writes them
    sink.write([table.slice(0, 17), table.slice(17)], SimpleNamespace(task_idx=0))
    ids = [row["id"] for row in prompts]
    check = PromptCheck(bad=[], ids=IdSet.of(ids), duplicate_lines=set(), last_line=len(ids))
    counts = accounting(run, check, store.output_counts(run, check.ids), this_run=store.empty_counts(), input_ids=ids)
    store.write_json(store.join(run, store.MANIFEST), {"counts": counts, "models": {"images.model": "zoo:diffusion"},
                                                      "config": {"seed": 0}, "versions": {"ray": "2.60.0"}, "complete": True})  # fmt: skip
    return run


@pytest.fixture(scope="module")
def report(run_folder):
    result = CliRunner().invoke(app, ["report", run_folder, "--license", "cc-by-4.0", "--sample-size", "12"])
    assert result.exit_code == 0, result.output
    out = store.join(run_folder, "report")
    return out, json.loads(open(f"{out}/stats.json").read())


def read_folder(run, folder) -> pa.Table:
    shards = store.list_shards(store.join(run, folder))
    return pa.concat_tables([pq.read_table(s) for s in shards]) if shards else None


def test_the_fixture_has_every_outcome(run_folder):
    assert len(store.list_shards(store.join(run_folder, "pairs"))) == 2
    dropped = read_folder(run_folder, "dropped").column("drop_reason").to_pylist()
    assert sorted(dropped) == ["same_text", "tie"]
    assert read_folder(run_folder, "failed").column("failed_stage").to_pylist() == ["select_image"]


def test_stats_equal_counts_recomputed_from_the_parquet(run_folder, report):
    _, stats = report
    pairs, dropped, failed = (read_folder(run_folder, f) for f in ("pairs", "dropped", "failed"))
    assert stats["rows"]["pairs"] == pairs.num_rows == N_ROWS - 3
    assert stats["rows"]["dropped"] == dropped.num_rows and stats["rows"]["failed"] == failed.num_rows
    assert stats["rows"]["dropped_by_reason"] == {"same_text": 1, "tie": 1}
    assert stats["rows"]["failed_by_stage"] == {"select_image": 1}
    assert stats["manifest"]["counts_mismatch"] is None
    assert stats["size_category"] == "n<1K"

    # guidance shares over rows with a kept image: pairs + dropped
    selected = pa.concat_tables([pairs.select(["guidance_scales", "image_index"]), dropped.select(["guidance_scales", "image_index"])])
    kept = [f"{s[i]:g}" for s, i in zip(selected.column("guidance_scales").to_pylist(), selected.column("image_index").to_pylist())]
    assert stats["guidance"]["selected"] == {s: kept.count(s) for s in ["5", "7", "9", "11"]}
    assert sum(stats["guidance"]["share"].values()) == pytest.approx(1.0)

    # top-1 agreement of ImageReward and CLIP, with numpy's argmax (first index on ties)
    both = pa.concat_tables([pairs.select(["image_scores", "clip_scores"]), dropped.select(["image_scores", "clip_scores"])])
    same = [int(np.argmax(a) == np.argmax(b)) for a, b in zip(both.column("image_scores").to_pylist(), both.column("clip_scores").to_pylist())]
    agreement = stats["scorer_agreement"]
    assert agreement["rows"] == len(same) and agreement["rows_without_all_scorers"] == 0
    assert agreement["pairs"]["ImageReward & CLIP"]["top1"]["percent"] == pytest.approx(100 * sum(same) / len(same))

    # pairs: margins, model matrix, lengths
    margins = np.array(pairs.column("margin").to_pylist())
    assert stats["margins"]["count"] == len(margins)
    assert stats["margins"]["mean"] == pytest.approx(margins.mean(), rel=1e-6)
    assert stats["margins"]["max"] == pytest.approx(margins.max(), rel=1e-6)
    chosen, rejected = pairs.column("chosen_model").to_pylist(), pairs.column("rejected_model").to_pylist()
    matrix = stats["models"]["matrix"]
    for c in MODELS:
        for r in MODELS:
            assert matrix[c][r] == sum(1 for a, b in zip(chosen, rejected) if (a, b) == (c, r))
    assert stats["models"]["answers"] == {m: N_ROWS - 1 for m in MODELS}  # the failed row never got answers
    chosen_words = [len(re.findall(r"\w+", t)) for t in pairs.column("chosen_text").to_pylist()]
    assert stats["response_words"]["chosen"]["median"] == pytest.approx(float(np.median(chosen_words)))

    # instruction classes: the fixture cycles describe / why / mood with the category
    classes = stats["instruction_classes"]["by_category"]
    for category, expected in zip(CATEGORIES, ["direct visual description", "commonsense", "interpretive"]):
        n = pc.sum(pc.equal(pairs.column("category"), category)).as_py()
        assert classes[category][expected] == n
    assert sum(stats["hard_negatives"]["counts"].values()) == pairs.num_rows


def test_card_renders_with_the_stats_numbers(report):
    out, stats = report
    text = open(f"{out}/README.md").read()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["license"] == "cc-by-4.0"
    assert meta["dataset_info"]["splits"][0]["num_examples"] == stats["rows"]["pairs"]
    feature_names = [f["name"] for f in meta["dataset_info"]["features"]]
    assert {"images", "prompt", "chosen", "rejected", "margin"} <= set(feature_names)
    assert f"| pairs (train split) | {stats['rows']['pairs']} |" in text
    assert "| tie | 1 |" in text and "| select_image | 1 |" in text
    ir_clip = stats["scorer_agreement"]["pairs"]["ImageReward & CLIP"]["top1"]
    assert f"| ImageReward & CLIP | {ir_clip['percent']:.1f} ({ir_clip['chance_percent']:.1f})" in text
    for plot in stats["plots"]:
        assert f"]({plot})" in text


def test_every_plot_is_a_valid_png(report):
    out, stats = report
    assert len(stats["plots"]) == 8
    for plot in stats["plots"]:
        data = open(f"{out}/{plot}", "rb").read()
        assert data.startswith(PNG_SIGNATURE), plot
        with Image.open(f"{out}/{plot}") as image:
            image.verify()
        with Image.open(f"{out}/{plot}") as image:
            assert image.width > 300 and image.height > 200


def test_index_html_embeds_the_sample_and_its_images_exist(run_folder, report):
    out, stats = report
    page = open(f"{out}/index.html").read()
    data = json.loads(re.search(r'<script type="application/json" id="pairs-data">(.*?)</script>', page, re.S).group(1))
    assert len(data) == stats["sample_size"] == 12
    pair_ids = set(read_folder(run_folder, "pairs").column("id").to_pylist())
    for pair in data:
        assert pair["id"] in pair_ids
        assert Image.open(f"{out}/{pair['image']}").format == "JPEG"
        assert len(pair["candidates"]) == 4 and sum(c["kept"] for c in pair["candidates"]) == 1
        assert all(math.isfinite(c["clip_score"]) for c in pair["candidates"])
    assert "plots/guidance_selection.png" in page


def test_a_folder_without_shards_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2
    assert "no Parquet shards" in result.output


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    pytest.skip("no headless Chromium on the PATH (bash scripts/install.sh --test installs Debian's chromium)")


def test_page_filters_in_headless_chromium(report, tmp_path):
    """Open index.html from disk with a filter in the URL; the page's script must show exactly the matching pairs."""
    import subprocess

    out, stats = report
    page = open(f"{out}/index.html").read()
    sample = json.loads(re.search(r'<script type="application/json" id="pairs-data">(.*?)</script>', page, re.S).group(1))
    category, model = "animals", "internvl"
    expected = [p["id"] for p in sample if p["category"] == category and model in (p["chosen"]["model"], p["rejected"]["model"])]
    assert 0 < len(expected) < len(sample)  # the filter must narrow the sample, or the test proves nothing
    url = f"file://{out}/index.html#category={category}&model={model}"
    browser = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,1400"]

    dom = subprocess.run([*browser, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    shown = re.findall(r'<div class="pair" data-id="([^"]+)" data-category="([^"]+)"', dom)
    assert [row_id for row_id, _ in shown] == expected
    assert {c for _, c in shown} == {category}
    assert f"showing {len(expected)} of {len(sample)} sampled pairs" in dom
    assert re.search(r'<section id="card"[^>]*hidden', dom)  # the filtered view shows the pairs, not the card

    shot = tmp_path / "pairs.png"
    subprocess.run([*browser, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("L"), dtype=float)
    assert image.size == (1200, 1400)
    assert pixels.std() > 20  # not a blank page: text, images and coloured answer boxes
