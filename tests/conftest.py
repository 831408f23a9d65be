"""Test session set-up: TensorFlow runs as the command line runs it.

Set before any test imports TensorFlow (see transforms.inference's
tensorflow_environment): the in-process jobs and the direct model calls the
tests compare them with then use the same kernels as `mobilenet-embed`.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests capture descriptor 2 themselves (capfd): no console filter in front.
os.environ.setdefault("MOBILENET_EMBED_RAW_STDERR", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _own_model_caches(tmp_path_factory):
    """This test session's model caches, in its own temporary folder: never
    the system-wide ones a user's runs or the benchmarks fill. Tests about
    caching itself set their own per test."""
    caches = tmp_path_factory.mktemp("caches")
    saved = {k: os.environ.get(k) for k in ("MOBILENET_EMBED_CACHE_DIR",
                                            "TFHUB_CACHE_DIR")}
    os.environ["MOBILENET_EMBED_CACHE_DIR"] = str(caches / "models")
    os.environ["TFHUB_CACHE_DIR"] = str(caches / "tfhub")
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
