"""A default run's console is the progress line and the summary; --verbose
brings back what TensorFlow, absl and Beam's workers print."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from jobs import sample_photos
from pipeline.console import is_noise

NATIVE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:|absl::InitializeLog|cuInit|"
                    r"semi_persistent_directory")


def _run(tmp_path, *extra):
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for src in sorted(sample_photos().glob("*.png"))[:3]:
        shutil.copy(src, folder / src.name)
    env = {k: v for k, v in os.environ.items()
           if k not in ("MOBILENET_EMBED_RAW_STDERR", "TF_CPP_MIN_LOG_LEVEL")}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", str(folder),
         "--output", str(tmp_path / f"out{len(extra)}"), "--model",
         "mobilenet_v2_035_96", "--model_source", "random",
         "--direct_running_mode", "multi_processing", "--direct_num_workers", "2",
         "--progress", "on", *extra],
        capture_output=True, text=True, env=env, timeout=600)


def test_default_console_is_progress_and_summary(tmp_path):
    quiet = _run(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    lines = quiet.stderr.splitlines()
    assert not [line for line in lines if NATIVE.search(line)], lines
    assert any(line.startswith("progress: ") for line in lines)
    assert any(line.startswith("embedded: 3") for line in lines)
    verbose = _run(tmp_path, "--verbose")
    assert verbose.returncode == 0, verbose.stderr
    # What was hidden is really there without the filter.
    assert any(NATIVE.search(line) for line in verbose.stderr.splitlines())


def test_the_filter_keeps_real_errors():
    assert is_noise(b"I0000 00:00:1795828758.526050   11190 cudart_stub.cc:31] "
                    b"Could not find cuda drivers on your machine")
    assert is_noise(b"E0000 00:00:1795828771.475397   11239 cuda_platform.cc:52] "
                    b"failed call to cuInit: INTERNAL: CUDA error")
    assert not is_noise(b"E0000 00:00:1795828771.475397   11239 bfc_allocator.cc:1] "
                        b"Out of memory while trying to allocate")
    assert not is_noise(b"progress: 3 images done (3 embedded, 0 failed)")
    assert not is_noise(b"Traceback (most recent call last):")
