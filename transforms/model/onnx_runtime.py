"""ONNX Runtime runs the model that TensorFlow loaded.

TensorFlow still reads every model source and builds the fused two-output
frozen graph (`loading`, `fusion`); that graph is converted once with tf2onnx
and run by ONNX Runtime, which on this model is about twice as fast on CPU
(benchmarks/). Both heads still come from one pass: the converted graph is
the fused one, with a uint8 input (cast and scaled to [0, 1] inside it, as
TensorFlow's `predict` does) and the outputs `logits` and `features`.

The conversion is cached beside the frozen graph it came from (whose key
holds the weights digest), under a key of its own holding the converter and
opset, together with TensorFlow's outputs on a fixed probe batch. Every load
runs the converted model on that probe and compares (`Parity`); `loading`
falls back to TensorFlow when the outputs differ beyond `PARITY_TOLERANCE`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Optional

import numpy as np

from transforms.model import cache, threads
from transforms.model.cache import version

LOG = logging.getLogger(__name__)

OPSET = 17
# Bump when the conversion below changes, so older cached files are ignored.
_ONNX_FORMAT = "1"
INPUT, LOGITS, FEATURES = "pixels", "logits", "features"

# Largest |ONNX - TensorFlow| allowed on the probe, as a fraction of the
# largest |TensorFlow output| (at least 1). Measured on the real 1.0_224
# weights: 2.3e-5 absolute on outputs up to 6.3, i.e. about 4e-6 of scale;
# a wrong conversion (layout, padding, a dropped op) is off by O(1).
PARITY_TOLERANCE = 1e-3
PROBE_IMAGES = 4
_PROBE_SEED = 20240229


def probe_pixels(size: int) -> np.ndarray:
    """The fixed probe batch: seeded noise, the same in every process."""
    return np.random.RandomState(_PROBE_SEED).randint(
        0, 256, (PROBE_IMAGES, size, size, 3)).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class Parity:
    """How far the converted model's outputs are from TensorFlow's."""
    logits_max_abs: float
    features_max_abs: float
    features_min_cosine: float
    limit_logits: float  # the tolerance in absolute terms for these outputs
    limit_features: float

    @property
    def passed(self) -> bool:
        return (self.logits_max_abs <= self.limit_logits
                and self.features_max_abs <= self.limit_features)

    def describe(self) -> str:
        return (f"parity max|d| logits {self.logits_max_abs:.1e}, features "
                f"{self.features_max_abs:.1e} (limits {self.limit_logits:.1e}, "
                f"{self.limit_features:.1e}), feature cosine >= "
                f"{self.features_min_cosine:.7f}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(reference: tuple[np.ndarray, np.ndarray],
            candidate: tuple[np.ndarray, np.ndarray],
            tolerance: Optional[float] = None) -> Parity:
    """Parity of `candidate` (logits, features) against `reference`."""
    tolerance = PARITY_TOLERANCE if tolerance is None else tolerance
    (ref_logits, ref_features), (logits, features) = reference, candidate
    if logits.shape != ref_logits.shape or features.shape != ref_features.shape:
        raise ValueError(f"the converted model gives shapes {logits.shape}, "
                         f"{features.shape}; TensorFlow gives "
                         f"{ref_logits.shape}, {ref_features.shape}")

    def max_abs(a, b):
        d = np.abs(a.astype(np.float64) - b)
        # NaN anywhere must fail the check, and max() would hide it.
        return float("inf") if not np.isfinite(d).all() else float(d.max())

    a, b = ref_features.astype(np.float64), features.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cosine = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30),
                      1.0)
    return Parity(
        logits_max_abs=max_abs(logits, ref_logits),
        features_max_abs=max_abs(features, ref_features),
        features_min_cosine=float(np.nan_to_num(cosine, nan=-1.0).min()),
        limit_logits=tolerance * max(1.0, float(np.abs(ref_logits).max())),
        limit_features=tolerance * max(1.0, float(np.abs(ref_features).max())))


# --- conversion -------------------------------------------------------------------

def converter() -> str:
    """The converter and opset, as recorded and as part of the cache key."""
    return f"tf2onnx {version('tf2onnx')} opset {OPSET}"


def convert(frozen, input_size: int) -> bytes:
    """The fused frozen graph (float images in [0, 1]) as an ONNX model
    taking uint8 pixels [N, H, W, 3] and giving `logits`, `features`."""
    import onnx
    import tf2onnx
    from onnx import TensorProto, helper

    model, _ = tf2onnx.convert.from_graph_def(
        frozen.graph_def, input_names=[frozen.input_name],
        output_names=list(frozen.output_names), opset=OPSET)
    graph = model.graph
    (old_input,) = [i for i in graph.input if i.name == frozen.input_name]
    graph.input.remove(old_input)
    graph.input.append(helper.make_tensor_value_info(
        INPUT, TensorProto.UINT8, ["batch", input_size, input_size, 3]))
    # Cast, then divide by 255 as TensorFlow's predict does (a multiply by
    # 1/255 would round differently).
    graph.initializer.append(helper.make_tensor(
        "pixel_scale", TensorProto.FLOAT, [], [255.0]))
    graph.node.insert(0, helper.make_node(
        "Cast", [INPUT], ["pixels_float"], to=TensorProto.FLOAT))
    graph.node.insert(1, helper.make_node(
        "Div", ["pixels_float", "pixel_scale"], [frozen.input_name]))
    old_outputs = list(graph.output)
    del graph.output[:]
    for old, name in zip(old_outputs, (LOGITS, FEATURES)):
        graph.node.append(helper.make_node("Identity", [old.name], [name]))
        shape = [d.dim_value or d.dim_param or "batch"
                 for d in old.type.tensor_type.shape.dim]
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, shape))
    onnx.checker.check_model(model)
    return model.SerializeToString()


# --- cache ---------------------------------------------------------------------------

@dataclasses.dataclass
class Converted:
    """A cached conversion: the ONNX bytes and TensorFlow's probe outputs."""
    model: bytes
    reference: tuple[np.ndarray, np.ndarray]
    weights_sha256: str
    heads: str
    converter: str


def cache_path(graph_cache: str) -> str:
    """Beside the frozen graph's cache entry (keyed by weights digest and
    TensorFlow version), under a key holding the converter and opset."""
    key = hashlib.sha256(f"{_ONNX_FORMAT}|{converter()}".encode()
                         ).hexdigest()[:16]
    return f"{graph_cache}.onnx-{key}"


def read_cache(path: str) -> Optional[Converted]:
    try:
        with open(path + ".json") as f:
            info = json.load(f)
        with open(path + ".onnx", "rb") as f:
            model = f.read()
        with np.load(path + ".npz") as probe:
            reference = (probe["logits"], probe["features"])
        if hashlib.sha256(model).hexdigest() != info["onnx_sha256"]:
            return None
        return Converted(model, reference, info["weights_sha256"],
                         info["heads"], info["converter"])
    except Exception:  # absent or damaged: convert again
        return None


def write_cache(path: str, converted: Converted) -> None:
    """Best effort and atomic: the .json, written last, marks it whole."""
    import io
    reference = io.BytesIO()
    np.savez(reference, logits=converted.reference[0], features=converted.reference[1])
    cache.write_entry_atomic(
        path, {".onnx": converted.model, ".npz": reference.getvalue()},
        {"weights_sha256": converted.weights_sha256, "heads": converted.heads,
         "converter": converted.converter,
         "onnx_sha256": hashlib.sha256(converted.model).hexdigest()}, "the ONNX model")


# --- sessions ---------------------------------------------------------------------------

def providers() -> list[str]:
    """CUDA where this onnxruntime has it (onnxruntime-gpu), else CPU."""
    import onnxruntime as ort
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
            if p in available]


def session_options():
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # No busy-waiting between ops: the worker's other threads read and
    # decode images on the same cores, and other processes share them
    # (measured on 2 busy cores, 2 threads, 1.0_224: about 34 images/s
    # without spinning against 17-27 with it).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if threads.intra_op():
        options.intra_op_num_threads = threads.intra_op()
    if threads.inter_op():
        options.inter_op_num_threads = threads.inter_op()
    return options


class OnnxRunner:
    """uint8 pixels [N, H, W, 3] -> (logits, features) as numpy float32."""

    def __init__(self, model: bytes):
        import onnxruntime as ort
        self.session = ort.InferenceSession(model, session_options(),
                                            providers=providers())
        self.provider = self.session.get_providers()[0]
        self.version = ort.__version__

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, features = self.session.run(
            [LOGITS, FEATURES], {INPUT: np.ascontiguousarray(pixels)})
        return logits, features

    def describe(self) -> str:
        return f"onnxruntime {self.version} {self.provider}"
