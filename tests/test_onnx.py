"""ONNX Runtime runs the model TensorFlow loaded: conversion, cache, parity
guard, fallback, and the runtime choice."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from paths import ROOT, SAMPLE, SHARED_MODEL, needs_shared
from transforms.model import engines, loading, onnx_runtime
from transforms.model.loading import ModelSpec, ModelUnavailableError

SMALL = "mobilenet_v2_035_96"
PIXELS = (np.random.RandomState(11).rand(5, 96, 96, 3) * 255).astype(np.uint8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(folder))
    return folder


def _spec(runtime: str, seed: int = 3) -> ModelSpec:
    return ModelSpec(variant=SMALL, source="random", seed=seed, runtime=runtime)


def _onnx_entry(cache) -> str:
    (entry,) = (cache / "graphs").glob("*.onnx")
    return str(entry)[:-len(".onnx")]


def _warnings(caplog) -> list[str]:
    """The project's own warnings (TensorFlow's retracing notes aside)."""
    return [r.getMessage() for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("transforms")]


def test_onnx_runtime_gives_tensorflows_outputs_from_one_cached_conversion(cache):
    onnx = loading._load_uncached(_spec("onnxruntime"))
    tf = loading._load_uncached(_spec("tensorflow"))
    assert onnx.engine == "onnxruntime" and tf.engine == "tensorflow"
    assert onnx.runtime.startswith("onnxruntime ") and "CPUExecutionProvider" in onnx.runtime
    assert onnx.parity.passed and "parity max|d|" in onnx.runtime
    assert tf.runtime.startswith("tensorflow ") and "--runtime tensorflow" in tf.runtime
    assert onnx.weights_sha256 == tf.weights_sha256 and onnx.heads == tf.heads
    logits, features = onnx.predict(PIXELS)
    tf_logits, tf_features = tf.predict(PIXELS)
    assert logits.shape == (5, 1001) and features.shape == (5, 1280)
    np.testing.assert_allclose(logits, tf_logits, atol=1e-4)
    np.testing.assert_allclose(features, tf_features, atol=1e-4)
    # Converted once, beside the frozen graph; the next load reuses it.
    entry = _onnx_entry(cache)
    assert os.path.isfile(entry + ".npz") and os.path.isfile(entry + ".json")
    info = json.load(open(entry + ".json"))
    assert info["converter"].startswith("tf2onnx ") and "opset 17" in info["converter"]
    assert info["weights_sha256"] == tf.weights_sha256


def test_thread_settings_reach_the_onnx_runtime_session(cache, monkeypatch):
    from transforms.model import threads
    loading._load_uncached(_spec("auto"))
    converted = onnx_runtime.read_cache(_onnx_entry(cache))
    monkeypatch.setattr(threads, "_THREADS", {"intra": 0, "inter": 0})
    threads.configure(1, 1)
    options = onnx_runtime.OnnxRunner(converted.model).session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)


def test_a_cached_conversion_loads_without_tensorflow(cache):
    loading._load_uncached(_spec("auto"))  # converts and caches
    script = (
        "import sys\n"
        "from transforms.model.loading import ModelSpec, load_model\n"
        f"m = load_model(ModelSpec(variant={SMALL!r}, source='random', seed=3))\n"
        "print(m.engine, 'tensorflow' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True,
                         text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    runtime, imported = out.stdout.strip().splitlines()[-1].split()
    assert runtime in engines.ENGINES and imported == "False", out.stdout


def _perturb(entry: str) -> None:
    """Rescale the converted model's input (255 -> 128) as a broken
    conversion might, keeping the cache entry otherwise valid."""
    import hashlib

    import onnx
    from onnx import numpy_helper
    model = onnx.load(entry + ".onnx")
    (scale,) = [t for t in model.graph.initializer if t.name == "pixel_scale"]
    scale.CopyFrom(numpy_helper.from_array(np.array(128.0, np.float32),
                                           "pixel_scale"))
    data = model.SerializeToString()
    open(entry + ".onnx", "wb").write(data)
    info = json.load(open(entry + ".json"))
    info["onnx_sha256"] = hashlib.sha256(data).hexdigest()
    json.dump(info, open(entry + ".json", "w"))


def test_parity_mismatch_falls_back_to_tensorflow_with_one_warning(cache, caplog):
    reference = loading._load_uncached(_spec("tensorflow")).predict(PIXELS)
    loading._load_uncached(_spec("auto"))
    _perturb(_onnx_entry(cache))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        model = loading._load_uncached(_spec("auto"))
    (warning,) = _warnings(caplog)
    assert "differ from TensorFlow's beyond tolerance" in warning
    assert "running it with TensorFlow instead" in warning
    assert model.runtime.startswith("tensorflow ") and "fallback" in model.runtime
    assert not model.parity.passed and model.parity.logits_max_abs > 0.01
    np.testing.assert_allclose(model.predict(PIXELS)[0], reference[0], atol=1e-4)

    # Forced: ONNX Runtime runs it all the same, with a warning.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        forced = loading._load_uncached(_spec("onnxruntime"))
    (warning,) = _warnings(caplog)
    assert "as --runtime onnxruntime asks" in warning
    assert forced.runtime.startswith("onnxruntime ") and not forced.parity.passed
    assert np.abs(forced.predict(PIXELS)[0] - reference[0]).max() > 0.01


def test_tolerance_is_what_decides(cache, monkeypatch, caplog):
    monkeypatch.setattr(onnx_runtime, "PARITY_TOLERANCE", 0.0)
    with caplog.at_level(logging.WARNING):
        model = loading._load_uncached(_spec("auto", seed=4))
    assert model.runtime.startswith("tensorflow ") and len(_warnings(caplog)) == 1
    assert model.parity.limit_logits == 0.0


def test_conversion_failure_falls_back_or_fails_when_forced(cache, monkeypatch, caplog):
    def unconvertible(frozen, size):
        raise ValueError("tf2onnx: unsupported op FancyConv")
    monkeypatch.setattr(onnx_runtime, "convert", unconvertible)
    with caplog.at_level(logging.WARNING):
        model = loading._load_uncached(_spec("auto"))
    (warning,) = _warnings(caplog)
    assert "could not be converted to ONNX" in warning and "FancyConv" in warning
    assert model.runtime.startswith("tensorflow ") and model.parity is None
    assert model.predict(PIXELS)[1].shape == (5, 1280)
    with pytest.raises(ModelUnavailableError) as e:
        loading._load_uncached(_spec("onnxruntime"))
    message = str(e.value)
    assert "\n" not in message and "FancyConv" in message
    assert "--runtime tensorflow" in message
    assert not list((cache / "graphs").glob("*.onnx"))


def test_forced_tensorflow_converts_nothing(cache):
    model = loading._load_uncached(_spec("tensorflow"))
    assert model.runtime.startswith("tensorflow ") and model.parity is None
    assert not list((cache / "graphs").glob("*.onnx"))


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="onnxruntime, openvino, tensorflow"):
        ModelSpec(runtime="tvm")


def test_compare_measures_differences_and_fails_on_nan():
    logits = np.array([[1.0, -20.0]], np.float32)
    features = np.array([[0.0, 3.0, 4.0]], np.float32)
    same = onnx_runtime.compare((logits, features), (logits, features))
    assert same.passed and same.logits_max_abs == 0.0
    assert same.features_min_cosine == pytest.approx(1.0)
    # Tolerance scales with the largest output: 20 for these logits.
    off = onnx_runtime.compare(
        (logits, features), (logits + [[0.0, 0.019]], features), tolerance=1e-3)
    assert off.limit_logits == pytest.approx(0.02) and off.passed
    off = onnx_runtime.compare(
        (logits, features), (logits + [[0.0, 0.021]], features), tolerance=1e-3)
    assert not off.passed
    # Orthogonal features: cosine 0, and far beyond tolerance.
    turned = onnx_runtime.compare((logits, features),
                                  (logits, np.array([[0.0, 4.0, -3.0]], np.float32)))
    assert turned.features_min_cosine == pytest.approx(0.0) and not turned.passed
    broken = onnx_runtime.compare((logits, features),
                                  (logits * np.nan, features))
    assert not broken.passed


def test_gpu_goes_to_whichever_runtime_can_use_it(monkeypatch):
    monkeypatch.setattr(loading, "gpu_present", lambda: True)
    monkeypatch.setattr(onnx_runtime, "providers", lambda: ["CPUExecutionProvider"])
    assert "no CUDA provider" in loading._tensorflow_reason(_spec("auto"))
    assert loading._tensorflow_reason(_spec("onnxruntime")) is None  # forced
    monkeypatch.setattr(onnx_runtime, "providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert loading._tensorflow_reason(_spec("auto")) is None
    monkeypatch.setattr(loading, "gpu_present", lambda: False)
    monkeypatch.setattr(onnx_runtime, "providers", lambda: ["CPUExecutionProvider"])
    assert loading._tensorflow_reason(_spec("auto")) is None


@needs_shared
def test_real_weights_top1_and_cosine_on_both_runtimes(cache):
    """The 200 labelled photos, decoded as the job decodes them, on each
    runtime: the same accuracy (reference 0.840) and features."""
    import csv

    from transforms.decode import DecodeLimits, PreprocessSettings, decode_and_resize
    rows = list(csv.DictReader(open(SAMPLE / "labels.csv")))
    settings = PreprocessSettings(height=224, width=224)
    pixels = np.stack([decode_and_resize((SAMPLE / r["file"]).read_bytes(),
                                         settings, DecodeLimits())[0] for r in rows])
    truth = np.array([int(r["class_index_1001"]) for r in rows])
    results = {}
    for runtime in ("auto", "tensorflow"):
        model = loading._load_uncached(ModelSpec(
            source="saved_model", handle=str(SHARED_MODEL / "v1_signatures"),
            runtime=runtime))
        results[runtime] = model.predict(pixels)
    assert model.runtime.startswith("tensorflow")
    for logits, _ in results.values():
        assert (logits.argmax(axis=1) == truth).mean() >= 0.82
    (a_logits, a_features), (b_logits, b_features) = results.values()
    assert (a_logits.argmax(axis=1) == b_logits.argmax(axis=1)).mean() >= 0.995
    cosine = (a_features * b_features).sum(axis=1) / (
        np.linalg.norm(a_features, axis=1) * np.linalg.norm(b_features, axis=1))
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(a_features, b_features, atol=1e-3)


def test_runtime_option_defaults_to_auto_and_refuses_others(capsys):
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipeline.options import EmbedOptions
    assert PipelineOptions([]).view_as(EmbedOptions).runtime == "auto"
    forced = PipelineOptions(["--runtime", "tensorflow"]).view_as(EmbedOptions)
    assert forced.runtime == "tensorflow"
    assert PipelineOptions(["--runtime", "openvino"]).view_as(EmbedOptions).runtime == "openvino"
    with pytest.raises(SystemExit):
        PipelineOptions(["--runtime", "tvm"]).view_as(EmbedOptions)
    assert "invalid choice: 'tvm'" in capsys.readouterr().err
