"""The runner glue every pipeline shares (pipeline/runner.py)."""
import apache_beam as beam
import pytest

from pipeline.runner import BeamRun, run_pipeline
from pipeline.search.errors import SearchError, SearchJobFailed


def test_local_default_is_fnapi_never_prism():
    run = BeamRun.from_argv([])
    assert run.runner == "FnApiRunner" and run.is_local
    assert run.local_workers >= 1 and not run.dry_run
    assert BeamRun.from_argv(["--runner", "DirectRunner"]).runner == "FnApiRunner"


def test_explicit_in_memory_is_one_worker():
    run = BeamRun.from_argv(["--direct_running_mode", "in_memory"])
    assert run.local_workers == 1


def test_unknown_flag_is_one_line_error_and_embed_flags_are_not_beam_flags():
    with pytest.raises(SearchError, match="--no_such_flag"):
        BeamRun.from_argv(["--no_such_flag", "1"])
    with pytest.raises(SearchError, match="--model"):
        BeamRun.from_argv(["--model", "1.0_224"])


def test_dataflow_dry_run_is_not_local():
    run = BeamRun.from_argv(["--runner", "DataflowRunner", "--dry_run"])
    assert run.dry_run and not run.is_local and run.local_workers is None


def test_run_pipeline_runs_and_reports_failure_in_one_line(tmp_path):
    out = tmp_path / "seen"
    run = BeamRun.from_argv(["--direct_running_mode", "in_memory"])

    def ok(p):
        (p | beam.Create([1, 2, 3]) | beam.Map(lambda x: out.mkdir(exist_ok=True)))
    assert run_pipeline(ok, run, "test") is True
    assert out.is_dir()

    def boom(x):
        raise ValueError("shard 7 is damaged\nsecond line")

    with pytest.raises(SearchJobFailed) as e:
        run_pipeline(lambda p: p | beam.Create([1]) | beam.Map(boom), run, "test")
    assert "the test pipeline failed" in str(e.value)
    assert "\n" not in str(e.value)


def test_dry_run_builds_without_running(tmp_path):
    run = BeamRun.from_argv(["--direct_running_mode", "in_memory", "--dry_run"])
    ran = tmp_path / "ran"
    assert run_pipeline(lambda p: p | beam.Create([1]) | beam.Map(
        lambda x: ran.mkdir()), run, "test") is False

    assert not ran.exists()
