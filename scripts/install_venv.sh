#!/usr/bin/env bash
# Create .venv (if missing) and install splitserve editable with the dev extra.
#
# torch: when the venv can already import torch (e.g. a CUDA build installed by hand on a GPU
# machine), that torch is kept, and constraints.txt (the CPU CI pin) is applied only if the
# installed version matches it. Otherwise torch is installed first, pinned by constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "install_venv: splitserve needs Python >= 3.11 ($PYTHON is older)" >&2; exit 1; }
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)

pinned=$(sed -n 's/^torch==//p' constraints.txt)
if installed=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null); then
  if [ "${installed%%+*}" = "$pinned" ]; then
    CONSTRAINTS=(-c constraints.txt)
  else
    echo "install_venv: keeping the installed torch $installed (constraints.txt pins $pinned)" >&2
    CONSTRAINTS=()
  fi
else
  "${PIP[@]}" install -c constraints.txt torch
  CONSTRAINTS=(-c constraints.txt)
fi

"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" -e ".[dev]"
