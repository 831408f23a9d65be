"""The one error type of the search library."""


class SearchError(Exception):
    """A problem the user can fix, named in one line (the CLI prints
    `error: <message>` and exits 2)."""


class SearchJobFailed(Exception):
    """A search pipeline that started and failed on its runner (the CLI
    prints `error: <message>` and exits 3, like the embedding job)."""
