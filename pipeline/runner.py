"""How every Beam pipeline of the project runs: the embed job, the search
commands (index, dedup) and export.

One parser of Beam's flags (to refuse a flag no options view knows: Beam
itself only warns), the runner rules (locally Beam's FnApiRunner with one
worker process per core, as many as memory allows, never Prism, which
downloads a binary), `--dry_run` (builds the graph without running it), and
a guard against a dead local worker process.

    beam_run = BeamRun.from_argv(beam_argv, memory_per_worker=2 * 2**30)
    run_pipeline(lambda p: p | ..., beam_run, "index")

A dead worker (FnApiRunner multi_processing, a `sdk_worker_main` child
killed, e.g. by the OOM killer): Beam's `SubprocessSdkWorker.run` raises
`RuntimeError: Worker subprocess exited with return code 137` in its own
thread, and the launcher waits forever for the control responses the worker
will never send. `watch_workers()` wraps that method (Beam's seam): the
death is recorded, and if the pipeline has not failed by itself within
DEAD_WORKER_GRACE_S, the launcher prints one line naming the cause and
exits 3. A pipeline that does fail by itself names the dead worker as its
cause instead of Beam's innermost `Empty:`.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
from typing import Callable, Optional

import apache_beam as beam
import psutil
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions,
                                                  TestOptions)

from pipeline.console import root_cause
from pipeline.search.errors import SearchError, SearchJobFailed

LOG = logging.getLogger("mobilenet_embed.runner")
LOCAL_RUNNERS = ("FnApiRunner",)
DEAD_WORKER_GRACE_S = 20.0
DEAD_WORKER_EXIT = 3


# --- Beam's flags -------------------------------------------------------------------

def dry_run_flag(argv: list[str]) -> list[str]:
    """Beam's --dry_run wants a value and reads any text, even "False", as
    true: accept a bare --dry_run and make a false value mean no dry run."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--dry_run":
            value = argv[i + 1] if i + 1 < len(argv) else ""
            if value.lower() in _BOOLEANS:
                i += 1
            else:
                value = "true"
        elif arg.startswith("--dry_run="):
            value = arg.split("=", 1)[1]
        else:
            out.append(arg)
            i += 1
            continue
        if _BOOLEANS.get(value.lower(), True):
            out.append("--dry_run=True")
        i += 1
    return out


_BOOLEANS = {"true": True, "1": True, "yes": True,
             "false": False, "0": False, "no": False}


class BeamFlags(argparse.ArgumentParser):
    """Every PipelineOptions view's flags, to refuse what none of them knows
    and to turn a bad value into one line (`error(message)` raises the
    caller's error class) instead of a usage page."""

    def __init__(self, error_class: type = SearchError):
        super().__init__(allow_abbrev=False, add_help=False)
        self._error_class = error_class

    def add_value_provider_argument(self, *args, **kwargs):
        return self.add_argument(*args, **kwargs)

    def error(self, message):
        raise self._error_class(message)


def unknown_beam_flags(argv: list[str], error_class: type = SearchError,
                       project_views: bool = True) -> list[str]:
    """The flags of `argv` no PipelineOptions view knows. Without
    `project_views`, the embedding job's own views (pipeline.*, transforms.*)
    do not count: their flags mean nothing to the search commands."""
    parser = BeamFlags(error_class)
    views = {str(cls): cls for cls in PipelineOptions.__subclasses__()}
    for cls in views.values():
        if not project_views and cls.__module__.startswith(("pipeline.", "transforms.")):
            continue
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    _, unknown = parser.parse_known_args(argv)
    return unknown


# --- the runner rules ----------------------------------------------------------------

def choose_runner(options: PipelineOptions) -> str:
    """Beam's DirectRunner tries the Prism runner first, which downloads a
    binary at start: offline that fails or hangs. FnApiRunner is Beam's own
    local batch runner and needs no network."""
    standard = options.view_as(StandardOptions)
    if standard.runner in (None, "DirectRunner", "SwitchingDirectRunner"):
        if standard.runner:
            LOG.info("running %s as FnApiRunner (no Prism download)",
                     standard.runner)
        standard.runner = "FnApiRunner"
    return standard.runner


def local_workers(options: PipelineOptions, argv: list[str],
                  memory_per_worker: float,
                  runner: Optional[str] = None) -> Optional[int]:
    """On a local runner, one worker process per core as memory allows
    (unless --direct_running_mode/--direct_num_workers say otherwise); the
    number of worker processes, None on a remote runner. `runner`: the one
    chosen already, where the options do not name it yet."""
    if (runner or options.view_as(StandardOptions).runner) not in LOCAL_RUNNERS:
        return None
    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    if not any(a.split("=")[0] in ("--direct_running_mode", "--direct_num_workers")
               for a in argv):
        workers = min(cores, max(1, int(
            psutil.virtual_memory().available // memory_per_worker)))
        if workers >= 2:
            direct.direct_running_mode = "multi_processing"
            direct.direct_num_workers = workers
    if direct.direct_running_mode in (None, "in_memory"):
        return 1
    return max(1, direct.direct_num_workers or cores)


@dataclasses.dataclass
class BeamRun:
    """How a pipeline runs: options, runner, dry run, and the number of
    local worker processes (None on a remote runner)."""
    options: PipelineOptions
    runner: str
    dry_run: bool
    local_workers: Optional[int]
    argv: list

    @property
    def is_local(self) -> bool:
        return self.runner in LOCAL_RUNNERS

    @classmethod
    def from_argv(cls, beam_argv: list[str],
                  memory_per_worker: float = 2 * 2**30) -> "BeamRun":
        argv = dry_run_flag(list(beam_argv))
        unknown = unknown_beam_flags(argv, SearchError, project_views=False)
        if unknown:
            raise SearchError(f"unknown option(s): {' '.join(unknown)} (Beam's "
                              "own options pass through, e.g. --runner)")
        options = PipelineOptions(argv)
        dry_run = bool(options.view_as(TestOptions).dry_run)
        runner = choose_runner(options)
        workers = local_workers(options, argv, memory_per_worker)
        return cls(options, runner, dry_run, workers, argv)

    def describe(self) -> str:
        if self.local_workers is not None:
            return (f"{self.runner}, {self.local_workers} local worker "
                    f"process{'es' if self.local_workers != 1 else ''}")
        return self.runner


# --- a dead local worker -------------------------------------------------------------

_dead: list[str] = []
_dead_event = threading.Event()
_watch_lock = threading.Lock()
_watching = False


def watch_workers() -> None:
    """Wrap Beam's SubprocessSdkWorker.run (once per process) so that a
    worker process that dies is recorded instead of a thread traceback."""
    global _watching
    with _watch_lock:
        if _watching:
            return
        from apache_beam.runners.portability import local_job_service
        original = local_job_service.SubprocessSdkWorker.run

        def run(self):
            try:
                original(self)
            except RuntimeError as e:  # "Worker subprocess exited with return code N"
                LOG.debug("Beam worker %s ended", self._worker_id, exc_info=True)
                _dead.append(f"worker {self._worker_id or '?'}: {e}")
                _dead_event.set()

        local_job_service.SubprocessSdkWorker.run = run
        _watching = True


def dead_worker_cause() -> Optional[str]:
    """One line on the local worker processes that died, if any did."""
    if not _dead:
        return None
    codes = "; ".join(_dead)
    return (f"a Beam worker process died ({codes}; 137 or -9: killed, e.g. "
            "out of memory or kill -9)")


class _DeadWorkerGuard(threading.Thread):
    """Exits the launcher (code 3, one line) when a worker died and the
    pipeline did not fail by itself within the grace time: Beam's
    FnApiRunner would wait for that worker forever."""

    def __init__(self, what: str, advice: str):
        super().__init__(daemon=True, name="dead-worker-guard")
        self.what, self.advice = what, advice
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            if _dead_event.wait(0.5):
                break
        if self.done.wait(DEAD_WORKER_GRACE_S):
            return
        sys.stderr.write(f"error: the {self.what} pipeline failed: "
                         f"{dead_worker_cause()}; {self.advice}\n")
        sys.stderr.flush()
        os._exit(DEAD_WORKER_EXIT)  # pylint: disable=protected-access


def wait_guarded(result_or_run: Callable, what: str, advice: str):
    """Call `result_or_run()` (Beam's run / wait_until_finish) with the dead
    worker guard on; returns what it returns."""
    watch_workers()
    guard = _DeadWorkerGuard(what, advice)
    guard.start()
    try:
        return result_or_run()
    finally:
        guard.done.set()


def failure_cause(error: BaseException) -> str:
    """One line on why a pipeline failed: a dead worker first (Beam's own
    innermost error is then only `Empty:`), else the innermost error."""
    return dead_worker_cause() or root_cause(error)


RERUN = "a rerun resumes"


def run_pipeline(build: Callable[[beam.Pipeline], None], beam_run: BeamRun,
                 what: str) -> bool:
    """Build the graph with `build(p)` and run it to the end. Returns False
    for a dry run (graph built, nothing run). Beam's option errors are a
    SearchError (exit 2); a failure while running is SearchJobFailed (exit 3)
    naming the innermost cause in one line."""
    try:
        p = beam.Pipeline(options=beam_run.options)
    except ValueError as e:  # Beam's checks: project id, region, temp_location
        raise SearchError(" ".join(str(e).split())) from None
    build(p)
    if beam_run.dry_run and beam_run.is_local:
        LOG.info("%s: dry run, the graph was built; nothing was run", what)
        return False
    try:
        def go():
            result = p.run()  # with --dry_run, Dataflow builds the job, submits nothing
            if beam_run.dry_run:
                return None
            result.wait_until_finish()
            return result
        result = wait_guarded(go, what, RERUN)
        if result is None:
            LOG.info("%s: dry run, the graph was built; nothing was run", what)
            return False
    except (KeyboardInterrupt, SystemExit):
        raise
    except SearchError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        LOG.debug("%s pipeline failed", what, exc_info=True)
        raise SearchJobFailed(f"the {what} pipeline failed: {failure_cause(e)}; "
                              f"{RERUN} (--verbose for the traceback)") from None
    return True
