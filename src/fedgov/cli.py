"""What every fedgov command-line tool shares: one-line usage errors with exit status 2.

argparse prints the whole usage block before its error; fedgov's tools print one line,
``<prog>: error: <what is wrong>``, and ``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

__all__ = ["ArgumentParser", "UsageError", "fail"]


class UsageError(ValueError):
    """A bad command line or input found before any work starts (exit status 2)."""


def fail(prog: str, message: str, code: int = 2) -> NoReturn:
    """Print ``<prog>: error: <message>`` (first line only) on stderr and exit with ``code``."""
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"{prog}: error: {first}", file=sys.stderr)
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error; sub-parsers made from it inherit that."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")
