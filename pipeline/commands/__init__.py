"""The command mains behind `mobilenet-embed COMMAND`, one module per family.

Each `*_main(argv) -> int` parses its own options and returns the exit code
of the README's table; `pipeline/cli.py` only routes to them. `common.py`
holds the one-line error handling they share.
"""
