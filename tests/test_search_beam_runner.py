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


def test_a_killed_worker_ends_index_in_one_line_exit_3(tmp_path):
    """issue 25 (1): kill -9 of one sdk_worker_main child during the add
    stage left the launcher waiting forever. Now: exit 3, one line naming
    the dead worker and that a rerun resumes, no traceback. The 240 s limit
    is a hang guard, not a speed bound (it ends in about 30 s)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    import numpy as np
    import psutil

    from synthetic_dataset import write_dataset
    root = tmp_path / "ds"
    vectors = np.random.default_rng(0).standard_normal((40000, 64)).astype("float32")
    write_dataset(root, vectors, [f"id{i}" for i in range(len(vectors))], rows_per_part=5000)
    # The console as a user sees it (the tests' raw stderr switched off).
    env = {k: v for k, v in os.environ.items() if k != "MOBILENET_EMBED_RAW_STDERR"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "index", str(root), "--index_key", "IVF16,Flat",
         "--shards", "4", "--direct_num_workers", "2",
         "--direct_running_mode", "multi_processing"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True).start()
    killed, start = None, time.monotonic()
    try:
        while launcher.poll() is None and time.monotonic() - start < 240:
            if killed is None and any(line.startswith("adding ") for line in lines):
                time.sleep(1)
                # This launcher's own workers only (other runs may be on the machine).
                workers = [c.pid for c in psutil.Process(launcher.pid).children(recursive=True)
                           if "sdk_worker_main" in " ".join(c.cmdline())]
                if workers:
                    killed = workers[0]
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.2)
        assert launcher.poll() is not None, "the launcher hung after a worker died"
    finally:
        if launcher.poll() is None:
            launcher.kill()
    time.sleep(0.5)
    assert killed is not None, lines
    assert launcher.returncode == 3, lines
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and "worker" in errors[0] and "rerun resumes" in errors[0], lines
    assert not any("Traceback" in line for line in lines), lines
