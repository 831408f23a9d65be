"""The whole command as a user runs it, timed from outside.

    python -m pipeline run --input DIR --output FRESH_DIR --model M --model_source random

Each run: wall time from just before the command starts to its exit; peak
RSS of the process tree (polled); CPU seconds of the tree; how busy the
machine was; the first embedded row's `event_timestamp` (start-up = that
minus the command's start); rows and Parquet bytes.

Throughput is the marginal rate between two runs, (N2 - N1) / (T2 - T1), so
the fixed cost (imports, model loading, graph set-up) cancels. A second
estimate comes from inside one run: rows between the 10th and 90th
percentile of their event_timestamp over that time span.
"""
from __future__ import annotations

import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from benchmarks.env import ROOT, Stopwatch
from benchmarks.workers import QUIET_LOAD

# Explicit layouts; a command without them runs as the job decides.
SINGLE_PROCESS = ("--direct_running_mode", "in_memory")
MULTI_PROCESS = ("--direct_running_mode", "multi_processing",
                 "--direct_num_workers", "2")


@dataclass(frozen=True)
class Case:
    """One way to run the job; `args` and `env` are added to the command."""
    name: str
    model: str
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    source: tuple[str, ...] = ("--model_source", "random")


@dataclass
class Run:
    case: str
    images: int
    exit_code: int
    wall_s: float
    first_row_s: float | None
    peak_rss_mb: float  # the process tree
    peak_rss_launcher_mb: float  # the command's own process
    cpu_s: float
    foreign_load: float  # busy cores that were not this run's
    rows: int
    parquet_bytes: int
    in_run_images_per_s: float | None
    log: str = field(repr=False, default="")


class RssPoller(threading.Thread):
    """Peak resident memory of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self._root = psutil.Process(pid)
        self._interval = interval
        self._stop_event = threading.Event()
        self.peak_bytes = 0
        self.peak_root_bytes = 0  # the launcher alone

    def _rss(self) -> tuple[int, int]:
        """(whole tree, root alone) resident bytes now."""
        try:
            processes = [self._root] + self._root.children(recursive=True)
        except psutil.Error:
            return 0, 0
        sizes = []
        for process in processes:
            try:
                sizes.append(process.memory_info().rss)
            except psutil.Error:
                sizes.append(0)  # exited between listing and reading
        return sum(sizes), sizes[0]

    def run(self):
        while not self._stop_event.is_set():
            tree, root = self._rss()
            self.peak_bytes = max(self.peak_bytes, tree)
            self.peak_root_bytes = max(self.peak_root_bytes, root)
            self._stop_event.wait(self._interval)

    def stop(self):
        self._stop_event.set()
        self.join()


def command(case: Case, input_dir: Path, output_dir: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--input", str(input_dir),
            "--output", str(output_dir), "--model", case.model, *case.source,
            *case.args]


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(case: Case, input_dir: Path, images: int, work: Path,
             timeout_s: float = 900) -> Run:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", case.name)
    output = work / "e2e_out" / f"{slug}-{images}"
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    log_path = work / "logs" / f"e2e-{slug}-{images}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **dict(case.env))
    cpu0 = _children_cpu_s()
    with open(log_path, "w") as log, Stopwatch() as watch:
        started = time.time()
        process = subprocess.Popen(command(case, input_dir, output), cwd=ROOT,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
        poller = RssPoller(process.pid)
        poller.start()
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        poller.stop()
    cpu = _children_cpu_s() - cpu0
    rows, parquet_bytes, times = _read_output(output)
    shutil.rmtree(output, ignore_errors=True)
    return Run(case=case.name, images=images, exit_code=code,
               wall_s=round(watch.window.wall_s, 2),
               first_row_s=round(min(times) - started, 2) if times else None,
               peak_rss_mb=round(poller.peak_bytes / 2**20, 1),
               peak_rss_launcher_mb=round(poller.peak_root_bytes / 2**20, 1),
               cpu_s=round(cpu, 1),
               foreign_load=round(max(0.0, watch.window.machine_busy_s - cpu)
                                  / watch.window.wall_s, 2),
               rows=rows, parquet_bytes=parquet_bytes,
               in_run_images_per_s=_in_run_rate(times), log=str(log_path))


def quiet_run(case: Case, input_dir: Path, images: int, work: Path,
              tries: int = 2) -> Run:
    """`run_once`, again if other processes loaded the machine; the quieter
    run is kept."""
    best = None
    for _ in range(tries):
        run = run_once(case, input_dir, images, work)
        if best is None or run.foreign_load < best.foreign_load:
            best = run
        if run.foreign_load <= QUIET_LOAD:
            break
    return best


def _read_output(output: Path) -> tuple[int, int, list[float]]:
    """(rows, Parquet bytes, event times in epoch seconds) of embeddings/."""
    import pyarrow.parquet as pq
    files = sorted((output / "embeddings").glob("*.parquet"))
    rows, size, times = 0, 0, []
    for path in files:
        size += path.stat().st_size
        column = pq.read_table(path, columns=["event_timestamp"]).column(0)
        rows += len(column)
        times += [t.timestamp() for t in column.to_pylist()]
    return rows, size, times


def _in_run_rate(times: list[float]) -> float | None:
    """Rows per second between the 10th and 90th percentile of row times."""
    if len(times) < 50:
        return None
    times = sorted(times)
    lo, hi = len(times) // 10, (9 * len(times)) // 10
    span = times[hi] - times[lo]
    return round((hi - lo) / span, 2) if span > 0 else None


def marginal(first: Run, second: Run) -> float | None:
    """(N2 - N1) / (T2 - T1): the rate once start-up is paid."""
    dt = second.wall_s - first.wall_s
    if dt <= 0 or first.exit_code or second.exit_code:
        return None
    return round((second.images - first.images) / dt, 2)


def marginal_after_first_row(first: Run, second: Run) -> float | None:
    """(N2 - N1) over the difference of the times from first row to end: the
    same rate with the start-up's own jitter taken out too. Where a pair's
    extra images take only seconds (a small model), a second more or less of
    start-up swings (N2 - N1) / (T2 - T1) widely; this estimate does not."""
    if first.first_row_s is None or second.first_row_s is None:
        return None
    dt = (second.wall_s - second.first_row_s) - (first.wall_s - first.first_row_s)
    if dt <= 0 or first.exit_code or second.exit_code:
        return None
    return round((second.images - first.images) / dt, 2)


def as_dict(run: Run) -> dict:
    return asdict(run)


def pair(case: Case, sets: dict[int, Path], sizes: tuple[int, int], work: Path,
         progress) -> dict:
    """Runs at N1 and N2 and what follows from them."""
    runs = []
    for n in sizes:
        run = quiet_run(case, sets[n], n, work)
        progress(f"  {case.name} N={n}: {run.wall_s} s, first row at "
                 f"{run.first_row_s} s, peak RSS {run.peak_rss_mb} MB, exit "
                 f"{run.exit_code}, foreign load {run.foreign_load}")
        runs.append(run)
    first, second = runs
    ok = all(r.exit_code == 0 and r.rows == r.images for r in runs)
    return {
        "case": case.name, "model": case.model,
        "args": list(case.source + case.args),
        "env": dict(case.env), "ok": ok,
        "marginal_images_per_s": marginal(first, second) if ok else None,
        "marginal_after_first_row_images_per_s":
            marginal_after_first_row(first, second) if ok else None,
        # CPU of the whole tree per extra image: work done, whatever the load.
        "marginal_cpu_ms_per_image": round(
            1000 * (second.cpu_s - first.cpu_s) / (second.images - first.images),
            2) if ok else None,
        "in_run_images_per_s": second.in_run_images_per_s,
        "start_up_s": first.first_row_s,
        "bytes_per_image": round(second.parquet_bytes / second.rows)
        if second.rows else None,
        "runs": [as_dict(r) for r in runs],
    }

