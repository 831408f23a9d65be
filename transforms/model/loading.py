"""Load a MobileNetV2 from its source into one callable giving both outputs.

Sources, chosen explicitly by the user (`sources`):
  tfhub        the catalog's TF-Hub handle (or a handle URL the user gives),
               resolved and cached by tensorflow_hub (TFHUB_CACHE_DIR honoured)
  saved_model  a SavedModel directory, local or gs://, in either TF-Hub layout
               (`savedmodels`)
  random       the architecture built in-process with seeded random weights

Every path ends in one frozen two-output graph (cached on disk, `graphs`),
converted to ONNX once (`onnx_runtime`) and run by the engine measured
fastest on this machine among those whose outputs match TensorFlow's on a
probe batch (`engines`: ONNX Runtime, OpenVINO), or by TensorFlow
(`ModelSpec.runtime`), and in `LoadedModel`: uint8 pixels [N, H, W, 3] in,
float32 (logits [N, 1001], features [N, d]) out, plus what to record about
it (`runtime`, `engine`, `choice`, `parity`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from typing import Callable, Optional

import numpy as np

from schemas import ModelInfo
from transforms.model import catalog, engines, graphs, onnx_runtime, quantize
from transforms.model.cache import first_line, version
from transforms.model.savedmodels import freeze_saved_models, weights_digest
from transforms.model.sources import resolve_model
from transforms.model.spec import (RUNTIMES, SOURCES, ModelSpec, ModelUnavailableError,
                                   QuantizationError)

LOG = logging.getLogger(__name__)
__all__ = ["LoadedModel", "ModelSpec", "ModelUnavailableError", "QuantizationError",
           "RUNTIMES", "SOURCES", "cached_info", "gpu_present", "load_model",
           "padded_batch_sizes", "resolve_model"]


@dataclasses.dataclass
class LoadedModel:
    spec: ModelSpec
    input_size: int
    feature_dim: int
    weights_sha256: str
    heads: str  # how logits and features are computed, for the record
    # uint8 [N, H, W, 3] -> (logits, features), numpy float32: a TensorFlow
    # function or an ONNX Runtime session.
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    # What runs it, for the record, e.g. "onnxruntime 1.32.0
    # CPUExecutionProvider; parity max|d| ...", or "tensorflow 2.21.0 CPU;
    # fallback: ..." saying why TensorFlow runs it.
    runtime: str = ""
    parity: Optional["onnx_runtime.Parity"] = None  # where ONNX Runtime was tried
    # The engine that runs it (onnxruntime | openvino | tensorflow) and how
    # it was chosen (`engines.Choice.to_dict`: the timings, the machine).
    engine: str = ""
    choice: Optional[dict] = None
    # int8 only: what to record about the quantization (the calibration;
    # the launcher adds the guard's figures), and the fp32 model it came
    # from, for the guard.
    quantization: Optional[dict] = None
    reference: Optional["LoadedModel"] = None

    @property
    def precision(self) -> str:
        return self.spec.precision

    def predict(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N, H, W, 3] -> (logits [N, 1001], features [N, d]), float32.

        The graph runs on few batch sizes only (`padded_batch_sizes`):
        oneDNN builds and keeps kernels for every input shape it sees, so
        each new size Beam's adaptive batching hands over cost memory for
        the rest of the run (measured: +140 MB over sizes 1-32) and a slow
        first call. Rows are independent, so zero padding changes nothing.
        """
        if not len(pixels):
            return (np.zeros((0, catalog.get_variant(self.spec.variant)
                              .num_classes), np.float32),
                    np.zeros((0, self.feature_dim), np.float32))
        parts, start = [], 0
        for size, padded in padded_batch_sizes(len(pixels)):
            chunk = pixels[start:start + size]
            if padded > size:
                chunk = np.concatenate([chunk, np.zeros(
                    (padded - size,) + chunk.shape[1:], chunk.dtype)])
            logits, features = self.run(chunk)
            parts.append((logits[:size], features[:size]))
            start += size
        if len(parts) == 1:
            return parts[0]
        return (np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]))

    def info(self) -> ModelInfo:
        info = dataclasses.replace(
            _info(self.spec, self.weights_sha256, self.heads, self.feature_dim,
                  self.runtime),
            engine=self.engine,
            engine_choice=json.dumps(self.choice, sort_keys=True) if self.choice else "")
        if self.precision != "int8":
            return info
        return dataclasses.replace(
            info, precision="int8",
            quantization=json.dumps(self.quantization or {}, sort_keys=True))


def _info(spec: ModelSpec, weights_sha256: str, heads: str,
          feature_dim: int, runtime: str) -> ModelInfo:
    """The model's part of the output's metadata."""
    return ModelInfo(model=spec.variant, model_source=spec.source,
                     model_handle=spec.describe(),
                     weights_sha256=weights_sha256, heads=heads,
                     feature_dim=feature_dim, runtime=runtime)


BATCH_STEP = 8


def padded_batch_sizes(n: int) -> list[tuple[int, int]]:
    """(images, padded size) per model call for a batch of n: the multiples
    of BATCH_STEP in one call, the rest padded to 1, 2, 4 or 8. Batches up
    to 32 then use at most 7 shapes, and pad at most 3 images."""
    whole = n // BATCH_STEP * BATCH_STEP
    rest = n - whole
    sizes = [(whole, whole)] if whole else []
    if rest:
        sizes.append((rest, 1 << (rest - 1).bit_length()))
    return sizes


_CACHE: dict[ModelSpec, LoadedModel] = {}
_CACHE_LOCK = threading.Lock()


def load_model(spec: ModelSpec, paths: Optional[list[str]] = None,
               calibration_pixels: Optional[Callable[[], np.ndarray]] = None
               ) -> LoadedModel:
    """Load once per process: later calls with the same spec share the model.
    `paths`: what `resolve_model(spec)` gave, where the caller has it.
    `calibration_pixels`: int8 only, gives the decoded calibration sample
    (uint8 [N, H, W, 3]) where the quantized model is not cached yet."""
    with _CACHE_LOCK:
        if spec not in _CACHE:
            _CACHE[spec] = _load_uncached(spec, paths, calibration_pixels)
        return _CACHE[spec]


def _load_uncached(spec: ModelSpec, paths: Optional[list[str]] = None,
                   calibration_pixels=None) -> LoadedModel:
    variant = catalog.get_variant(spec.variant)
    if spec.source == "random":
        return _load_random(spec, variant, calibration_pixels)
    if paths is None:
        paths = resolve_model(spec)
    try:
        return _load_directories(spec, variant, paths, calibration_pixels)
    except (ModelUnavailableError, QuantizationError):
        raise
    except Exception as e:  # a damaged or foreign SavedModel
        raise ModelUnavailableError(
            f"could not load {spec.describe()} (from {', '.join(paths)}): "
            f"{type(e).__name__}: {first_line(e)}") from e


# --- layouts ------------------------------------------------------------------

def _load_random(spec: ModelSpec, variant, calibration_pixels=None) -> LoadedModel:
    """The seeded architecture, frozen like every other source (the same
    graph optimizations apply, and oneDNN then gives the same results
    whatever the batch size), and cached on disk like them."""
    def build():
        import tensorflow as tf  # here: a cached model may not need it

        from transforms.model import architecture, fusion

        model = architecture.build_random_model(variant, spec.seed)

        @tf.function(input_signature=[tf.TensorSpec(
            [None, variant.input_size, variant.input_size, 3], tf.float32)])
        def both(images):
            logits, features = model(images, training=False)
            return logits, features

        return fusion.freeze_graph(both.get_concrete_function(),
                                   "one pass: native two-output model",
                                   architecture.weights_digest(model))

    return _load_frozen(spec, variant, graphs.random_cache_path(spec, variant), build,
                        calibration_pixels)


def _load_directories(spec: ModelSpec, variant, paths: list[str],
                      calibration_pixels=None) -> LoadedModel:
    """Every file layout ends as one frozen graph, cached on disk by weights
    digest: a later process (another worker, the next run) imports it in a
    second instead of loading and fusing the SavedModels again."""
    digest = weights_digest(paths)
    return _load_frozen(spec, variant,
                        graphs.directories_cache_path(variant, paths, digest),
                        lambda: freeze_saved_models(spec, variant, paths, digest),
                        calibration_pixels)


def _load_frozen(spec: ModelSpec, variant, cache: str, build,
                 calibration_pixels=None) -> LoadedModel:
    """The model on the runtime `spec.runtime` asks for (see RUNTIMES)."""
    if spec.precision == "int8":
        return _load_int8(spec, variant, cache, build, calibration_pixels)
    reason = _tensorflow_reason(spec)
    if reason:
        model, _ = _load_tensorflow(spec, variant, cache, build)
        return _on_tensorflow(model, reason)
    return _load_onnx(spec, variant, cache, build)


def _load_tensorflow(spec: ModelSpec, variant, cache: str, build):
    """(LoadedModel on TensorFlow, its FrozenGraph): the frozen graph from
    the cache, else `build()` it; cached only once it has passed `_finish`'s
    checks, so a cache hit is a model known to work (`cached_info`
    relies on that)."""
    from transforms.model import threads
    threads.apply_tensorflow()  # before TensorFlow's first op in this process
    frozen = graphs.read_graph(cache)
    fresh = frozen is None
    if fresh:
        frozen = build()
    loaded = _finish(spec, variant, frozen.function(), frozen.weights_sha256,
                     frozen.note)
    if fresh:
        graphs.write_graph(cache, frozen)
    return loaded, frozen


def _on_tensorflow(model: LoadedModel, reason: str,
                   parity: Optional[onnx_runtime.Parity] = None) -> LoadedModel:
    import tensorflow as tf
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    model.runtime = f"tensorflow {tf.__version__} {device}; {reason}"
    model.parity = parity
    model.engine = "tensorflow"
    return model


def gpu_present() -> bool:
    """An NVIDIA GPU this process can see (without importing a framework)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = "/proc/driver/nvidia/gpus"
    return os.path.isdir(gpus) and bool(os.listdir(gpus))


def _tensorflow_reason(spec: ModelSpec) -> Optional[str]:
    """Why TensorFlow runs `spec` without trying ONNX Runtime; None: try it."""
    if spec.runtime == "tensorflow":
        return "chosen with --runtime tensorflow"
    if spec.runtime == "auto" and gpu_present() and (
            "CUDAExecutionProvider" not in onnx_runtime.providers()):
        # TensorFlow uses the GPU by itself; this onnxruntime could not.
        return ("a GPU is present and this onnxruntime has no CUDA provider "
                "(install onnxruntime-gpu to run it there)")
    return None


def _fp32_engines(spec: ModelSpec) -> tuple[str, ...]:
    """The engines `spec.runtime` lets run the fp32 model, to be measured."""
    if spec.runtime in engines.ENGINES:
        return (spec.runtime,)
    return tuple(e for e in engines.ENGINES if engines.installed(e))


def timing_pixels(input_size: int, batch_size: int) -> np.ndarray:
    """The probe images repeated to the batch the model runs at for a job
    batch of `batch_size` (its largest padded call)."""
    size = max(padded for _, padded in padded_batch_sizes(batch_size))
    probe = onnx_runtime.probe_pixels(input_size)
    return np.resize(probe, (size,) + probe.shape[1:])


def _load_onnx(spec: ModelSpec, variant, cache: str, build) -> LoadedModel:
    """The cached ONNX conversion (converted now where absent) on the
    fastest engine here whose outputs on the probe batch match
    TensorFlow's (`engines.choose`). With `auto`, a failed conversion or no
    engine within parity falls back to TensorFlow with one warning; a
    forced engine fails instead, or, on parity alone, warns and runs."""
    forced = spec.runtime in engines.ENGINES
    size = variant.input_size
    path = onnx_runtime.cache_path(cache)
    converted = onnx_runtime.read_cache(path)
    tf_model = None

    def fall_back(what: str, detail: str, error: Optional[Exception] = None,
                  parity: Optional[onnx_runtime.Parity] = None) -> LoadedModel:
        if forced:
            raise ModelUnavailableError(
                f"{spec.describe()}: {what} ({detail}). Use --runtime "
                "tensorflow (or auto) to run it with TensorFlow.") from error
        LOG.warning("%s: %s (%s); running it with TensorFlow instead",
                    spec.describe(), what, detail)
        model = tf_model or _load_tensorflow(spec, variant, cache, build)[0]
        return _on_tensorflow(model, f"fallback: {what} ({detail})", parity)

    if converted is None:
        tf_model, frozen = _load_tensorflow(spec, variant, cache, build)
        try:
            converted = onnx_runtime.Converted(
                onnx_runtime.convert(frozen, size),
                tf_model.run(onnx_runtime.probe_pixels(size)),
                frozen.weights_sha256, frozen.note, onnx_runtime.converter())
        except Exception as e:  # an op tf2onnx cannot convert, ...
            return fall_back("the model could not be converted to ONNX",
                             f"{type(e).__name__}: {first_line(e)}", e)
        onnx_runtime.write_cache(path, converted)
        LOG.info("converted %s to ONNX with %s; cached in %s",
                 spec.variant, converted.converter, path + ".onnx")
    probe = onnx_runtime.probe_pixels(size)
    try:
        choice = engines.choose(
            _fp32_engines(spec), converted.model, path + ".onnx",
            timing_pixels(size, spec.batch_size),
            check=lambda run: onnx_runtime.compare(converted.reference, run(probe)),
            passed=lambda parity: parity.passed, strict=not forced)
    except engines.NoEngineError as e:
        parities = [r for r in e.results.values() if isinstance(r, onnx_runtime.Parity)]
        if parities and len(parities) == len(e.results):
            return fall_back("the outputs of " + " and ".join(e.results) +
                             " differ from TensorFlow's beyond tolerance",
                             parities[0].describe(), parity=parities[0])
        return fall_back(f"{' and '.join(e.results)} could not run the converted "
                         "model", str(e), e)
    parity = choice.check
    if not parity.passed:
        LOG.warning("%s: the %s outputs differ from TensorFlow's beyond "
                    "tolerance (%s); running it with %s as --runtime %s asks",
                    spec.describe(), choice.engine, parity.describe(),
                    choice.engine, spec.runtime)
    runner = choice.run
    LOG.info("%s runs on %s", spec.variant, engines.describe(choice))
    return LoadedModel(spec, size, variant.feature_dim,
                       converted.weights_sha256, converted.heads, runner,
                       f"{runner.describe()}; {parity.describe()}", parity,
                       engine=choice.engine, choice=choice.to_dict())


def _load_int8(spec: ModelSpec, variant, cache: str, build,
               calibration_pixels=None) -> LoadedModel:
    """The fp32 ONNX conversion quantized with `spec.calibration` (from the
    cache, else quantized now from `calibration_pixels()`), on
    `spec.engine` (auto: both timed, the faster kept). Raises
    QuantizationError where int8 cannot be had; the accuracy guard is the
    launcher's (`pipeline/calibration.py`), on held-out images."""
    fp32_spec = dataclasses.replace(spec, precision="fp32", engine="auto",
                                    calibration=None, runtime=(
                                        spec.runtime if spec.runtime in engines.ENGINES
                                        else "auto"))
    try:
        fp32 = _load_onnx(fp32_spec, variant, cache, build)
    except ModelUnavailableError as e:
        raise QuantizationError(f"int8 needs the model on ONNX Runtime: {e}") from e
    path = onnx_runtime.cache_path(cache)
    try:
        with open(path + ".onnx", "rb") as f:
            fp32_bytes = f.read()
    except OSError as e:
        raise QuantizationError(f"the fp32 ONNX model is not in the cache "
                                f"({path}.onnx): {e}") from e
    calibration = spec.calibration
    qpath = quantize.cache_path(path, calibration.sha256)
    model = quantize.read_cache(qpath)
    quantized_now = model is None
    if model is None:
        if calibration_pixels is None:
            raise QuantizationError(
                f"the int8 model calibrated on {calibration.sha256[:12]} is not "
                "in this machine's cache and no calibration images were given")
        pixels = calibration_pixels()
        if quantize.pixels_digest(pixels) != calibration.sha256:
            raise QuantizationError(
                "the calibration images decode to other pixels here than "
                "where the int8 model was made (sha256 "
                f"{quantize.pixels_digest(pixels)[:12]} vs "
                f"{calibration.sha256[:12]}): they changed")
        try:
            model = quantize.quantize(fp32_bytes, pixels[quantize.split(len(pixels))[0]])
        except Exception as e:
            raise QuantizationError(f"quantization failed: {type(e).__name__}: "
                                    f"{first_line(e)}") from e
        quantize.write_cache(qpath, model, calibration)
        LOG.info("quantized %s to int8 on %d calibration images; cached in %s",
                 spec.variant, len(pixels), qpath + ".onnx")
    size = variant.input_size
    candidates = engines.ENGINES if spec.engine == "auto" else (spec.engine,)
    try:
        choice = engines.choose(candidates, model, qpath + ".onnx",
                                timing_pixels(size, spec.batch_size))
    except engines.NoEngineError as e:
        raise QuantizationError(f"no engine runs the int8 model: {e}") from e
    record = {"calibration": calibration.to_dict(),
              "settings": quantize.settings(),
              "int8_instructions": quantize.int8_instructions() or "none",
              "quantized_now": quantized_now}
    runner = choice.run
    LOG.info("%s int8 runs on %s", spec.variant, engines.describe(choice))
    return LoadedModel(spec, size, variant.feature_dim, fp32.weights_sha256,
                       fp32.heads, runner,
                       f"{runner.describe()} int8 (QDQ, calibrated on "
                       f"{len(calibration.uris)} images); fp32 {fp32.runtime}",
                       fp32.parity, engine=choice.engine, choice=choice.to_dict(),
                       quantization=record, reference=fp32)


def cached_info(spec: ModelSpec, paths: Optional[list[str]] = None
                ) -> Optional[ModelInfo]:
    """What `load_model(spec).info()` gives, read from the on-disk cache
    of frozen graphs without building or running the model; None where the
    cache does not hold it yet.

    For a launcher that will not run the model itself (worker processes,
    Dataflow): loading it there costs seconds of start-up for nothing but
    the metadata. Only graphs that passed `_finish`'s checks are cached, so
    a hit is a model known to work. The model is still resolved (TF-Hub
    cache, folder, gs:// copy; `paths` where the caller did it), so a
    missing one fails here as it would in `load_model`.
    """
    variant = catalog.get_variant(spec.variant)
    if spec.source == "random":
        cache = graphs.random_cache_path(spec, variant)
        digest = None
    else:
        if paths is None:
            paths = resolve_model(spec)
        try:
            digest = weights_digest(paths)
            cache = graphs.directories_cache_path(variant, paths, digest)
        except OSError:
            return None  # let load_model say what is wrong
    try:
        with open(cache + ".json") as f:
            info = json.load(f)
        if not os.path.isfile(cache + ".pb"):
            return None
        weights, note = info["weights_sha256"], info["note"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if digest is not None and weights != digest:
        return None
    return _info(spec, weights, note, variant.feature_dim,
                 f"tensorflow {version('tensorflow')}; decided by each worker "
                 f"(--runtime {spec.runtime})")


def _finish(spec, variant, both, digest, heads) -> LoadedModel:
    """Wrap `both` (float images -> logits, features) for uint8 input; check dims."""
    import tensorflow as tf

    size = variant.input_size

    @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
    def predict(pixels):
        images = tf.cast(pixels, tf.float32) / 255.0
        logits, features = both(images)
        return logits, features

    probe = np.zeros((2, size, size, 3), np.uint8)
    try:
        logits, features = (t.numpy() for t in predict(probe))
    except Exception as e:
        raise ModelUnavailableError(
            f"{spec.describe()} does not accept {size}x{size} RGB images, as "
            f"{variant.name} should ({type(e).__name__}: {first_line(e)}). "
            "Is it the right variant?") from e
    if logits.shape != (2, variant.num_classes) or features.shape != (
            2, variant.feature_dim):
        raise ModelUnavailableError(
            f"{spec.describe()} gives logits {list(logits.shape[1:])} and "
            f"features {list(features.shape[1:])}, but {variant.name} has "
            f"[{variant.num_classes}] and [{variant.feature_dim}]. Is it the "
            "right variant?")
    def run(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = predict(pixels)
        return logits.numpy(), features.numpy()

    return LoadedModel(spec, size, variant.feature_dim, digest, heads, run)


