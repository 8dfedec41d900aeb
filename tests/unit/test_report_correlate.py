"""`synthalign correlate` on hand-made stats.json / evaluation.json files (synthalign_ray/report/correlate.py)."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from synthalign_ray.cli import app
from synthalign_ray.config import ConfigError
from synthalign_ray.report.correlate import bootstrap_interval, caveat, correlate, correlation
from synthalign_ray.report.stats import pearson


def test_correlation_of_a_perfect_line_and_its_interval():
    x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    result = correlation(x, [2 * v + 1 for v in x], resamples=500, seed=0)
    assert result["pearson"]["value"] == pytest.approx(1.0)
    assert result["spearman"]["value"] == pytest.approx(1.0)
    # every resample with two distinct points is a perfect line too; one with a single repeated point has no r
    assert result["pearson"]["ci95"] == pytest.approx([1.0, 1.0])
    assert 0 < result["pearson"]["defined_resamples"] <= 500
    assert result["n"] == 6 and "small sample" in result["caveat"]


def test_correlation_needs_three_points_and_variation():
    assert correlation([1.0, 2.0], [3.0, 4.0], resamples=100, seed=0)["pearson"]["value"] is None
    flat = correlation([1.0, 2.0, 3.0], [5.0, 5.0, 5.0], resamples=100, seed=0)
    assert flat["pearson"]["value"] is None and flat["pearson"]["ci95"] == [None, None]


def test_bootstrap_interval_contains_the_estimate_and_is_reproducible():
    x = [0.1, 0.4, 0.35, 0.8, 0.7, 0.2, 0.9, 0.5]
    y = [0.2, 0.5, 0.3, 0.9, 0.6, 0.1, 0.7, 0.6]
    low, high, defined = bootstrap_interval(x, y, pearson, resamples=1000, seed=1)
    assert low <= pearson(x, y) <= high <= 1.0 and defined == 1000
    assert bootstrap_interval(x, y, pearson, resamples=1000, seed=1) == (low, high, defined)


@pytest.mark.parametrize("n, words", [(2, "no correlation"), (4, "anecdotal"), (10, "small sample"), (20, "moderate"), (40, "n=40")])
def test_caveat_by_sample_size(n, words):
    assert words in caveat(n)


def _stats(pairs, margin):
    return {
        "rows": {"pairs": pairs, "dropped": 1, "total": pairs + 1},
        "image_scores": {"selected": {"mean": 1.0}, "selected_clip": {"mean": 0.3}},
        "scorer_agreement": {"pairs": {}},
        "margins": {"mean": margin, "median": margin},
        "response_words": {"chosen": {"mean": 12.0}},
        "chosen_longer_share": 0.5,
        "hard_negatives": {"easy": pairs // 2},
    }


@pytest.fixture
def runs_yaml(tmp_path):
    runs = []
    for i, (pairs, margin, f1) in enumerate([(100, 0.1, 0.70), (200, 0.3, 0.72), (400, 0.2, 0.75), (800, 0.4, 0.80)]):
        (tmp_path / f"r{i}").mkdir()
        (tmp_path / f"r{i}" / "stats.json").write_text(json.dumps(_stats(pairs, margin)))
        (tmp_path / f"e{i}.json").write_text(json.dumps({"results": {"base": {"pope": {"f1": 0.6}}, "trained": {"pope": {"f1": f1}}}}))
        runs.append({"name": f"run{i}", "stats": f"r{i}", "evaluation": f"e{i}.json"})
    path = tmp_path / "runs.yaml"
    path.write_text(yaml.safe_dump({"runs": runs, "dataset": ["pairs", "mean_margin", "ir_clip_top1_agreement"], "bootstrap": 200}))
    return path


def test_correlate_reads_runs_relative_to_the_yaml(runs_yaml):
    result = correlate(str(runs_yaml))
    assert result["runs"]["run2"] == {"pairs": 400, "mean_margin": 0.2, "ir_clip_top1_agreement": None, "pope.f1": 0.75}
    by_pairs = result["correlations"]["pairs"]["pope.f1"]
    assert by_pairs["spearman"]["value"] == pytest.approx(1.0)  # f1 rises with every doubling
    assert by_pairs["pearson"]["value"] == pytest.approx(pearson([100, 200, 400, 800], [0.70, 0.72, 0.75, 0.80]))
    assert "anecdotal" in by_pairs["caveat"]
    # margin order 0.1, 0.3, 0.2, 0.4 against f1 ranks 1..4: rho = 1 - 6 * 2 / 60
    assert result["correlations"]["mean_margin"]["pope.f1"]["spearman"]["value"] == pytest.approx(0.8)
    missing = result["correlations"]["ir_clip_top1_agreement"]["pope.f1"]
    assert missing["n"] == 0 and missing["runs_without_metric"] == 4 and missing["pearson"]["value"] is None


def test_cli_writes_outputs_and_names_a_bad_metric(runs_yaml, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["correlate", str(runs_yaml), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "correlations.md").read_text().count("| pairs | pope.f1 | 4 |") == 1
    assert (out / "plots" / "pairs__pope.f1.png").read_bytes().startswith(b"\x89PNG")
    bad = CliRunner().invoke(app, ["correlate", str(runs_yaml), "--output", str(out), "--set", "downstream=[pope.nope]"])
    assert bad.exit_code == 2 and "pope.nope" in bad.output and "runs.0.evaluation" in bad.output


def test_a_missing_file_names_the_run_field(runs_yaml):
    data = yaml.safe_load(runs_yaml.read_text())
    data["runs"][1]["stats"] = "nowhere"
    runs_yaml.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"runs\.1\.stats: cannot read .*nowhere/stats\.json"):
        correlate(str(runs_yaml))
