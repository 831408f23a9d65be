"""What every command main shares: errors become one line and an exit code."""
from __future__ import annotations

import functools
import sys
from typing import Callable

from pipeline.search.errors import SearchError, SearchJobFailed

Main = Callable[[list[str]], int]


def errors_as_exit_2(fn: Main) -> Main:
    """A problem with the command (a `SearchError`, a `DatasetError`) is one
    `error: ...` line and exit 2; a pipeline that started and failed
    (`SearchJobFailed`) one line and exit 3. Anything else is a bug and
    keeps its traceback."""
    @functools.wraps(fn)
    def wrapped(argv: list[str]) -> int:
        from transforms.dataset import DatasetError
        try:
            return fn(argv)
        except (SearchError, DatasetError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except SearchJobFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 3
    return wrapped


def say(message: str) -> None:
    """A progress or result line for the person at the terminal (stderr:
    stdout stays for what a script reads, e.g. `query --json`)."""
    print(message, file=sys.stderr)
