"""Command-line plumbing shared by run.py and the `python -m tinymoe.*` tools.

A user mistake (a bad flag, path, checkpoint or value) ends as one `error: ...` line on stderr
and exit status 2, never a traceback; a bug still shows its traceback.
"""

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from tinymoe.errors import TinyMoeError


class OneLineParser(argparse.ArgumentParser):
    """argparse, except that a bad flag is one `error: ...` line on stderr (no usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")


def positive_int(s: str) -> int:
    """argparse type: an integer >= 1."""
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def lookahead_list(s: str) -> tuple[int, ...]:
    """argparse type: comma-separated lookaheads such as "1" or "1,2,3", each >= 1."""
    try:
        values = tuple(int(x) for x in s.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"lookaheads must be >= 1, got {s!r}")
    return values


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call main(argv); turn TinyMoeError into one stderr line and exit status 2."""
    try:
        return main(argv)
    except TinyMoeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
