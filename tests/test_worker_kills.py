"""issue 25 (1, 2): kill -9 of one Beam worker during `dedup` or `export`
ends the command within bounded time, exit 3, one line naming the dead
worker and that a rerun resumes, no traceback; the rerun then completes
with every row once. (`index` has the same test in
test_search_beam_runner.py.) The 240 s limit guards against a hang; it is
no speed bound (each run ends in about 30 s)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from synthetic_dataset import write_dataset

ROWS = 40000


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills") / "ds"
    vectors = np.random.default_rng(0).standard_normal((ROWS, 64)).astype("float32")
    write_dataset(root, vectors, [f"id{i}" for i in range(ROWS)], rows_per_part=5000)
    return root


def _run(args: list[str], kill_after: float | None) -> tuple[int, list[str], bool]:
    """Run `python -m pipeline ARGS` on 2 local worker processes as a user's
    console shows it; `kill_after` s after its first worker appears, kill -9
    that worker. (exit code, output lines, whether a worker was killed)."""
    import psutil
    env = {k: v for k, v in os.environ.items() if k != "MOBILENET_EMBED_RAW_STDERR"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args, "--direct_num_workers", "2",
         "--direct_running_mode", "multi_processing"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
    reader.start()
    killed, seen, start = False, None, time.monotonic()
    try:
        while launcher.poll() is None and time.monotonic() - start < 240:
            if kill_after is not None and not killed:
                workers = []
                for child in psutil.Process(launcher.pid).children(recursive=True):
                    try:
                        if "sdk_worker_main" in " ".join(child.cmdline()):
                            workers.append(child.pid)
                    except psutil.Error:  # gone or a zombie meanwhile
                        continue
                if workers and seen is None:
                    seen = time.monotonic()
                if workers and time.monotonic() - seen >= kill_after:
                    os.kill(workers[0], signal.SIGKILL)
                    killed = True
            time.sleep(0.2)
        assert launcher.poll() is not None, "the launcher hung after a worker died"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    reader.join(timeout=5)
    return launcher.returncode, lines, killed


def _ends_in_one_line(code: int, lines: list[str], killed: bool) -> None:
    assert killed, lines
    assert code == 3, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert "worker" in errors[0] and "rerun resumes" in errors[0], lines
    assert not any("Traceback" in line for line in lines), lines


def test_a_killed_worker_ends_export_in_one_line_and_the_rerun_holds_every_row(
        dataset, tmp_path):
    to = tmp_path / "vertex"
    args = ["export", str(dataset), "--format", "vertex", "--to", str(to)]
    _ends_in_one_line(*_run(args, kill_after=1.0))
    code, lines, _ = _run(args, kill_after=None)
    assert code == 0, lines
    ids = []
    for path in sorted(to.glob("*.json")):
        ids += [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert len(ids) == ROWS and len(set(ids)) == ROWS


def test_a_killed_worker_ends_dedup_in_one_line_and_the_rerun_completes(dataset, tmp_path):
    to = tmp_path / "dups"
    args = ["dedup", str(dataset), "--to", str(to)]
    _ends_in_one_line(*_run(args, kill_after=1.0))
    code, lines, _ = _run(args, kill_after=None)
    assert code == 0, lines
    assert any("duplicate pairs" in line for line in lines), lines
