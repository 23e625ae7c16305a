"""Worker errors on one line, for clients, logs and start-up reports."""

from __future__ import annotations

import re

# The last line of a Python traceback, stripped: "SomeError: message" (possibly
# module-qualified). serve.py finds the cause in a worker's start-up failure with it too.
EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*")


def one_line(e: BaseException | str) -> str:
    """``e`` on one line. Ray's errors carry a page after their first line (generic advice, or
    the remote traceback of an actor that died in its constructor); the first line is kept and,
    when a traceback follows, its final exception line too, which names the actual cause."""
    text = str(e).strip()
    if not text:
        return type(e).__name__ if isinstance(e, BaseException) else "unknown error"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0]
    cause = next((line for line in reversed(lines[1:]) if EXCEPTION_LINE.match(line)), None)
    return f"{first} ... {cause}" if cause and cause != first else first
