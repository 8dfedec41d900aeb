"""The install locks (locks/, written by scripts/lock.sh, installed by scripts/install.sh) agree with what
pyproject.toml and locks/lmms-eval.in declare, and `synthalign doctor` tells an environment that drifted
from its lock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from synthalign_ray import lockfile
from synthalign_ray.cli import app

REPO = Path(__file__).resolve().parents[2]
LOCKS = REPO / "locks"
# Each lock and the extras of pyproject.toml it is resolved from (scripts/lock.sh).
STACK_LOCKS = {"cpu": ["cpu"], "cpu-test": ["cpu", "test"], "gpu": ["gpu"], "gpu-test": ["gpu", "test"]}
LMMS_EVAL_LOCKS = ["lmms-eval-cpu", "lmms-eval-gpu"]
# The locks' target (scripts/lock.sh: CPython 3.11, Linux x86_64), for requirement markers.
TARGET = {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux", "platform_system": "Linux",
          "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython",
          "extra": ""}  # fmt: skip


def lmms_eval_requirements() -> list[str]:
    lines = (LOCKS / "lmms-eval.in").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def test_every_lock_file_is_one_install_sh_or_the_lmms_eval_venv_uses():
    assert sorted(p.stem for p in LOCKS.glob("*.txt") if p.name != "cpu-constraints.txt") == sorted([*STACK_LOCKS, *LMMS_EVAL_LOCKS])


@pytest.mark.parametrize("name", sorted(STACK_LOCKS))
def test_stack_lock_pins_every_declared_dependency_within_its_range(name):
    entries = lockfile.read_lock(LOCKS / f"{name}.txt")
    requirements = lockfile.pyproject_requirements(REPO / "pyproject.toml", STACK_LOCKS[name])
    assert lockfile.disagreements(entries, requirements, TARGET) == []
    assert all("--hash=sha256:" in entry.text for entry in entries.values())  # pip's --require-hashes needs every one


@pytest.mark.parametrize("name", LMMS_EVAL_LOCKS)
def test_lmms_eval_lock_pins_what_lmms_eval_in_declares(name):
    entries = lockfile.read_lock(LOCKS / f"{name}.txt")
    assert lockfile.disagreements(entries, lmms_eval_requirements(), TARGET) == []
    assert "filelock" in entries and entries["filelock"].version.split(".")[:2] < ["4", "3"]  # lmms-eval 0.7.3 imports filelock._api


@pytest.mark.parametrize("device", ["cpu", "gpu"])
def test_plain_lock_is_the_test_lock_without_the_test_tools(device):
    plain, test = (lockfile.read_lock(LOCKS / f"{device}{suffix}.txt") for suffix in ("", "-test"))
    assert {name: e.version for name, e in plain.items()} == {name: test[name].version for name in plain}
    assert {"pytest", "moto"} <= test.keys() - plain.keys()


def test_cpu_locks_take_pytorchs_cpu_torch_and_leave_out_the_cuda_only_audio_packages():
    for name in ("cpu", "cpu-test", "lmms-eval-cpu"):
        entries = lockfile.read_lock(LOCKS / f"{name}.txt")
        assert entries["torch"].version == "2.13.0+cpu"
        assert not {"torchaudio", "torchcodec"} & entries.keys()
    assert lockfile.read_lock(LOCKS / "gpu.txt")["vllm"].version  # the CUDA vllm resolved beside the project's ranges


def test_the_range_check_fails_on_a_missing_or_out_of_range_pin():
    entries = lockfile.read_lock(LOCKS / "cpu.txt")
    torch = entries["torch"].version
    assert lockfile.disagreements(entries, ["torch>=2.6", "ray[data]==2.60.0"], TARGET) == []
    assert lockfile.disagreements(entries, ["torch<2.6", "not-a-locked-package>=1", "other; sys_platform == 'darwin'"], TARGET) == [
        f"torch: the lock pins {torch}, outside 'torch<2.6'",
        "not-a-locked-package: declared as 'not-a-locked-package>=1', not in the lock",
    ]


def test_read_lock_names_the_bad_line_and_select_keeps_hashes(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("# header\nsix==1.17.0 \\\n    --hash=sha256:aa\nsix>=1\n")
    with pytest.raises(lockfile.LockError, match=r"bad.txt:4: not a `name==version` pin: six>=1"):
        lockfile.read_lock(bad)
    bad.write_text("Six==1.17.0\nsix==1.16.0\n")
    with pytest.raises(lockfile.LockError, match=r"bad.txt:2: six is pinned twice"):
        lockfile.read_lock(bad)
    entries = lockfile.read_lock(LOCKS / "cpu.txt")
    torch_only = lockfile.select(entries, only=["torch"])
    assert torch_only == entries["torch"].text and torch_only.startswith("torch==2.13.0+cpu \\\n    --hash=sha256:")
    rest = lockfile.select(entries, without=["Torch", "deepspeed"])
    assert "\ntorch==" not in rest and "deepspeed==" not in rest and rest.count("\n") > 1000
    with pytest.raises(lockfile.LockError, match="not in the lock: no-such-package"):
        lockfile.select(entries, only=["no-such-package"])


def test_select_is_what_install_sh_runs_with_a_bare_python(tmp_path):
    """install.sh cuts the lock with the new venv's python before anything is installed: stdlib only."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    run = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; sys.path.insert(0, sys.argv[1]); from synthalign_ray.lockfile import main; "
         "sys.argv = ['lockfile', 'select', sys.argv[2], '--only', 'deepspeed']; sys.exit(main())", str(REPO), str(LOCKS / "cpu.txt")],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("deepspeed==") and "--hash=sha256:" in run.stdout


def test_doctor_reports_drift_from_a_lock_and_exits_1(tmp_path):
    """An environment whose installed versions differ from the lock: doctor names each package. The lock
    is made from this environment's own versions, with one pin changed and one package it lacks."""
    import importlib.metadata

    pins = [f"{name}=={importlib.metadata.version(name)} \\\n    --hash=sha256:00\n" for name in ("pyyaml", "typer", "rich")]
    lock = tmp_path / "lock.txt"
    lock.write_text("".join(pins))
    runner = CliRunner()
    result = runner.invoke(app, ["doctor", "--lock", str(lock)])
    assert result.exit_code == 0, result.output
    assert f"lock: {lock} (3 packages), all installed as locked" in result.output
    assert "transformers" in result.output  # the stack's versions come first
    lock.write_text("".join(pins[1:]) + "pyyaml==0.0.1 \\\n    --hash=sha256:00\nno-such-package==1.0 \\\n    --hash=sha256:00\n")
    result = runner.invoke(app, ["doctor", "--lock", str(lock)])
    assert result.exit_code == 1
    assert f"drift: pyyaml {importlib.metadata.version('pyyaml')} (locked 0.0.1)" in result.output
    assert "drift: no-such-package not installed (locked 1.0)" in result.output
    result = runner.invoke(app, ["doctor", "--lock", str(tmp_path / "missing.txt")])
    assert result.exit_code == 2 and "missing.txt: cannot read the lock" in result.output


def test_this_environment_matches_the_lock_install_sh_recorded():
    """CI installs with scripts/install.sh, which records its lock in the venv: the suite runs on exactly
    the locked stack, and doctor says so."""
    record = lockfile.install_record()
    if record is None:
        pytest.skip("this environment was not installed by scripts/install.sh (no synthalign-lock.json in sys.prefix)")
    assert (REPO / record["lock"]).is_file() and record["lock"].startswith("locks/")
    assert lockfile.installed_drift(lockfile.read_lock(REPO / record["lock"])) == []
    assert json.loads(Path(sys.prefix, lockfile.INSTALL_RECORD).read_text())["sha256"] == lockfile.file_sha256(REPO / record["lock"])
