"""The one error type of the search library."""


class SearchError(Exception):
    """A problem the user can fix, named in one line (the CLI prints
    `error: <message>` and exits 2)."""
