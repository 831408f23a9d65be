"""Where the shared reference data lives, and the marker for tests needing it.

../shared (beside the repository) holds real photographs and real-weights
models. It is not part of the project: where it is absent, the tests that
need it skip with that reason and every other test still runs.
"""
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
SHARED_MODEL = SHARED / "models" / "mobilenet_v2_100_224"

needs_shared = pytest.mark.skipif(
    not (SAMPLE / "labels.csv").exists() or not SHARED_MODEL.exists(),
    reason=f"needs the shared photos and models at {SHARED} (absent here)")
