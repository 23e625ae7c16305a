"""Test prerequisites from outside the repository: skipped locally, a failure in CI.

A test that cannot run because something the install scripts provide is missing (a system
tool such as ``promtool``, the compiled native kernel, a downloaded model) states it with
``require(condition, reason)`` at its start, or decorates itself with ``requires(...)``.

- Locally (``CI`` unset): a missing prerequisite skips the test, with the reason.
- With ``CI=true`` (``.ci/run`` exports it): it fails the test, so a run whose install step
  could not provide something never passes with those tests silently skipped.

Only this module skips (tests/test_prereq.py checks that no other test file does). Exempt
from failing in CI: the machine's accelerators, which no install script provides. Tests
marked ``gpu`` are skipped by tests/conftest.py wherever CUDA is absent, CI included; any other
condition on the accelerators (CUDA must be absent, two devices) goes through
``require_hardware``, which skips everywhere. Something the repository itself ships (a data
file, a generated stub) is not a prerequisite: assert that it exists.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

F = TypeVar("F", bound=Callable[..., Any])


def in_ci() -> bool:
    """True when the ``CI`` environment variable is ``true`` or ``1`` (any case)."""
    return os.environ.get("CI", "").strip().lower() in {"true", "1"}


def require(condition: object, reason: str) -> None:
    """Return if ``condition`` is truthy; otherwise skip the calling test, or fail it in CI.

    ``reason`` names what is missing and how to get it (e.g. "promtool not on PATH (Debian
    package 'prometheus'; `make system-deps` installs it)"). Call it from the test or from a
    fixture; the report points at the caller.
    """
    __tracebackhide__ = True  # report the caller's line, not this one
    if condition:
        return
    if in_ci():
        pytest.fail(f"missing prerequisite (CI=true, so this is a failure, not a skip): {reason}", pytrace=False)
    pytest.skip(reason)


def require_hardware(condition: object, reason: str) -> None:
    """Skip the calling test, in CI too, unless the machine's accelerators meet ``condition``
    (e.g. ``torch.cuda.device_count() >= 2``, or no CUDA for a CPU-only path)."""
    __tracebackhide__ = True
    if not condition:
        pytest.skip(f"hardware: {reason}")


def requires(condition: object, reason: str) -> Callable[[F], F]:
    """Decorator form of ``require`` for a test function, decided when the module is imported:
    the test unchanged if ``condition`` holds, else skip-marked, or under CI=true wrapped so
    that it fails."""

    def decorate(test: F) -> F:
        if condition:
            return test
        if not in_ci():
            return pytest.mark.skip(reason=reason)(test)

        @functools.wraps(test)
        def fail(*args: Any, **kwargs: Any) -> None:
            require(condition, reason)

        return fail  # type: ignore[return-value]

    return decorate


def require_native() -> Any:
    """The compiled CPU kernels module (engine.native.load()), or skip / fail (CI) the test."""
    from engine import native

    module = native.load()
    require(
        module is not None,
        "native CPU kernels could not be built: needs g++ and ninja (`make system-deps`); see the logged warning",
    )
    return module
