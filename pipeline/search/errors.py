"""The error types of the search library, and the one check of a local --to."""
from typing import Optional


class SearchError(Exception):
    """A problem the user can fix, named in one line (the CLI prints
    `error: <message>` and exits 2)."""


class SearchJobFailed(Exception):
    """A search pipeline that started and failed on its runner (the CLI
    prints `error: <message>` and exits 3, like the embedding job)."""


def check_local_target(to: str, is_file: Optional[bool] = False) -> None:
    """One line (SearchError) for a local `--to` that cannot be made: a file
    where a folder goes (or a folder where a file goes; `is_file=None`
    takes either), a path under a file, or a place this user cannot write.
    Nothing is created."""
    import os
    path = os.path.abspath(os.path.expanduser(to))
    if is_file is True and os.path.isdir(path):
        raise SearchError(f"--to {to} is a folder; name the file to write")
    if is_file is False and os.path.exists(path) and not os.path.isdir(path):
        raise SearchError(f"--to {to} is a file, not a folder")
    above = path if is_file is False else os.path.dirname(path)
    while not os.path.exists(above):
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise SearchError(f"--to {to} lies under {above}, which is a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise SearchError(f"--to {to}: cannot write in {above} (permission denied)")
