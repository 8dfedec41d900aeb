#!/usr/bin/env bash
# Download, into .whl/ (ignored by git), the wheels that benchmarks/gpu_check.py needs on a GPU machine
# that has PyTorch, transformers, peft, accelerate, pyarrow, pyyaml, rich and typer but no package index
# (benchmarks/gpu_check.md). Versions are the ones this checkout's .venv runs, so the GPU check runs the
# code the suite tested. Wheels are for CPython 3.12 on Linux x86_64 (that machine's Python); the total
# must stay under the 64 MiB that may travel with the working tree.
#
#   bash scripts/gpu_wheels.sh [PYTHON]      # PYTHON: the venv's interpreter, default .venv/bin/python
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${1:-.venv/bin/python}"
limit_mib=64
# diffusers (the SD3 pipeline), pydantic (stage configs) and what they need beyond that machine's image;
# image-reward, timm 0.6.13 and fairscale: the official ImageReward package the benchmark compares with.
packages=(diffusers importlib_metadata pydantic pydantic_core annotated_types typing_inspection image-reward timm fairscale)
pins=$("$python" - "${packages[@]}" <<'EOF'
import sys
from importlib.metadata import version

print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1:]))
EOF
)

rm -rf .whl && mkdir .whl
for pin in $pins; do
  # pip matches manylinux tags exactly: list the ones the releases we pin are built for.
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pin" 2>/dev/null; then
    # fairscale publishes a source release only: build its (pure Python) wheel here.
    "$python" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$pin"
  fi
done
size_kib=$(du -sk .whl | cut -f1)
ls .whl
echo "$(ls .whl | wc -l) wheels, $((size_kib / 1024)) MiB in .whl/"
if [ "$size_kib" -gt $((limit_mib * 1024)) ]; then
  echo "over the ${limit_mib} MiB that may travel with the working tree" >&2
  exit 1
fi
