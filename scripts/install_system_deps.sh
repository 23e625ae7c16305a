#!/usr/bin/env bash
# Install the system tools the test suite needs (Debian package -> what it provides):
#   prometheus   prometheus, promtool   tests/integration/test_prometheus.py (a real server),
#                                       tests/unit/deploy/test_prometheus_rules.py (promtool)
#   g++          g++                    the native CPU kernel (engine/native), built through
#   ninja-build  ninja                  torch.utils.cpp_extension; tests/unit/engine/test_cpu_paged_decode.py
#   python3-dev  Python.h               the same build, for a Debian python3 (checked for PYTHON)
#   redis-server redis-server           the state store's Redis backend: tests/redis_server.py starts a
#                                       real server on a free port (tests/unit/cluster/state/,
#                                       the failover and journal integration tests)
#
# Idempotent and quick when everything is present. Installs through apt-get as root (or with
# password-less sudo), with services kept from auto-starting (tests start their own instances).
# When it cannot install, it says what is missing: locally it exits 0 and those tests skip;
# with CI=true it exits 1, as the tests would fail (tests/prereq.py).
set -euo pipefail

PYTHON=${PYTHON:-python3}

missing=()
need_binary() { command -v "$2" >/dev/null 2>&1 || missing+=("$1"); }
need_binary prometheus prometheus
need_binary prometheus promtool
need_binary g++ g++
need_binary ninja-build ninja
need_binary redis-server redis-server
if ! "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
  missing+=(python3-dev)
fi
[ ${#missing[@]} -eq 0 ] && exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)

cannot() {
  echo "install_system_deps: $*; missing: ${missing[*]} (the tests needing them skip, and fail under CI=true)" >&2
  if [ "${CI:-}" = true ]; then exit 1; fi
  exit 0
}
command -v apt-get >/dev/null 2>&1 || cannot "apt-get not available, install them yourself"
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
  else
    cannot "not root and no password-less sudo"
  fi
fi

# policy-rc.d exit 101 = "do not start services"; only added (and removed) if absent.
POLICY=/usr/sbin/policy-rc.d
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
  "${SUDO[@]}" chmod +x "$POLICY"
  trap '"${SUDO[@]}" rm -f "$POLICY"' EXIT
fi

install() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; }
echo "install_system_deps: installing ${missing[*]}" >&2
# The package lists may be absent or stale (a candidate the mirror no longer has): update once
# and retry before giving up.
if ! install; then
  "${SUDO[@]}" apt-get update -qq
  install || cannot "apt-get install failed"
fi
