#!/usr/bin/env bash
# Create the venv (VENV, default .venv) if missing and install splitserve editable with the dev
# extra, every dependency pinned:
#   - requirements.lock (from `make lock`) pins every dependency except the accelerator stack
#     (torch, triton, nvidia-*); it is always applied;
#   - constraints.txt pins the CPU torch and triton; it is applied when the venv has no torch
#     yet (torch is then installed from this pin) or has a CPU build of the pinned version;
#   - any other torch (a CUDA/ROCm build installed by hand on a GPU machine, another version) is
#     kept: the installed torch and triton are held at their versions, so that pip fails loudly
#     rather than replace them if a locked pin conflicts with them.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
LOCK=requirements.lock

[ -f "$LOCK" ] || { echo "install_venv: $LOCK is missing (\`make lock\` generates it)" >&2; exit 1; }
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "install_venv: splitserve needs Python >= 3.11 ($PYTHON is older)" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

pinned=$(sed -n 's/^torch==//p' constraints.txt)
[ -n "$pinned" ] || { echo "install_venv: constraints.txt has no torch==VERSION line" >&2; exit 1; }

# Prints nothing when the venv has no torch, else "VERSION cpu|accelerator".
PROBE='
import importlib.metadata as m
try:
    version = m.version("torch")
except m.PackageNotFoundError:
    raise SystemExit(0)
import torch
accelerator = torch.version.cuda or getattr(torch.version, "hip", None)
print(version, "accelerator" if accelerator else "cpu")
'
if ! torch_info=$("$VENV/bin/python" -c "$PROBE"); then
  echo "install_venv: $VENV has a torch that does not import (error above): repair or uninstall it" >&2
  exit 1
fi

CONSTRAINTS=(-c "$LOCK")
if [ -z "$torch_info" ]; then
  CONSTRAINTS+=(-c constraints.txt)  # torch and triton come from its pins
else
  read -r version build <<<"$torch_info"
  if [ "$build" = cpu ] && [ "${version%%+*}" = "$pinned" ]; then
    CONSTRAINTS+=(-c constraints.txt)
  else
    held="$VENV/.splitserve-held-torch.txt"
    echo "torch==$version" >"$held"
    if triton=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null); then
      echo "triton==$triton" >>"$held"
    fi
    echo "install_venv: keeping the installed $(paste -sd' ' "$held") ($build build; constraints.txt pins the CPU torch $pinned for CI); every other dependency is pinned by $LOCK" >&2
    CONSTRAINTS+=(-c "$held")
  fi
fi

"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -e ".[dev]"
