"""A process holding one model in one configuration, timing it on request.

    python -m benchmarks.model_worker '{"source": "random", "variant": ..., "form": ...}'

Why a process per configuration: oneDNN (TF_ENABLE_ONEDNN_OPTS) and the
thread pools are fixed when TensorFlow starts, and a shared CPU drifts by 2x
within minutes. Keeping each configuration in its own long-lived process
lets the parent alternate between them, so compared figures share the same
minutes of noise.

Protocol: one JSON object per line. The worker answers `{"ready": ...}` once
loaded, then one line per request on stdin:
  {"cmd": "speed", "batch": 16, "seconds": 1.0}   -> images/s, CPU s per image
  {"cmd": "embed", "pixels": "x.npy", "out": "y.npz"} -> logits and features
  {"cmd": "quit"}
"""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

_RUNTIME: list[str] = []  # what ran the product form (LoadedModel.runtime)
FORMS = ("product", "eager", "graph_keras", "xla", "frozen", "logits_only",
         "logits_only_frozen", "bf16")


def _protocol_stream():
    """The real stdout for answers; anything TF or Keras prints goes to stderr."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return stream


def _product_spec(config: dict):
    from transforms.model.loading import ModelSpec
    runtime = config.get("runtime", "tensorflow")
    if config["source"] == "shared":
        return ModelSpec(variant=config["variant"], source="saved_model",
                         handle=config["shared_model"], runtime=runtime)
    return ModelSpec(variant=config["variant"], source="random", runtime=runtime)


def _uint8_wrapper(float_fn, size: int, jit: bool = False):
    """uint8 pixels -> float_fn(pixels / 255), as LoadedModel.predict does."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)],
                 jit_compile=jit, autograph=False)
    def predict(pixels):
        return float_fn(tf.cast(pixels, tf.float32) / 255.0)
    return predict


def _keras_model(config: dict):
    from transforms.model import architecture, catalog
    if config["source"] != "random":
        raise ValueError(f"form {config['form']} needs the random source")
    return architecture.build_random_model(
        catalog.get_variant(config["variant"]), seed=0)


def _float_signature(size: int):
    import tensorflow as tf
    return tf.TensorSpec([None, size, size, 3], tf.float32)


def _shared_classification(config: dict, frozen: bool):
    """The classification SavedModel alone (as published, or frozen)."""
    import tensorflow as tf

    from transforms.model import fusion
    model = tf.saved_model.load(os.path.join(config["shared_model"],
                                             "classification"))
    size = config["size"]
    call = tf.function(lambda x: model(x), input_signature=[_float_signature(size)])
    if not frozen:
        return call
    constant = fusion.freeze(call.get_concrete_function())
    return lambda x: constant(x)


def build(config: dict):
    """uint8 [N, S, S, 3] -> output tensor(s), for the configured form."""
    form, size = config["form"], config["size"]
    if form in ("product", "bf16"):
        # As the job runs it: either runtime, padded batches, numpy out
        # (an ONNX Runtime model with its conversion cached never imports TF).
        from transforms.model.loading import load_model
        model = load_model(_product_spec(config))
        _RUNTIME.append(model.runtime)
        return model.predict

    import tensorflow as tf
    if form in ("logits_only", "logits_only_frozen") and config["source"] == "shared":
        return _uint8_wrapper(_shared_classification(
            config, frozen=form == "logits_only_frozen"), size)
    model = _keras_model(config)
    if form == "eager":
        return lambda p: model(tf.cast(p, tf.float32) / 255.0, training=False)
    if form in ("graph_keras", "xla"):
        return _uint8_wrapper(lambda x: model(x, training=False), size,
                              jit=form == "xla")
    if form == "frozen":
        from transforms.model import fusion
        inner = tf.function(lambda x: model(x, training=False),
                            input_signature=[_float_signature(size)])
        frozen = fusion.freeze(inner.get_concrete_function())
        return _uint8_wrapper(lambda x: frozen(x), size)
    if form in ("logits_only", "logits_only_frozen"):
        import keras
        logits_model = keras.Model(model.inputs, model.outputs[0])
        call = tf.function(lambda x: logits_model(x, training=False),
                           input_signature=[_float_signature(size)])
        if form == "logits_only_frozen":
            from transforms.model import fusion
            call = fusion.freeze(call.get_concrete_function())
        return _uint8_wrapper(lambda x: call(x), size)
    raise ValueError(f"unknown form {form!r}; use one of {FORMS}")


def _to_numpy(outputs) -> list[np.ndarray]:
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(o) for o in outputs]


class Timer:
    """Calls the model on one fixed batch for a while."""

    def __init__(self, fn, size: int):
        self._fn = fn
        self._size = size
        self._batches: dict[int, np.ndarray] = {}

    def warm_up(self, n: int) -> np.ndarray:
        if n not in self._batches:
            rng = np.random.default_rng(n)
            self._batches[n] = rng.integers(0, 256, (n, self._size, self._size, 3),
                                            dtype=np.uint8)
            _to_numpy(self._fn(self._batches[n]))  # warm-up: per-shape set-up
        return self._batches[n]

    def speed(self, batch: int, seconds: float) -> dict:
        pixels = self.warm_up(batch)
        calls, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        while True:
            _to_numpy(self._fn(pixels))  # .numpy(): as LoadedModel.predict does
            calls += 1
            wall = time.perf_counter() - t0
            if wall >= seconds:
                break
        images = calls * batch
        return {"images_per_s": images / wall, "wall_s": wall, "calls": calls,
                "cpu_s_per_image": (time.process_time() - cpu0) / images}


def _embed(fn, request: dict) -> dict:
    pixels = np.load(request["pixels"])
    # Chunks of 32: a batch size the timings use, so XLA compiles nothing new.
    outs = [_to_numpy(fn(pixels[i:i + 32])) for i in range(0, len(pixels), 32)]
    logits = np.concatenate([o[0] for o in outs]).astype(np.float32)
    features = (np.concatenate([o[1] for o in outs]).astype(np.float32)
                if len(outs[0]) > 1 else np.zeros((len(logits), 0), np.float32))
    np.savez(request["out"], logits=logits, features=features)
    return {"rows": len(logits)}


def _configure(config: dict) -> None:
    if config.get("intra") or config.get("inter"):
        from transforms.inference import configure_threads
        configure_threads(config.get("intra", 0), config.get("inter", 0))
    if config["form"] == "bf16":
        import tensorflow as tf
        # Grappler rewrites the graph to bfloat16 where oneDNN has kernels.
        tf.config.optimizer.set_experimental_options(
            {"auto_mixed_precision_onednn_bfloat16": True})


def _onednn_enabled() -> bool | None:
    if "tensorflow" not in sys.modules:  # ONNX Runtime ran it alone
        return None
    try:
        from tensorflow.python.util import _pywrap_util_port
        return bool(_pywrap_util_port.IsMklEnabled())
    except Exception:  # a private API: absent in some builds
        return None


def _rss_mb() -> float:
    import psutil
    return round(psutil.Process().memory_info().rss / 2**20, 1)


def main(argv: list[str]) -> int:
    answer = _protocol_stream()
    config = json.loads(argv[0])
    t0 = time.perf_counter()
    try:
        _configure(config)
        fn = build(config)
        load_s = time.perf_counter() - t0
        timer = Timer(fn, config["size"])
        t1 = time.perf_counter()
        timer.warm_up(8)
    except Exception as e:  # an unsupported mode is a result, not a crash
        answer.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: "
                                 f"{str(e).strip()[:300]}"}) + "\n")
        return 1
    answer.write(json.dumps({"ready": True, "load_s": load_s,
                             "first_call_s": time.perf_counter() - t1,
                             "onednn": _onednn_enabled(),
                             "runtime": _RUNTIME[0] if _RUNTIME else None,
                             "tensorflow_imported": "tensorflow" in sys.modules,
                             "rss_mb": _rss_mb()}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["cmd"] == "quit":
                break
            if request["cmd"] == "speed":
                reply = timer.speed(request["batch"], request["seconds"])
            elif request["cmd"] == "embed":
                reply = _embed(fn, request)
            else:
                reply = {"error": f"unknown command {request['cmd']!r}"}
        except Exception as e:  # report, keep serving: one bad mode is a result
            reply = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        answer.write(json.dumps(reply) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
