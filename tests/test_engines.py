"""The engine that runs the model is chosen by measuring on this machine:
every candidate checked against TensorFlow and timed at the job's batch,
the fastest within parity kept, the choice cached per machine and recorded.
Nothing here depends on which engine is faster on the CPU it runs on."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from transforms.model import engines, loading, onnx_runtime
from transforms.model.loading import ModelSpec

SMALL = "mobilenet_v2_035_96"
needs_openvino = pytest.mark.skipif(not engines.installed("openvino"),
                                    reason="openvino is not installed")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(folder))
    return folder


def _spec(runtime: str = "auto", batch: int = 16) -> ModelSpec:
    return ModelSpec(variant=SMALL, source="random", seed=5, runtime=runtime,
                     batch_size=batch)


def _choices(cache) -> list:
    return sorted((cache / "graphs" / "engines").glob("*.json"))


@needs_openvino
def test_auto_times_both_engines_keeps_the_faster_and_records_it(cache):
    model = loading._load_uncached(_spec(batch=12))
    choice = model.choice
    seconds = choice["seconds_per_batch"]
    assert set(seconds) == set(engines.ENGINES)
    assert all(isinstance(s, float) and s > 0 for s in seconds.values()), seconds
    assert model.engine == choice["chosen"] == min(seconds, key=seconds.get)
    assert choice["batch"] == 8 and not choice["cached"]  # a batch of 12 runs as 8 + 4
    assert choice["machine"]["cpu"] and choice["machine"]["flags_sha256"]
    assert model.runtime.startswith(model.engine) and model.parity.passed
    info = model.info()
    assert info.engine == model.engine and json.loads(info.engine_choice) == choice
    (record,) = _choices(cache)
    assert json.loads(record.read_text())["chosen"] == model.engine


@needs_openvino
def test_a_cached_choice_is_reused_without_timing_and_redone_on_another_cpu(
        cache, monkeypatch):
    first = loading._load_uncached(_spec())
    calls = []
    real = engines.time_runner
    monkeypatch.setattr(engines, "time_runner",
                        lambda run, pixels, repeats=3: calls.append(1) or real(run, pixels, 1))
    again = loading._load_uncached(_spec())
    assert calls == [] and again.engine == first.engine and again.choice["cached"]
    assert again.parity.passed  # the cached engine is still checked
    # Another CPU (or another ISA cap): measured again, cached beside the first.
    name, flags = engines.cpu_info()
    monkeypatch.setattr(engines, "cpu_info", lambda: ("Other CPU", flags - {"avx512f"}))
    other = loading._load_uncached(_spec())
    assert len(calls) == len(engines.ENGINES) and not other.choice["cached"]
    assert other.choice["machine"]["cpu"] == "Other CPU"
    assert len(_choices(cache)) == 2


@needs_openvino
def test_an_engine_outside_parity_is_left_out_and_says_why(cache, monkeypatch):
    from transforms.model import openvino_runtime

    real_call = openvino_runtime.OpenVinoRunner.__call__
    monkeypatch.setattr(openvino_runtime.OpenVinoRunner, "__call__",
                        lambda self, pixels: tuple(o * 1.5 for o in real_call(self, pixels)))
    model = loading._load_uncached(_spec())
    assert model.engine == "onnxruntime" and model.parity.passed
    assert model.choice["seconds_per_batch"]["openvino"].startswith("outputs differ")


def test_no_engine_within_parity_falls_back_to_tensorflow(cache, monkeypatch, caplog):
    monkeypatch.setattr(onnx_runtime, "PARITY_TOLERANCE", 0.0)
    with caplog.at_level(logging.WARNING):
        model = loading._load_uncached(_spec())
    assert model.engine == "tensorflow" and "fallback" in model.runtime
    (warning,) = [r.getMessage() for r in caplog.records
                  if r.levelno >= logging.WARNING and r.name.startswith("transforms")]
    assert "differ from TensorFlow's beyond tolerance" in warning
    assert not _choices(cache)


@needs_openvino
def test_a_forced_engine_runs_without_timing_the_others(cache, monkeypatch):
    monkeypatch.setattr(engines, "time_runner", lambda run, pixels, repeats=3: 0.001)
    model = loading._load_uncached(_spec("openvino"))
    assert model.engine == "openvino" and model.runtime.startswith("openvino ")
    assert set(model.choice["seconds_per_batch"]) == {"openvino"}
    assert not _choices(cache)  # one engine is not a measurement to keep
    reference = loading._load_uncached(_spec("tensorflow"))
    pixels = onnx_runtime.probe_pixels(96)
    np.testing.assert_allclose(model.predict(pixels)[1], reference.predict(pixels)[1],
                               atol=1e-3)


def test_the_timing_batch_is_the_largest_call_the_job_makes():
    assert len(loading.timing_pixels(96, 32)) == 32
    assert len(loading.timing_pixels(96, 20)) == 16  # 16 + 4
    assert len(loading.timing_pixels(96, 3)) == 4
    assert loading.timing_pixels(96, 1).shape == (1, 96, 96, 3)
