"""Load a MobileNetV2 from its source into one callable giving both outputs.

Sources, chosen explicitly by the user:
  tfhub        the catalog's TF-Hub handle (or a handle URL the user gives),
               resolved and cached by tensorflow_hub (TFHUB_CACHE_DIR honoured)
  saved_model  a SavedModel directory, local or gs://, in either TF-Hub layout
  random       the architecture built in-process with seeded random weights

Layouts understood (whatever the source):
  /3   one module with signatures `image_classification` and
       `image_feature_vector` (outputs under `default`). A TF1 Hub module is
       pruned to fetch both tensors from one graph call; a TF2 export of the
       same signatures is fused by `fusion.fuse_heads`.
  /4-/5  one callable SavedModel per head (classification/, feature_vector/);
       the two are fused into one graph by `fusion.fuse_heads`.

Every path ends in one frozen two-output graph (cached on disk), run by
ONNX Runtime after a parity check against TensorFlow, or by TensorFlow
(`ModelSpec.runtime`; see `onnx_runtime`), and in `LoadedModel`: uint8
pixels [N, H, W, 3] in, float32 (logits [N, 1001], features [N, d]) out,
plus what to record about it (`runtime`, `parity`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import uuid
from typing import Callable, Optional

import numpy as np

from schemas import ModelInfo
from transforms.model import catalog, onnx_runtime, quantize

LOG = logging.getLogger(__name__)
SOURCES = ("tfhub", "saved_model", "random")
# auto: ONNX Runtime where its outputs match TensorFlow's (else TensorFlow);
# the other two force one runtime.
RUNTIMES = ("auto", "onnxruntime", "tensorflow")
_CLS_SIG, _FV_SIG = "image_classification", "image_feature_vector"


class ModelUnavailableError(RuntimeError):
    """The model cannot be had; the message says what was tried and what to do."""


class QuantizationError(RuntimeError):
    """The int8 model cannot be had (conversion, calibration or engines
    failed); the launcher falls back to fp32, a worker fails."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to load: small and picklable, so workers can load it themselves."""
    variant: str = catalog.DEFAULT_MODEL
    source: str = "tfhub"
    handle: Optional[str] = None  # tfhub: a handle URL; saved_model: path/URI
    feature_handle: Optional[str] = None  # /4-/5: the feature-vector model
    hub_version: int = catalog.DEFAULT_HUB_VERSION
    seed: int = 0  # random source only
    runtime: str = "auto"  # one of RUNTIMES
    # fp32, or int8 (the launcher resolves --precision auto to one of them):
    # int8 needs `calibration`, and runs on `engine` (auto: the faster one,
    # timed at load).
    precision: str = "fp32"
    engine: str = "auto"
    calibration: Optional[quantize.Calibration] = None

    def __post_init__(self):
        catalog.get_variant(self.variant)  # clear error for unknown names
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"unknown precision {self.precision!r}; use fp32 "
                             "or int8")
        if self.engine not in ("auto",) + quantize.ENGINES:
            raise ValueError(f"unknown int8 engine {self.engine!r}")
        if self.precision == "int8" and self.calibration is None:
            raise ValueError("int8 needs a calibration sample")
        if self.precision == "int8" and self.runtime == "tensorflow":
            raise ValueError("--precision int8 runs on ONNX Runtime or "
                             "OpenVINO, not on --runtime tensorflow")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; use one of "
                             f"{', '.join(RUNTIMES)}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown model source {self.source!r}; use one "
                             f"of {', '.join(SOURCES)}")
        if self.source == "saved_model" and not self.handle:
            raise ValueError("the saved_model source needs --model_handle")
        if self.hub_version not in catalog.HUB_VERSIONS:
            raise ValueError(f"TF-Hub version must be one of "
                             f"{catalog.HUB_VERSIONS}, not {self.hub_version}")

    def hub_handles(self) -> list[str]:
        """The TF-Hub handles to fetch, classification first."""
        if self.handle:
            return [self.handle] + ([self.feature_handle]
                                    if self.feature_handle else [])
        variant = catalog.get_variant(self.variant)
        if self.hub_version == 3:
            # The /3 classification module carries both signatures.
            return [variant.hub_handle("classification", 3)]
        return [variant.hub_handle("classification", self.hub_version),
                variant.hub_handle("feature_vector", self.hub_version)]

    def describe(self) -> str:
        if self.source == "random":
            return f"random(seed={self.seed})"
        if self.source == "tfhub":
            return " + ".join(self.hub_handles())
        return " + ".join(h for h in (self.handle, self.feature_handle) if h)


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
    # int8 only: the engine, what to record about the quantization (the
    # calibration, the engines' timings; the launcher adds the guard's
    # figures), and the fp32 model it came from, for the guard.
    engine: str = ""
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
        info = _info(self.spec, self.weights_sha256, self.heads,
                     self.feature_dim, self.runtime)
        if self.precision != "int8":
            return info
        return dataclasses.replace(
            info, precision="int8", engine=self.engine,
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


def resolve_model(spec: ModelSpec) -> list[str]:
    """The local SavedModel folders of `spec` (none for random weights):
    fetched through TF-Hub's cache or copied from gs:// where needed."""
    if spec.source == "random":
        return []
    if spec.source == "tfhub":
        return [_resolve_hub(h, spec) for h in spec.hub_handles()]
    return _resolve_saved_model(spec)


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
            f"{type(e).__name__}: {_first_line(e)}") from e


# --- sources -----------------------------------------------------------------

def _offline_help(spec: ModelSpec) -> str:
    variant = catalog.get_variant(spec.variant)
    return (
        "To run without access to TF-Hub, download the module where you have "
        f"internet ({variant.hub_handle('classification', 3)}"
        "?tf-hub-format=compressed is a .tar.gz), unpack it and pass "
        "--model_handle /path/to/dir (or gs://bucket/dir); or point "
        "TFHUB_CACHE_DIR at a cache that already holds it; or pass "
        "--model_source random for a smoke run with random weights.")


def _resolve_hub(handle: str, spec: ModelSpec) -> str:
    import tensorflow_hub as hub
    try:
        return hub.resolve(handle)
    except Exception as e:
        cache = os.environ.get("TFHUB_CACHE_DIR") or "(default temp cache)"
        raise ModelUnavailableError(
            f"could not fetch {handle} from TF-Hub "
            f"({type(e).__name__}: {_first_line(e)}); TFHUB_CACHE_DIR="
            f"{cache}. {_offline_help(spec)}") from e


def _resolve_saved_model(spec: ModelSpec) -> list[str]:
    if spec.handle.startswith(("http://", "https://")):
        # A handle URL: let tensorflow_hub fetch and cache it.
        return [_resolve_hub(h, spec) for h in spec.hub_handles()]
    paths = [_local_copy(spec.handle, spec)]
    if spec.feature_handle:
        paths.append(_local_copy(spec.feature_handle, spec))
        return paths
    root = paths[0]
    if os.path.exists(os.path.join(root, "saved_model.pb")):
        return paths
    heads = [os.path.join(root, h) for h in ("classification", "feature_vector")]
    if all(os.path.exists(os.path.join(h, "saved_model.pb")) for h in heads):
        return heads
    raise ModelUnavailableError(
        f"{spec.handle} is not a SavedModel directory: it has no "
        "saved_model.pb, nor classification/ and feature_vector/ SavedModels "
        f"(it holds: {', '.join(sorted(os.listdir(root))[:10]) or 'nothing'}).")


def _cache_root() -> str:
    root = os.environ.get("MOBILENET_EMBED_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "mobilenet_embed_models")
    os.makedirs(root, exist_ok=True)
    return root


def _local_copy(uri: str, spec: ModelSpec) -> str:
    """A local directory holding the SavedModel at `uri` (copied once if remote)."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in uri:
        if not os.path.isdir(uri):
            raise ModelUnavailableError(
                f"no SavedModel directory at {uri!r} (it does not exist or is "
                "not a directory).")
        return os.path.abspath(uri)
    base = uri.rstrip("/")
    try:
        matches = FileSystems.match([base + "/**"])[0].metadata_list
    except Exception as e:
        raise ModelUnavailableError(
            f"could not list the SavedModel at {uri} ({type(e).__name__}: "
            f"{_first_line(e)}). Check the URI and the credentials of this "
            "machine.") from e
    if not matches:
        raise ModelUnavailableError(f"no files under {uri}: nothing to load.")
    relatives = [m.path[len(base) + 1:] for m in matches]
    if not any(r.count("/") <= 1 and r.rsplit("/", 1)[-1] == "saved_model.pb"
               for r in relatives):
        # Checked before copying: a folder of images given by mistake must
        # fail now, not after being downloaded.
        raise ModelUnavailableError(
            f"{uri} is not a SavedModel directory: it has no saved_model.pb, "
            "nor classification/ and feature_vector/ SavedModels (it holds: "
            f"{', '.join(sorted(relatives)[:10])}).")
    # The cache key includes sizes and times, so a replaced model is re-fetched.
    fingerprint = hashlib.sha256(base.encode())
    for m in sorted(matches, key=lambda m: m.path):
        fingerprint.update(f"{m.path}|{m.size_in_bytes}|{m.last_updated_in_seconds}".encode())
    target = os.path.join(_cache_root(), fingerprint.hexdigest()[:32])
    if os.path.isdir(target):
        return target
    staging = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        for m in matches:
            relative = m.path[len(base) + 1:]
            local = os.path.join(staging, *relative.split("/"))
            os.makedirs(os.path.dirname(local), exist_ok=True)
            with FileSystems.open(m.path) as src, open(local, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(staging, ignore_errors=True)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelUnavailableError(
            f"could not copy the SavedModel at {uri} ({type(e).__name__}: "
            f"{_first_line(e)}).") from e
    LOG.info("copied %s to %s", uri, target)
    return target


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

    return _load_frozen(spec, variant, _random_cache_path(spec, variant), build,
                        calibration_pixels)


def _load_directories(spec: ModelSpec, variant, paths: list[str],
                      calibration_pixels=None) -> LoadedModel:
    """Every file layout ends as one frozen graph, cached on disk by weights
    digest: a later process (another worker, the next run) imports it in a
    second instead of loading and fusing the SavedModels again."""
    digest = _weights_digest(paths)
    return _load_frozen(spec, variant,
                        _directories_cache_path(variant, paths, digest),
                        lambda: _freeze_saved_models(spec, variant, paths, digest),
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
    frozen = _read_graph(cache)
    fresh = frozen is None
    if fresh:
        frozen = build()
    loaded = _finish(spec, variant, frozen.function(), frozen.weights_sha256,
                     frozen.note)
    if fresh:
        _write_graph(cache, frozen)
    return loaded, frozen


def _on_tensorflow(model: LoadedModel, reason: str,
                   parity: Optional[onnx_runtime.Parity] = None) -> LoadedModel:
    import tensorflow as tf
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    model.runtime = f"tensorflow {tf.__version__} {device}; {reason}"
    model.parity = parity
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


def _load_onnx(spec: ModelSpec, variant, cache: str, build) -> LoadedModel:
    """ONNX Runtime on the cached conversion (converted now where absent),
    checked on the probe batch against TensorFlow's outputs. With `auto`,
    any failure or a parity beyond tolerance falls back to TensorFlow with
    one warning; `onnxruntime` (forced) fails instead, or, on parity alone,
    warns and runs it anyway."""
    forced = spec.runtime == "onnxruntime"
    size = variant.input_size
    path = onnx_runtime.cache_path(cache)
    converted = onnx_runtime.read_cache(path)
    tf_model = None

    def fall_back(what: str, error: Optional[Exception] = None,
                  parity: Optional[onnx_runtime.Parity] = None) -> LoadedModel:
        detail = f"{type(error).__name__}: {_first_line(error)}" if error \
            else parity.describe()
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
            return fall_back("the model could not be converted to ONNX", e)
        onnx_runtime.write_cache(path, converted)
        LOG.info("converted %s to ONNX with %s; cached in %s",
                 spec.variant, converted.converter, path + ".onnx")
    try:
        runner = onnx_runtime.OnnxRunner(converted.model)
        parity = onnx_runtime.compare(
            converted.reference, runner(onnx_runtime.probe_pixels(size)))
    except Exception as e:
        return fall_back("ONNX Runtime could not run the converted model", e)
    if not parity.passed:
        if not forced:
            return fall_back("the ONNX Runtime outputs differ from "
                             "TensorFlow's beyond tolerance", parity=parity)
        LOG.warning("%s: the ONNX Runtime outputs differ from TensorFlow's "
                    "beyond tolerance (%s); running it with ONNX Runtime as "
                    "--runtime onnxruntime asks", spec.describe(),
                    parity.describe())
    return LoadedModel(spec, size, variant.feature_dim,
                       converted.weights_sha256, converted.heads, runner,
                       f"{runner.describe()}; {parity.describe()}", parity)


def _load_int8(spec: ModelSpec, variant, cache: str, build,
               calibration_pixels=None) -> LoadedModel:
    """The fp32 ONNX conversion quantized with `spec.calibration` (from the
    cache, else quantized now from `calibration_pixels()`), on
    `spec.engine` (auto: both timed, the faster kept). Raises
    QuantizationError where int8 cannot be had; the accuracy guard is the
    launcher's (`pipeline/calibration.py`), on held-out images."""
    fp32_spec = dataclasses.replace(spec, precision="fp32", engine="auto",
                                    calibration=None, runtime="onnxruntime")
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
                                    f"{_first_line(e)}") from e
        quantize.write_cache(qpath, model, calibration)
        LOG.info("quantized %s to int8 on %d calibration images; cached in %s",
                 spec.variant, len(pixels), qpath + ".onnx")
    size = variant.input_size
    probe = np.concatenate([onnx_runtime.probe_pixels(size)] * 4)  # 16 images
    try:
        if spec.engine == "auto":
            engine, runner, timings = quantize.choose_engine(
                model, qpath + ".onnx", probe)
        else:
            engine, runner, timings = spec.engine, quantize.runner(
                spec.engine, model, qpath + ".onnx"), {}
        runner(probe[:1])
    except Exception as e:
        raise QuantizationError(f"no engine runs the int8 model: "
                                f"{type(e).__name__}: {_first_line(e)}") from e
    record = {"calibration": calibration.to_dict(),
              "settings": quantize.settings(),
              "int8_instructions": quantize.int8_instructions() or "none",
              "engine_seconds_per_16": timings,
              "quantized_now": quantized_now}
    return LoadedModel(spec, size, variant.feature_dim, fp32.weights_sha256,
                       fp32.heads, runner,
                       f"{runner.describe()} int8 (QDQ, calibrated on "
                       f"{len(calibration.uris)} images); fp32 {fp32.runtime}",
                       fp32.parity, engine=engine, quantization=record,
                       reference=fp32)


def _random_cache_path(spec: ModelSpec, variant) -> str:
    return os.path.join(_cache_root(), "graphs", _key(
        "random", variant.name, str(spec.seed), _version("keras")))


def _directories_cache_path(variant, paths: list[str], digest: str) -> str:
    graphs = [_file_digest(os.path.join(p, "saved_model.pb")) for p in paths]
    return os.path.join(_cache_root(), "graphs",
                        _key(digest, variant.name, *graphs))


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
        cache = _random_cache_path(spec, variant)
        digest = None
    else:
        if paths is None:
            paths = resolve_model(spec)
        try:
            digest = _weights_digest(paths)
            cache = _directories_cache_path(variant, paths, digest)
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
                 f"tensorflow {_version('tensorflow')}; decided by each worker "
                 f"(--runtime {spec.runtime})")


def _freeze_saved_models(spec: ModelSpec, variant, paths: list[str],
                         digest: str):
    import tensorflow_hub as hub

    from transforms.model import fusion

    objs = [hub.load(p) for p in paths]
    if len(objs) == 2:
        return fusion.fuse_heads([_callable_head(o, variant.input_size)
                                  for o in objs], digest)
    obj, path = objs[0], paths[0]
    signatures = set(obj.signatures.keys())
    if {_CLS_SIG, _FV_SIG} <= signatures:
        if hasattr(obj, "prune") and hasattr(obj, "graph"):
            return fusion.freeze_graph(
                _prune_tf1(obj, path),
                "one pass: TF1 Hub module, both signatures pruned together",
                digest)
        return fusion.fuse_heads([_single_output(obj.signatures[_CLS_SIG]),
                                  _single_output(obj.signatures[_FV_SIG])],
                                 digest)
    if _FV_SIG in signatures:
        raise ModelUnavailableError(
            f"{spec.describe()} holds only the feature-vector head. Pass "
            "the classification module of the same variant instead: in "
            "the /3 layout it carries both heads.")
    raise ModelUnavailableError(
        f"{spec.describe()} holds one head only (a /4-/5 style "
        "SavedModel). Pass a directory holding classification/ and "
        "feature_vector/, or both with --model_handle and "
        "--feature_vector_handle.")


# Bump when the frozen graphs built here change, so old caches are ignored.
_GRAPH_FORMAT = "2"


def _key(*parts: str) -> str:
    """Cache key of a frozen graph: what shapes it, and the TF that built it."""
    return hashlib.sha256("|".join((_GRAPH_FORMAT, _version("tensorflow")) + parts)
                          .encode()).hexdigest()[:32]


def _version(module: str) -> str:
    """A package's version without importing it (importing TensorFlow takes
    seconds; `cached_info` must not)."""
    import importlib.metadata
    names = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel",
                            "tf-nightly")}.get(module, (module,))
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return importlib.import_module(module).__version__


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_graph(path: str):
    from transforms.model.fusion import FrozenGraph
    try:
        with open(path + ".json") as f:
            info = json.load(f)
        with open(path + ".pb", "rb") as f:
            return FrozenGraph.from_bytes(f.read(), info)
    except Exception:  # absent or damaged (any parse error): rebuild
        return None


def _write_graph(path: str, frozen) -> None:
    """Best effort and atomic: a reader sees a whole cache entry or none."""
    data, info = frozen.to_bytes()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex}"
        with open(temp + ".pb", "wb") as f:
            f.write(data)
        with open(temp + ".json", "w") as f:
            json.dump(info, f)
        os.replace(temp + ".pb", path + ".pb")  # the .json last: it marks it whole
        os.replace(temp + ".json", path + ".json")
    except OSError as e:
        LOG.warning("could not cache the frozen model in %s: %s", path, e)


def _single_output(fn):
    """Wrap a signature (kwargs in, dict out) as images -> one tensor."""
    import tensorflow as tf

    spec = fn.structured_input_signature[1]["images"]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, tf.float32)])
    def call(images):
        return fn(images=images)["default"]
    return call.get_concrete_function()


def _callable_head(obj, size: int):
    """The single head of a /4-/5 SavedModel as images -> one tensor."""
    import tensorflow as tf

    image_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    if callable(obj):
        @tf.function(input_signature=[image_spec])
        def call(images):
            out = obj(images)
            return out["default"] if isinstance(out, dict) else out
        return call.get_concrete_function()
    if "serving_default" in obj.signatures:
        sig = obj.signatures["serving_default"]
        (name,) = sig.structured_input_signature[1].keys()

        @tf.function(input_signature=[image_spec])
        def call_signature(images):
            (out,) = sig(**{name: images}).values()
            return out
        return call_signature.get_concrete_function()
    raise ModelUnavailableError("the SavedModel is neither callable nor has a "
                                "serving_default signature")


def _prune_tf1(obj, path: str):
    """Both heads of a TF1 Hub module from one graph call."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    # hub.load picks the meta graph with no tags for TF1 modules.
    (meta,) = [m for m in proto.meta_graphs if not m.meta_info_def.tags]
    cls, fv = meta.signature_def[_CLS_SIG], meta.signature_def[_FV_SIG]
    return obj.prune(feeds=[cls.inputs["images"].name],
                     fetches=[cls.outputs["default"].name,
                              fv.outputs["default"].name])


def _weights_digest(paths: list[str]) -> str:
    """sha256 over the variables files (or the graph, where weights are inline)."""
    digest = hashlib.sha256()
    for path in paths:
        var_dir = os.path.join(path, "variables")
        files = ([os.path.join(var_dir, f) for f in sorted(os.listdir(var_dir))]
                 if os.path.isdir(var_dir) and os.listdir(var_dir)
                 else [os.path.join(path, "saved_model.pb")])
        for name in files:
            digest.update(os.path.basename(name).encode())
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


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
            f"{variant.name} should ({type(e).__name__}: {_first_line(e)}). "
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


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
