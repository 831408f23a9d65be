"""Where the time of a single-process run goes, from py-spy samples.

py-spy samples every thread's Python stack (idle ones too, with --idle) at a
fixed rate, from outside the process, so the job runs unmodified. In a
single-process run the main thread is both the launcher and the only Beam
worker: its samples are the run's wall time, and each is put in one
category by the rules below.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.env import ROOT

RATE_HZ = 50

# Phases, decided by any frame of the stack (checked in this order).
_PHASES = (
    ("start-up: launcher (checks, model load)", "pipeline/job.py", "plan"),
    ("start-up: worker model load", "transforms/inference.py", "load_model"),
    ("start-up: worker model load", "apache_beam/ml/inference/base.py", "setup"),
    ("summary and finalize", "transforms/report.py", "process"),
)
# Stages inside the run, decided by the innermost frame that matches.
_STAGES = (
    ("inference (TensorFlow)", "transforms/model/loading.py", "predict"),
    ("inference (TensorFlow)", "tensorflow/", None),
    ("top-5 and result rows", "transforms/inference.py", "top_k"),
    ("top-5 and result rows", "transforms/inference.py", "_result"),
    ("batching (np.stack of pixels)", "transforms/inference.py", "run_inference"),
    ("batching (Beam BatchElements)", "apache_beam/transforms/util.py", None),
    ("read", "transforms/decode.py", "read_bytes"),
    ("resize", "PIL/Image.py", "resize"),
    ("decode (Pillow)", "PIL/", None),
    ("decode (Pillow)", "transforms/decode.py", "decode_and_resize"),
    ("sha256 of the file", "transforms/decode.py", "_decode"),
    ("Parquet writing", "transforms/write.py", None),
    ("Parquet writing", "pyarrow/", None),
    ("listing", "transforms/listing.py", None),
    ("listing", "apache_beam/io/", None),
    ("progress line", "transforms/report.py", None),
)


def _frames(stack: str) -> list[tuple[str, str]]:
    """'func (file:line);...' outermost first -> [(func, file)]."""
    out = []
    for frame in stack.split(";")[1:]:  # the first item names the thread
        func, _, rest = frame.partition(" (")
        out.append((func.split(".")[-1], rest.rsplit(":", 1)[0]))
    return out


def _matches(frame: tuple[str, str], path_part: str, func: str | None) -> bool:
    return path_part in frame[1] and (func is None or frame[0] == func)


def categorize(frames: list[tuple[str, str]]) -> str:
    if not frames:  # interpreter start-up or exit, native code only
        return "interpreter start and exit (no Python frame)"
    for name, path_part, func in _PHASES:
        if any(_matches(f, path_part, func) for f in frames):
            return name
    if not any(_matches(f, "pipeline/job.py", "run") for f in frames):
        if any("importlib" in f[1] or f[1].startswith("<frozen") for f in frames):
            return "start-up: Python imports"
        return "command line, other"
    for frame in reversed(frames):
        for name, path_part, func in _STAGES:
            if _matches(frame, path_part, func):
                return name
    return "Beam overhead (runner, coders, bundles)"


def breakdown(raw_path: Path) -> dict:
    """Seconds per category in the main thread's samples."""
    seconds: collections.Counter = collections.Counter()
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack.split(";")[0].endswith("MainThread"):
            continue
        seconds[categorize(_frames(stack))] += int(count) / RATE_HZ
    total = sum(seconds.values())
    return {"total_s": round(total, 1),
            "seconds": {k: round(v, 2) for k, v in seconds.most_common()},
            "percent": {k: round(100 * v / total, 1)
                        for k, v in seconds.most_common()}}


def run(input_dir: Path, images: int, model: str, work: Path) -> dict:
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) \
        or shutil.which("py-spy")
    if not py_spy:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    output = work / "profile_out"
    shutil.rmtree(output, ignore_errors=True)
    raw = work / f"profile-{model}.txt"
    batches = work / f"profile-{model}-batches.json"
    log = work / "logs" / f"profile-{model}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [py_spy, "record", "--idle", "--threads", "--format", "raw",
           "--rate", str(RATE_HZ), "-o", str(raw), "--",
           sys.executable, "-m", "benchmarks.profile_target", str(batches),
           "run", "--input", str(input_dir), "--output", str(output),
           "--model", model, "--model_source", "random", "--progress", "off",
           "--direct_running_mode", "in_memory"]
    with open(log, "w") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              timeout=900).returncode
    shutil.rmtree(output, ignore_errors=True)
    if code != 0 or not raw.exists():
        return {"skipped": f"py-spy run failed (exit {code}); see {log}"}
    result = breakdown(raw)
    result.update(model=model, images=images, rate_hz=RATE_HZ,
                  batch_sizes=json.loads(batches.read_text()))
    return result
