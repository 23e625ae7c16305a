"""splitserve's on-disk model cache: where it is, one writer at a time, durable writes.

Layout: ``cache_root()`` is ``$SPLITSERVE_CACHE``, else ``$XDG_CACHE_HOME/splitserve``, else
``~/.cache/splitserve``; model files and conversions live in ``models_cache_dir()`` =
``<root>/models``. Writers (cluster/model_store.py fetching a file, engine/models/gguf.py
converting one) build under a hidden temporary name in that directory, flush, and rename into
place while holding ``exclusive_lock`` on a per-entry lock file, so readers see an entry whole
or not at all and never need the lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator


def cache_root() -> str:
    """$SPLITSERVE_CACHE, else $XDG_CACHE_HOME/splitserve, else ~/.cache/splitserve."""
    root = os.environ.get("SPLITSERVE_CACHE")
    if root:
        return os.path.abspath(os.path.expanduser(root))
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "splitserve")


def models_cache_dir(root: str | None = None) -> str:
    """Where fetched model files and GGUF conversions live: ``<root or cache_root()>/models``."""
    return os.path.join(root or cache_root(), "models")


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def exclusive_lock(path: str) -> Iterator[None]:
    """Hold an exclusive fcntl lock on ``path`` (created if missing); released on exit or death."""
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fsync_dir(directory: str) -> None:
    """Persist a directory's entries (best effort: some filesystems refuse to fsync directories)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
