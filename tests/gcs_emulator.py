"""A real GCS emulator on loopback for the gs:// tests, and network guards.

`gcs_emulator` (module-scoped fixture) starts gcp-storage-emulator (a test
extra in setup.py, pinned in constraints.txt) as a separate server process
on 127.0.0.1, points STORAGE_EMULATOR_HOST at it and stops it afterwards,
checking that the process and its children are gone. Its request log tells
the tests which objects were read, and how often.

`NetworkGuard` records, through a Python audit hook, every connection and
name lookup that is not loopback (a metadata-server probe of
169.254.169.254, metadata.google.internal, oauth2.googleapis.com, ...) and
every call of google.auth.default(), so a test can assert that a run stayed
on loopback and never searched for credentials.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Optional
from urllib.parse import unquote

import pytest

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_REQUEST = re.compile(r'"(?P<method>[A-Z]+) (?P<target>\S+) HTTP/[\d.]+" (?P<status>\d+)')


class GcsEmulator:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.log_path = workdir / "gcs_emulator.log"
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    # --- process -------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> None:
        log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if k != EMULATOR_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gcp_storage_emulator", "start",
             "--host", "127.0.0.1", "--port", str(self.port), "--in-memory"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
            start_new_session=True)  # its own group: stopped as a whole
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the GCS emulator exited at start:\n"
                                   + self.log_path.read_text(errors="replace"))
            try:
                with urllib.request.urlopen(self.endpoint + "/storage/v1/b",
                                            timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the GCS emulator did not answer within {timeout} s")

    def stop(self) -> list[int]:
        """Stop the server; returns the pids still alive after (should be [])."""
        import psutil
        if self.process is None:
            return []
        try:
            family = [psutil.Process(self.process.pid)]
            family += family[0].children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=5)
        return [p.pid for p in alive]

    # --- data ----------------------------------------------------------------
    def client(self):
        """An anonymous google-cloud-storage client for setting up and reading
        back, independent of the pipeline's own Beam filesystem code."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
        return storage.Client(project="test-project",
                              credentials=AnonymousCredentials(),
                              client_options={"api_endpoint": self.endpoint})

    def create_bucket(self, name: str):
        return self.client().create_bucket(name)

    def upload_file(self, local: Path, uri: str) -> None:
        bucket, name = split(uri)
        self.client().bucket(bucket).blob(name).upload_from_filename(str(local))

    def upload_tree(self, local: Path, uri: str) -> int:
        bucket, prefix = split(uri.rstrip("/"))
        b = self.client().bucket(bucket)
        count = 0
        for path in sorted(Path(local).rglob("*")):
            if path.is_file():
                relative = path.relative_to(local).as_posix()
                b.blob(f"{prefix}/{relative}").upload_from_filename(str(path))
                count += 1
        return count

    def list(self, uri: str) -> list[str]:
        bucket, prefix = split(uri)
        return sorted(f"gs://{bucket}/{b.name}" for b in
                      self.client().list_blobs(bucket, prefix=prefix))

    def read(self, uri: str) -> bytes:
        bucket, name = split(uri)
        return self.client().bucket(bucket).blob(name).download_as_bytes()

    # --- the request log -----------------------------------------------------
    def requests(self) -> list[tuple[str, str, int]]:
        """(method, target, status) of every request served so far."""
        text = self.log_path.read_text(errors="replace")
        return [(m["method"], unquote(m["target"]), int(m["status"]))
                for m in _REQUEST.finditer(text)]

    def mark(self) -> int:
        return len(self.requests())

    def media_reads(self, since: int = 0) -> list[str]:
        """Object names whose bytes were downloaded (one entry per request)."""
        names = []
        for method, target, _ in self.requests()[since:]:
            if method == "GET" and "alt=media" in target:
                path = target.split("?", 1)[0]
                names.append(path.split("/o/", 1)[1])
        return names

    def listings(self, since: int = 0) -> list[str]:
        """The query strings of object listings (GET .../o?prefix=...)."""
        return [target.split("?", 1)[1] if "?" in target else ""
                for method, target, _ in self.requests()[since:]
                if method == "GET" and target.split("?", 1)[0].endswith("/o")]


def split(uri: str) -> tuple[str, str]:
    assert uri.startswith("gs://"), uri
    bucket, _, name = uri[len("gs://"):].partition("/")
    return bucket, name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator_env(endpoint: str) -> Iterator[None]:
    """STORAGE_EMULATOR_HOST set for this process and the ones it starts."""
    before = os.environ.get(EMULATOR_ENV)
    os.environ[EMULATOR_ENV] = endpoint
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(EMULATOR_ENV, None)
        else:
            os.environ[EMULATOR_ENV] = before


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """A running emulator with STORAGE_EMULATOR_HOST pointing at it."""
    from transforms.gcs_auth import use_anonymous_gcs_if_emulated
    server = GcsEmulator(tmp_path_factory.mktemp("gcs_emulator"))
    server.start()
    try:
        with emulator_env(server.endpoint):
            # What the CLI and every worker process do on start (the package
            # imports in this process ran before the variable was set).
            assert use_anonymous_gcs_if_emulated()
            yield server
    finally:
        alive = server.stop()
    assert server.process.poll() is not None, "the emulator is still running"
    assert not alive, f"processes left behind by the emulator: {alive}"


# --- network guard ---------------------------------------------------------------

_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "")


def _is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    host = str(host)
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost: a lookup leaving the box


class NetworkGuard:
    """Records non-loopback connections / lookups and google.auth.default()
    calls made by this process while active (`with guard.watch(): ...`)."""
    _installed = False
    _current: Optional["NetworkGuard"] = None
    _lock = threading.Lock()

    def __init__(self):
        self.outside: list[str] = []
        self.credential_searches: list[str] = []

    @classmethod
    def _install(cls) -> None:
        if not cls._installed:
            sys.addaudithook(cls._audit)  # cannot be removed: it checks _current
            cls._installed = True

    @classmethod
    def _audit(cls, event: str, args) -> None:
        guard = cls._current
        if guard is None:
            return
        if event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and not _is_loopback(address[0]):
                guard.outside.append(f"connect {address}")
        elif event == "socket.getaddrinfo":
            if not _is_loopback(args[0]):
                guard.outside.append(f"getaddrinfo {args[0]!r}")
        elif event == "socket.gethostbyname":
            if not _is_loopback(args[0]):
                guard.outside.append(f"gethostbyname {args[0]!r}")

    @contextlib.contextmanager
    def watch(self, monkeypatch=None):
        import google.auth
        self._install()
        real_default = google.auth.default

        def recording_default(*args, **kwargs):
            self.credential_searches.append(f"google.auth.default{kwargs}")
            return real_default(*args, **kwargs)

        google.auth.default = recording_default
        with NetworkGuard._lock:
            NetworkGuard._current = self
        try:
            yield self
        finally:
            NetworkGuard._current = None
            google.auth.default = real_default


def forget_beam_credentials() -> None:
    """Make this process look fresh to Beam: credentials not yet searched.

    Without this, an earlier test's search (or the product's own setting)
    would hide whether a run searches for credentials by itself.
    """
    from apache_beam.internal.gcp import auth
    with auth._Credentials._credentials_lock:
        auth._Credentials._credentials = None
        auth._Credentials._credentials_init = False
