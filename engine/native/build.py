"""Compile ``csrc/*.cpp`` (with ``csrc/*.h``) once per machine with ``torch.utils.cpp_extension.load`` and cache it.

Lifecycle: the first ``load()`` in a process builds (or reuses) the extension and memoises the
result (module or None) for the life of the process; nothing is compiled at import time.

Build directory: ``$XDG_CACHE_HOME|~/.cache/splitserve/native/<key>``, key = hash of the sources and headers,
compile flags, torch's version and location, Python's version and the CPU's feature flags
(``-march=native`` binaries must not be shared between different CPUs through a shared home;
torch's location is in the ninja file, so each venv gets its own build). The sources are
copied into ``<key>/src`` so the ninja file never changes between checkouts or installs that
carry the same sources.

Concurrency: several processes (pytest workers, Ray actors) may load at once. Each holds an
exclusive ``fcntl.flock`` on ``<key>/build.flock`` for the whole build-and-import; the kernel
drops it if the process dies, unlike torch's own ``lock`` file (``O_EXCL`` create, never
removed by a killed builder, waited on forever). Whoever holds the flock therefore knows a
leftover torch ``lock`` file is stale and removes it before calling torch's loader.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

NAME = "splitserve_native"
CSRC = Path(__file__).resolve().parent / "csrc"
# Tried in order; OpenMP makes at::parallel_for parallel (its OpenMP backend is header code),
# without it the kernels still run, single-threaded.
FLAG_SETS: list[list[str]] = [
    ["-O3", "-march=native", "-fopenmp"],
    ["-O3", "-march=native"],
]

_lock = threading.Lock()
_loaded = False
_announced = False  # the "compiling" line is printed at most once per process
_module: ModuleType | None = None


def load() -> ModuleType | None:
    """The compiled native module, or None (one warning per process) if it is disabled or fails."""
    global _loaded, _module
    with _lock:
        if not _loaded:
            _module = _load_uncached()
            _loaded = True
        return _module


def _load_uncached() -> ModuleType | None:
    if os.environ.get("SPLITSERVE_NATIVE", "1") == "0":
        log.info("native CPU kernels disabled by SPLITSERVE_NATIVE=0")
        return None
    sources = sorted(CSRC.glob("*.cpp"))
    headers = sorted(CSRC.glob("*.h"))
    errors = []
    for flags in FLAG_SETS:
        try:
            return _build(sources, headers, flags)
        except Exception as e:  # compiler missing, compile error, import error: fall back
            errors.append(f"{' '.join(flags)}: {type(e).__name__}: {str(e).strip()[-2000:]}")
            if os.environ.get("CI") == "true":  # CI has g++ and OpenMP: a failed build is a bug
                raise RuntimeError(f"native CPU kernels failed to build under CI=true:\n{errors[-1]}") from e
    log.warning("native CPU kernels unavailable, using the torch fallback:\n%s", "\n".join(errors))
    return None


def build_dir(sources: list[Path], flags: list[str]) -> Path:
    """Cache directory for this (sources and headers, flags, torch and where it is, Python, CPU) combination."""
    import torch

    h = hashlib.sha256()
    for src in sources:
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    # torch's location as imported (not resolved): the build files name its include and lib
    # paths, so two venvs (or one reached through a symlink) sharing a directory would make
    # ninja rebuild at every load that alternates between them
    torch_dir = os.path.dirname(torch.__file__)
    for part in (*flags, torch.__version__, torch_dir, sys.version, platform.machine(), _cpu_flags()):
        h.update(part.encode() + b"\0")
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "splitserve" / "native"
    return root / h.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build(sources: list[Path], headers: list[Path], flags: list[str]) -> ModuleType:
    global _announced
    from torch.utils import cpp_extension

    directory = build_dir(sources + headers, flags)
    src_dir = directory / "src"
    src_dir.mkdir(parents=True, exist_ok=True)
    with open(directory / "build.flock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released on close or process death
        try:
            (directory / "lock").unlink(missing_ok=True)  # torch's baton, stale if we got here
            copies = []
            for src in sources + headers:
                dst = src_dir / src.name
                if not dst.exists() or dst.read_bytes() != src.read_bytes():
                    shutil.copyfile(src, dst)
                if src in sources:
                    copies.append(str(dst))
            if not (directory / f"{NAME}.so").exists() and not _announced:
                print("compiling native CPU kernels (once, ~30 s)...", file=sys.stderr, flush=True)
                _announced = True
            return cpp_extension.load(
                name=NAME,
                sources=copies,
                extra_cflags=flags,
                extra_ldflags=["-fopenmp"] if "-fopenmp" in flags else [],
                build_directory=str(directory),
                verbose=False,
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
