"""Report stage: progress while the job runs, the run summary at its end.

Progress: every worker process writes its running counts to a small JSON file
in a local progress folder (local runners only); the launcher's
`ProgressMonitor` adds them up and prints one line every couple of seconds.
Files rather than shared memory, so multi-process local runs report too.

Summary: `Summarize` runs once after every file is committed. It has the
dataset finalize the run (transforms/dataset.py), checks that every listed
image is accounted for, and writes run_summary.json.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
import time
import uuid
from collections import Counter

import apache_beam as beam

from transforms import listing
from transforms.dataset import EMBEDDINGS, ERRORS, CommittedFile, Dataset

PROGRESS_PREFIX = "mobilenet_embed_progress_"


class ProgressTracker:
    """Per-process running counts, flushed to <dir>/<pid>.json at most 1/s."""
    _instances: dict[str, "ProgressTracker"] = {}
    _lock = threading.Lock()

    @classmethod
    def for_dir(cls, directory: str) -> "ProgressTracker":
        with cls._lock:
            if directory not in cls._instances:
                cls._instances[directory] = cls(directory)
            return cls._instances[directory]

    def __init__(self, directory: str):
        self._path = os.path.join(directory, f"{os.getpid()}-{uuid.uuid4().hex[:6]}.json")
        self._counts: Counter = Counter()
        self._last_flush = 0.0
        self._lock = threading.Lock()

    def add(self, kind: str, n: int) -> None:
        with self._lock:
            self._counts[kind] += n
            now = time.monotonic()
            if now - self._last_flush >= 1.0:
                self._flush(now)

    def _flush(self, now: float) -> None:
        self._last_flush = now
        temp = self._path + ".tmp"
        try:
            with open(temp, "w") as f:
                json.dump(dict(self._counts), f)
            os.replace(temp, self._path)
        except OSError:
            pass  # progress is best effort; the summary is the record

    def flush(self) -> None:
        with self._lock:
            self._flush(time.monotonic())


class CountProgress(beam.DoFn):
    """Pass-through that feeds the progress line (local runs)."""

    def __init__(self, directory: str, kind: str):
        self._directory = directory
        self._kind = kind

    def setup(self):
        os.makedirs(self._directory, exist_ok=True)
        self._tracker = ProgressTracker.for_dir(self._directory)

    def process(self, element):
        self._tracker.add(self._kind, 1)
        yield element

    def finish_bundle(self):
        self._tracker.flush()


class ProgressMonitor(threading.Thread):
    """Launcher side: one status line on stderr while the job runs."""

    def __init__(self, directory: str, interval: float = 2.0, stream=None):
        super().__init__(daemon=True, name="progress")
        self._directory = directory
        self._interval = interval
        self._stream = stream or sys.stderr
        self._stop_event = threading.Event()
        self._start = time.monotonic()

    def totals(self) -> Counter:
        total: Counter = Counter()
        try:
            names = os.listdir(self._directory)
        except OSError:
            return total
        for name in names:
            if name.endswith(".json"):
                try:
                    with open(os.path.join(self._directory, name)) as f:
                        total.update(json.load(f))
                except (OSError, ValueError):
                    pass
        return total

    def line(self) -> str:
        counts = self.totals()
        done = counts[EMBEDDINGS] + counts[ERRORS]
        elapsed = time.monotonic() - self._start
        rate = done / elapsed if elapsed > 0 else 0.0
        return (f"progress: {done} images done ({counts[EMBEDDINGS]} embedded, "
                f"{counts[ERRORS]} failed), {rate:.1f} images/s, "
                f"{dt.timedelta(seconds=int(elapsed))} elapsed")

    def run(self):
        interactive = self._stream.isatty()
        while not self._stop_event.wait(self._interval):
            text = self.line()
            self._stream.write(("\r" + text) if interactive else text + "\n")
            self._stream.flush()
        if interactive:
            self._stream.write("\n")

    def stop(self):
        self._stop_event.set()
        self.join(timeout=5)


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def failure_rate(counts: dict) -> float:
    """Failed over the distinct images this run listed (embedded now, failed
    now, or already embedded): a re-run of a finished output judges the
    same images the first run did, not only the ones it retried."""
    covered = (counts["embedded"] + counts["failed"]
               + counts[listing.SKIPPED_EXISTING])
    return counts["failed"] / covered if covered else 0.0


class _Summarize(beam.DoFn):
    def __init__(self, dataset: Dataset, run_id: str, started_at: float,
                 header: dict):
        self._dataset = dataset
        self._run_id = run_id
        self._started_at = started_at
        self._header = header

    def process(self, _, committed, stats, redundant):
        committed = list(committed)
        cleanup = self._dataset.finalize(
            self._run_id, committed,
            {path: set(ids) for path, ids in redundant.items()})
        embedded = sum(c.rows for c in committed if c.kind == EMBEDDINGS)
        failures: Counter = Counter()
        for c in committed:
            for (stage, error_class), n in c.failures:
                failures[(stage, error_class)] += n
        failed = sum(failures.values())
        by_stage: Counter = Counter()
        for (stage, _), n in failures.items():
            by_stage[stage] += n
        counts = {name: int(stats.get(name, 0)) for name in listing.COUNTS}
        counts.update(embedded=embedded, failed=failed)
        accounted = (counts[listing.DUPLICATES] + counts[listing.SKIPPED_EXISTING]
                     + embedded + failed)
        wall = time.time() - self._started_at
        summary = dict(self._header)
        summary.update({
            "run_id": self._run_id,
            "started_at": dt.datetime.fromtimestamp(
                self._started_at, dt.timezone.utc).isoformat(timespec="seconds"),
            "finished_at": _utc_now(),
            "wall_seconds": round(wall, 2),
            "images_per_second": round((embedded + failed) / wall, 2) if wall else None,
            "counts": counts,
            "failure_rate": {
                "value": round(failure_rate(counts), 6),
                "over": ("the distinct images this run listed: failed / "
                         "(embedded + failed + skipped_already_embedded)"),
            },
            "accounting": {
                "ok": accounted == counts[listing.ENTRIES],
                "rule": ("entries_listed = duplicates_dropped + "
                         "skipped_already_embedded + embedded + failed"),
                "unaccounted": counts[listing.ENTRIES] - accounted,
            },
            "failures_by_stage": dict(sorted(by_stage.items())),
            "failures_by_reason": {f"{s}/{c}": n for (s, c), n in
                                   sorted(failures.items())},
            "dataset_rows": self._dataset.num_rows(EMBEDDINGS),
            "dataset_error_rows": self._dataset.num_rows(ERRORS),
            "cleanup": cleanup,
        })
        self._dataset.write_summary(summary)
        yield summary


class Summarize(beam.PTransform):
    """(committed files, stats, redundant rows) -> run_summary.json, once."""

    def __init__(self, dataset: Dataset, run_id: str, started_at: float,
                 header: dict):
        super().__init__()
        self._args = (dataset, run_id, started_at, header)

    def expand(self, inputs):
        committed, stats, redundant = inputs
        p = committed.pipeline
        return (p
                | "Once" >> beam.Create([None])
                | "Finalize" >> beam.ParDo(
                    _Summarize(*self._args),
                    committed=beam.pvalue.AsList(committed),
                    stats=beam.pvalue.AsDict(
                        stats | "SumStats" >> beam.CombinePerKey(sum)),
                    redundant=beam.pvalue.AsDict(
                        redundant | "GroupRedundant" >> beam.GroupByKey())))


__all__ = ["CommittedFile", "CountProgress", "ProgressMonitor", "Summarize"]
