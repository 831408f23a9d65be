"""Search commands as Beam pipelines, with the embedding job's runner rules.

The commands take their own flags plus any of Beam's (`--runner`,
`--project`, `--region`, `--temp_location`, `--direct_num_workers`, ...);
`--dry_run` builds the graph without running it. Locally the default is
Beam's FnApiRunner with one worker process per core (as many as memory
allows at `memory_per_worker`), never Prism, which downloads a binary.

    beam_run = BeamRun.from_argv(beam_argv, memory_per_worker=2 * 2**30)
    run_pipeline(lambda p: p | ..., beam_run, "index")
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import Callable, Optional

import apache_beam as beam
import psutil
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions,
                                                  TestOptions)

from pipeline.console import root_cause
from pipeline.search.errors import SearchError, SearchJobFailed

LOG = logging.getLogger("mobilenet_embed.search")
LOCAL_RUNNERS = ("FnApiRunner",)


class _BeamFlags(argparse.ArgumentParser):
    """Every PipelineOptions view's flags (the project's own views aside),
    to refuse a flag none of them knows: Beam itself only warns."""

    def add_value_provider_argument(self, *args, **kwargs):
        return self.add_argument(*args, **kwargs)

    def error(self, message):
        raise SearchError(message)


def _known_beam_flags() -> _BeamFlags:
    parser = _BeamFlags(allow_abbrev=False, add_help=False)
    for cls in PipelineOptions.__subclasses__():
        if cls.__module__.startswith(("pipeline.", "transforms.")):
            continue  # the embedding job's own flags mean nothing here
        cls._add_argparse_args(parser)  # pylint: disable=protected-access
    return parser


@dataclasses.dataclass
class BeamRun:
    """How a search command's pipeline runs: options, runner, dry run, and
    the number of local worker processes (None on a remote runner)."""
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
        from pipeline.cli import _dry_run_flag  # bare --dry_run, as `run` takes it
        argv = _dry_run_flag(list(beam_argv))
        _, unknown = _known_beam_flags().parse_known_args(argv)
        if unknown:
            raise SearchError(f"unknown option(s): {' '.join(unknown)} (Beam's "
                              "own options pass through, e.g. --runner)")
        options = PipelineOptions(argv)
        dry_run = bool(options.view_as(TestOptions).dry_run)
        standard = options.view_as(StandardOptions)
        if standard.runner in (None, "DirectRunner", "SwitchingDirectRunner"):
            standard.runner = "FnApiRunner"  # no Prism download offline
        workers = None
        if standard.runner in LOCAL_RUNNERS:
            direct = options.view_as(DirectOptions)
            if not any(a.split("=")[0] in ("--direct_running_mode",
                                           "--direct_num_workers")
                       for a in argv):
                cores = os.cpu_count() or 1
                workers = min(cores, max(1, int(
                    psutil.virtual_memory().available // memory_per_worker)))
                if workers >= 2:
                    direct.direct_running_mode = "multi_processing"
                    direct.direct_num_workers = workers
            if direct.direct_running_mode in (None, "in_memory"):
                workers = 1
            else:
                workers = max(1, direct.direct_num_workers or os.cpu_count() or 1)
        return cls(options, standard.runner, dry_run, workers, argv)

    def describe(self) -> str:
        if self.local_workers is not None:
            return (f"{self.runner}, {self.local_workers} local worker "
                    f"process{'es' if self.local_workers != 1 else ''}")
        return self.runner


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
        result = p.run()  # with --dry_run, Dataflow builds the job, submits nothing
        if beam_run.dry_run:
            LOG.info("%s: dry run, the graph was built; nothing was run", what)
            return False
        result.wait_until_finish()
    except (KeyboardInterrupt, SystemExit):
        raise
    except SearchError:
        raise
    except Exception as e:  # pylint: disable=broad-except
        LOG.debug("%s pipeline failed", what, exc_info=True)
        raise SearchJobFailed(f"the {what} pipeline failed: {root_cause(e)} "
                              "(--verbose for the traceback)") from None
    return True
