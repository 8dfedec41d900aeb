"""Every command's missing-path and bad-file cases end in one `error:` line naming the path, with exit
status 2 and no traceback: user errors derive from UserError and the CLI catches them in one place."""

import pytest

from synthalign_ray.errors import UserError
from tests.conftest import cli_error_line

MISSING = "/nonexistent/synthalign"

MISSING_PATH_CASES = {
    "config validate": ["config", "validate", f"{MISSING}.yaml"],
    "generate, config": ["generate", "-c", f"{MISSING}.yaml", "-o", "{tmp}/run"],
    "generate, prompt file": ["generate", "-c", "configs/tiny.yaml", "--set", f"prompts.path={MISSING}.jsonl", "-o", "{tmp}/run"],
    "export": ["export", MISSING, "-o", "{tmp}/export"],
    "import": ["import", f"{MISSING}.json", "-o", "{tmp}/imported"],
    "train, config": ["train", "-c", f"{MISSING}.yaml", "-d", "{tmp}", "-o", "{tmp}/train"],
    "train, data": ["train", "-c", "configs/train_tiny.yaml", "-d", MISSING, "-o", "{tmp}/train"],
    "merge": ["merge", MISSING, "-o", "{tmp}/merged"],
    "evaluate": ["evaluate", "-c", f"{MISSING}.yaml", "-m", "zoo:lvlm", "-o", "{tmp}/eval"],
    "rescore-pope": ["rescore-pope", f"{MISSING}.jsonl"],
    "report": ["report", MISSING],
    "repair": ["repair", MISSING],
    "gc": ["gc", MISSING],
    "generate --dry-run": ["generate", "-c", "configs/tiny.yaml", "--set", f"prompts.path={MISSING}.jsonl", "-o", "{tmp}/run", "--dry-run"],
    "correlate": ["correlate", f"{MISSING}.yaml", "-o", "{tmp}/corr"],
    "judge, run": ["judge", MISSING, "-c", "configs/judge_tiny.yaml"],
    "judge, config": ["judge", "{tmp}", "-c", f"{MISSING}.yaml"],
    "plan": ["plan", "-c", "configs/tiny.yaml", "--gpus", "2", "--profile", f"{MISSING}.yaml", "-o", "{tmp}/p.yaml"],
    "plan, cluster": ["plan", "-c", "configs/paper.yaml", "--cluster", f"{MISSING}.yaml", "--profile",
                      "configs/profiles/paper_a100.yaml", "-o", "{tmp}/p.yaml"],
    "simulate": ["simulate", "-c", "configs/tiny.yaml", "--gpus", "2", "--profile", f"{MISSING}.yaml", "-o", "{tmp}/sim"],
    "calibrate": ["calibrate", "-c", f"{MISSING}.yaml", "-o", "{tmp}/profile.yaml"],
    "prompts": ["prompts", "-c", f"{MISSING}.yaml", "-o", "{tmp}/prompts.jsonl"],
    "doctor": ["doctor", "--lock", f"{MISSING}.txt"],
}


@pytest.mark.parametrize("case", sorted(MISSING_PATH_CASES))
def test_a_missing_path_is_one_error_line_with_exit_2(case, tmp_path):
    args = [a.format(tmp=tmp_path) for a in MISSING_PATH_CASES[case]]
    assert MISSING in cli_error_line(args)


def test_bad_files_are_one_error_line_with_exit_2(tmp_path):
    not_yaml = tmp_path / "config.yaml"
    not_yaml.write_text("images: [unclosed\n")
    assert str(not_yaml) in cli_error_line(["generate", "-c", str(not_yaml), "-o", str(tmp_path / "run")])
    not_json = tmp_path / "pairs.json"
    not_json.write_text("[{")
    assert "not valid JSON" in cli_error_line(["import", str(not_json), "-o", str(tmp_path / "imported")])
    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    assert "no Parquet shards" in cli_error_line(["export", str(empty_run), "-o", str(tmp_path / "export")])


def test_every_cli_error_class_is_a_user_error():
    from synthalign_ray.config import ConfigError
    from synthalign_ray.evaluate.common import BenchmarkFileError
    from synthalign_ray.generations import NotARunFolderError
    from synthalign_ray.store.lease import OutputLeasedError
    from synthalign_ray.formats.llava_json import LlavaFormatError
    from synthalign_ray.lockfile import LockError
    from synthalign_ray.capacity.plan import PlanError
    from synthalign_ray.report.build import ReportError
    from synthalign_ray.stages.prompts import InputFileError
    from synthalign_ray.store import UnsharedOutputError
    from synthalign_ray.train.data import DataError
    from synthalign_ray.train.dpo import LoraTargetError
    from synthalign_ray.train.trainer import TrainRunError

    for error in (ConfigError, BenchmarkFileError, OutputLeasedError, LlavaFormatError, LockError, PlanError,
                  ReportError, InputFileError, UnsharedOutputError, DataError, LoraTargetError, TrainRunError,
                  NotARunFolderError):
        assert issubclass(error, UserError), error
