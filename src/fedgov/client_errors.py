"""How a cooperative says it did not do its part, and how the aggregator reads that.

Cooperatives reply with an error code: ``DECLINED`` when they sit a round out by rule (a
missed deadline, a spent privacy budget), ``FAILED`` when something raised. Any other code
comes from the engine itself (a ClientApp that could not load, a lost node) and carries the
engine's text, which for Ray is a colourised traceback; :func:`clean_reason` turns any of
them into the one line that fedgov records and prints.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["CODE_DECLINED", "CODE_FAILED", "clean_reason", "exception_reason", "failure_of", "is_crash"]

CODE_DECLINED = 1001
CODE_FAILED = 1002

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# The line of a Python traceback that names the exception: "ValueError: ..." or "pkg.mod.Error: ...".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w]*\.)*[A-Za-z_]\w*(?:Error|Exception|Exhausted|Deadline|Interrupt)\b.*")
_WRAPPERS = ("ray.exceptions", "ClientAppException", "RayTaskError", "ray::")


def exception_reason(exc: BaseException) -> str:
    """``"ValueError: first line of the message"``."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def clean_reason(text: str) -> str:
    """One line without colour codes or engine wrappers: the cause as the cooperative raised it."""
    text = _ANSI.sub("", str(text))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) <= 1 and not any(w in text for w in _WRAPPERS):
        return lines[0] if lines else "unknown error"
    # A traceback: the last line that names an exception other than the engine's wrappers.
    for line in reversed(lines):
        if _EXCEPTION_LINE.match(line) and not any(w in line for w in _WRAPPERS):
            return line
    return lines[-1]


def is_crash(code: int) -> bool:
    """An error that is not a rule-based decline: something broke in or around the ClientApp."""
    return code != CODE_DECLINED


def failure_of(reply: Any, cooperative: int, *, phase: str = "train") -> dict[str, Any]:
    """The record of an error reply (a Flower Message): who, the cause in one line, and whether
    it was a crash rather than a decline."""
    entry: dict[str, Any] = {"cooperative": cooperative, "reason": clean_reason(reply.error.reason)}
    if is_crash(reply.error.code):
        entry.update(crashed=True, phase=phase)
    return entry
