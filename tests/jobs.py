"""Helpers to run the real job from tests and read back what it wrote."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from pipeline.cli import main


def sample_photos() -> Path:
    """Real photographs shipped with scikit-image (a test dependency)."""
    import skimage
    return Path(skimage.__file__).parent / "data"


def run_job(*args: str) -> int:
    """The job as `mobilenet-embed run ...` runs it, from this process.

    One in-memory worker unless the test asks for another layout: the same
    stages as the default multi-process local run (tests/test_dataflow.py and
    tests/test_gcs.py compare the two), without starting a worker process and
    loading a model per job.
    """
    args = [str(a) for a in args]
    if not any(a.startswith("--direct_") for a in args):
        args += ["--direct_running_mode", "in_memory"]
    return main(["run", "--progress", "off", *args])


def read_embeddings(output: Path):
    return ds.dataset(str(output / "embeddings"), format="parquet").to_table()


def read_errors(output: Path):
    folder = output / "errors"
    if not folder.exists() or not any(folder.iterdir()):
        return None
    return ds.dataset(str(folder), format="parquet").to_table()


def summary(output: Path) -> dict:
    return json.loads((output / "run_summary.json").read_text())


def matrix(table, column: str) -> np.ndarray:
    """A fixed_size_list column as a 2-D float32 array."""
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), col.type.list_size)


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), folder)
                  for d, _, fs in os.walk(folder) for f in fs)
