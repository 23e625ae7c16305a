"""argparse ``type=`` checkers shared by every ``splitserve`` subcommand: a bad value is a
usage error naming the flag (argparse adds the flag's name to the message)."""

from __future__ import annotations

import argparse


def _check(text: str, ok: bool, rule: str) -> None:
    if not ok:
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")


def positive_int(text: str) -> int:
    value = int(text)
    _check(text, value >= 1, ">= 1")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    _check(text, value >= 0, ">= 0")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    _check(text, value > 0, "> 0")  # NaN fails too
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    _check(text, value >= 0, ">= 0")  # NaN fails too
    return value


def port(text: str) -> int:
    value = int(text)
    _check(text, 0 <= value <= 65535, "in [0, 65535]")
    return value
