"""A quiet console: hide the native start-up lines of TensorFlow and absl.

TensorFlow 2.21 writes lines such as `I0000 ... port.cc] oneDNN custom
operations are on`, `cudart_stub.cc] Could not find cuda drivers` and
`E0000 ... failed call to cuInit` from C++ straight to file descriptor 2,
whatever TF_CPP_MIN_LOG_LEVEL says, once per process: pages of them in a
multi-process run. Python cannot filter what it does not write, so the
launcher puts a pipe in front of descriptor 2 (inherited by Beam's worker
processes) and a thread passes every line through except those. Python's
own `sys.stderr` (progress, summary, warnings) keeps the real descriptor.

`--verbose` skips all this; so does MOBILENET_EMBED_RAW_STDERR=1 (the tests
capture descriptor 2 themselves).
"""
from __future__ import annotations

import os
import re
import sys
import threading
from typing import Optional

RAW_ENV = "MOBILENET_EMBED_RAW_STDERR"

# absl/glog line prefixes: severity letter, MMDD, time, thread id, file:line].
_NATIVE_INFO_OR_WARNING = re.compile(rb"^[IW]\d{4} \d\d:\d\d:[\d.]+ +\d+ \S+:\d+\] ")
_KNOWN_NOISE = (
    b"WARNING: All log messages before absl::InitializeLog() is called",
    b"failed call to cuInit",  # no GPU: expected, not an error
    b"rebuild TensorFlow with the appropriate compiler flags",  # CPU flags note
    b"No semi_persistent_directory found",  # Beam worker start-up
    b"Discarding unparseable args",  # Beam worker re-parsing our options
)

_installed: Optional["_StderrFilter"] = None


def is_noise(line: bytes) -> bool:
    return bool(_NATIVE_INFO_OR_WARNING.match(line)) or any(
        text in line for text in _KNOWN_NOISE)


class _StderrFilter(threading.Thread):
    def __init__(self, read_fd: int, out_fd: int):
        super().__init__(daemon=True, name="stderr-filter")
        self._read_fd = read_fd
        self._out_fd = out_fd

    def run(self):
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, 65536)
            except OSError:
                return
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
            if kept:
                os.write(self._out_fd, kept)
        if pending and not is_noise(pending):
            os.write(self._out_fd, pending)


def hide_native_noise() -> None:
    """Install the filter once per process (no-op when asked not to)."""
    global _installed
    if _installed is not None or os.environ.get(RAW_ENV) == "1":
        return
    sys.stderr.flush()
    real_fd = os.dup(2)
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    # Python's own messages go straight to the real stderr, unfiltered.
    sys.stderr = os.fdopen(os.dup(real_fd), "w", buffering=1,
                           encoding=sys.stderr.encoding or "utf-8",
                           errors="backslashreplace")
    _installed = _StderrFilter(read_fd, real_fd)
    _installed.start()


def root_cause(error: BaseException) -> str:
    """One line: the innermost error Beam wrapped, redacted."""
    seen = set()
    while id(error) not in seen:
        seen.add(id(error))
        inner = error.__cause__ or error.__context__
        if inner is None:
            break
        error = inner
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    from transforms.uris import redact_text
    return redact_text(f"{type(error).__name__}: {text}"[:400])
