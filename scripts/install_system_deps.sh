#!/usr/bin/env bash
# Install the system servers the test suite starts as subprocesses (redis-server, prometheus)
# and the C++ compiler the engine builds its native CPU kernel with (g++; without it the
# engine falls back to torch SDPA and the kernel's own tests skip).
#
# Idempotent and quick when they are already present: a package counts as present when its
# binary is on PATH. Installs through apt-get only when apt-get exists and we are root (or have
# password-less sudo); otherwise it warns and exits 0, and the tests that need a missing server
# skip themselves. `apt-get update` runs only when apt knows no candidate for a missing package.
# While installing, services are kept from auto-starting (tests start their own instances).
set -euo pipefail

# package -> binary it provides
declare -A BINARY=(
  [redis-server]=redis-server
  [prometheus]=prometheus
  [g++]=g++
)

missing=()
for pkg in "${!BINARY[@]}"; do
  command -v "${BINARY[$pkg]}" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

warn() { echo "install_system_deps: $*; tests needing ${missing[*]} will be skipped" >&2; }

if ! command -v apt-get >/dev/null 2>&1; then
  warn "apt-get not available, install ${missing[*]} yourself"
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
  else
    warn "not root and no password-less sudo"
    exit 0
  fi
fi

has_candidate() { apt-cache policy "$1" 2>/dev/null | grep -Eq 'Candidate: [^(]'; }
for pkg in "${missing[@]}"; do
  if ! has_candidate "$pkg"; then
    "${SUDO[@]}" apt-get update -qq
    break
  fi
done

# policy-rc.d exit 101 = "do not start services"; only added (and removed) if absent.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

echo "install_system_deps: installing ${missing[*]}" >&2
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
