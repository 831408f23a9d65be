"""int8: the fused ONNX graph quantized statically, its cache, its guard.

`--precision int8` runs the same fused two-output graph that ONNX Runtime
runs in fp32 (`onnx_runtime`), quantized by ONNX Runtime's static quantizer:
QDQ format, weights int8 per output channel, activations uint8 with ranges
calibrated on a sample of the user's own images (decoded with the job's
preprocessing; `pipeline/calibration.py` draws it). On CPUs without VNNI the
quantizer's `reduce_range` (7-bit weights) is used, as ONNX Runtime advises,
to avoid the saturation of u8s8 multiply-adds there.

The quantized model is cached beside the fp32 conversion it came from
(keyed like it: weights, TensorFlow, converter, opset) under a key that adds
the calibration's digest (`Calibration.sha256`, over the decoded pixels)
and the quantizer's settings, so a later run, another worker or a query
gets the same bytes without calibrating again.

It runs on ONNX Runtime or OpenVINO (`openvino_runtime`), whichever is
faster on this machine, measured (`engines.choose`). Before any image is
written the launcher checks it against fp32 on held-out images of the
sample (`Guard`); below the limits the job falls back to fp32.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
from typing import Optional

import numpy as np

from transforms.model import cache, engines
from transforms.model.cache import version

LOG = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8", "auto")

# How many images of the user's input calibrate the activation ranges, and
# how many of them are held out for the guard. A few hundred is what ONNX
# Runtime's and OpenVINO's guides use for CNNs; MinMax ranges settle by then.
CALIBRATION_IMAGES = 256
GUARD_IMAGES = 64

# The accuracy guard: int8 against fp32 on held-out images of the sample.
# Measured on the real 1.0_224 weights (a quantization-aware-trained release)
# with the sample photos (benchmarks/results/int8.md): top-1 agreement
# 0.98-1.0, feature cosine min 0.972-0.977, median 0.992; top-1 against the
# labels 0.845 fp32, 0.835-0.86 int8. The limits sit well below that, so a
# sample merely unlike ImageNet passes, and above what a broken quantization
# gives (ranges from the wrong images or a dropped scale: cosines of 0.3-0.8,
# top-1 agreement far below 0.85).
GUARD_TOP1_AGREEMENT = 0.85  # share of images whose top-1 class is fp32's
GUARD_COSINE_MIN = 0.90  # the worst image's feature cosine to fp32
GUARD_COSINE_MEDIAN = 0.975  # the typical image's

# Bump when the quantization below changes, so older cached files are ignored.
_QUANT_FORMAT = "3"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux); empty where unknown."""
    return engines.cpu_info()[1]


def int8_instructions(flags: Optional[set[str]] = None) -> Optional[str]:
    """The int8 dot-product instructions of this CPU (VNNI or AMX), or None:
    without them int8 multiply-adds gain little over fp32 (and `auto`
    keeps fp32)."""
    flags = cpu_flags() if flags is None else flags
    if not isa_cap_allows_vnni():
        return None
    found = [f for f in ("amx_int8", "avx512_vnni", "avx_vnni") if f in flags]
    return ", ".join(found) or None


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above the first with VNNI.
_VNNI_ISA_WORDS = ("VNNI", "AMX", "BF16", "FP16", "AVX10")


def isa_cap_allows_vnni(cap: Optional[str] = None) -> bool:
    """False where ONEDNN_MAX_CPU_ISA caps oneDNN (and OpenVINO) below VNNI,
    e.g. AVX2 or AVX512_CORE: OpenVINO then multiplies u8 by s8 with the
    AVX2 instructions that saturate, whatever the CPU has (measured: 8-bit
    weights under the AVX2 cap on a VNNI CPU, feature cosine min 0.685), so
    the weights must be quantized as for a CPU without VNNI."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA", "") if cap is None else cap).upper()
    return not cap or cap == "ALL" or any(word in cap for word in _VNNI_ISA_WORDS)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What the int8 model was calibrated on: enough to rebuild it identically
    (the same files decoded the same way give the same `sha256`)."""
    uris: tuple[str, ...]  # the images, in the order used
    sha256: str  # of the decoded pixels: the cache key
    preprocessing: str = ""  # JSON of the settings they were decoded with
    source: str = ""  # where the sample was drawn from, for the record

    def to_dict(self) -> dict:
        return {"images": len(self.uris), "sha256": self.sha256,
                "source": self.source, "uris": list(self.uris)}


def pixels_digest(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{pixels.shape}|{pixels.dtype}".encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def split(n: int) -> tuple[slice, slice]:
    """(calibration, guard) parts of a sample of n images: the guard's are
    held out; a sample too small to spare any is used for both."""
    held = min(GUARD_IMAGES, n // 4)
    if held < 4:
        return slice(0, n), slice(0, n)
    return slice(0, n - held), slice(n - held, n)


# --- quantization -------------------------------------------------------------------

def settings(reduce_range: Optional[bool] = None) -> dict:
    """The quantizer's settings (part of the cache key)."""
    if reduce_range is None:
        reduce_range = int8_instructions() is None
    return {"format": "QDQ", "per_channel": True, "weights": "int8",
            "activations": "uint8", "calibration": "minmax",
            "reduce_range": reduce_range, "float_head": True,
            # With 7-bit weights the depthwise 3x3 convolutions (9 weights per
            # channel) lose the most: measured on the real 1.0_224 weights
            # and 50 held-out photos, all layers int8 gave feature cosine min
            # 0.882 and top-1 agreement 0.860 (the guard fails); the depthwise
            # ones kept float, 0.971 and 0.980 (ONNX Runtime; OpenVINO 0.973,
            # 0.960). They are about 6% of the multiply-adds.
            "float_depthwise": reduce_range}


def depthwise_nodes(fp32_model: bytes) -> list[str]:
    """The grouped (depthwise) convolutions' node names."""
    import onnx
    names = []
    for node in onnx.load_from_string(fp32_model).graph.node:
        groups = [a.i for a in node.attribute if a.name == "group"]
        if node.op_type == "Conv" and groups and groups[0] > 1 and node.name:
            names.append(node.name)
    return names


def head_nodes(fp32_model: bytes) -> list[str]:
    """The nodes from the global average pool on (pool, squeeze, logits
    MatMul and bias), kept in float: quantized, the features would leave
    as 256 uint8 levels (measured on random weights: int8 feature cosine
    between the two engines down to 0.966, fp32 vs int8 median lower), for
    about 0.5% of the multiply-adds."""
    import onnx
    graph = onnx.load_from_string(fp32_model).graph
    names, seen = [], False
    for node in graph.node:  # topologically sorted
        seen = seen or node.op_type in ("GlobalAveragePool", "ReduceMean")
        if seen and node.name:
            names.append(node.name)
    return names


def quantize(fp32_model: bytes, calibration: np.ndarray,
             reduce_range: Optional[bool] = None) -> bytes:
    """The fp32 ONNX model (uint8 `pixels` in) quantized statically with
    activation ranges from `calibration` (uint8 [N, H, W, 3])."""
    from onnxruntime.quantization import CalibrationDataReader

    from transforms.model import onnx_runtime
    chosen = settings(reduce_range)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(
                [{onnx_runtime.INPUT: calibration[i:i + 16]}
                 for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self._batches, None)

    quiet = _DropAdvice()
    logging.getLogger().addFilter(quiet)  # the quantizer logs on the root logger
    try:
        return _quantize_files(fp32_model, Reader, chosen)
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropAdvice(logging.Filter):
    """The quantizer's advice to run its pre-processing (shape inference and
    graph optimizations): tf2onnx's graph is already optimized and
    static-shaped, and the guard measures the result."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


def _quantize_files(fp32_model: bytes, Reader, chosen: dict) -> bytes:
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    with tempfile.TemporaryDirectory(prefix="mobilenet_int8_") as work:
        source, target = (os.path.join(work, n) for n in ("fp32.onnx", "int8.onnx"))
        with open(source, "wb") as f:
            f.write(fp32_model)
        quantize_static(
            source, target, Reader(), quant_format=QuantFormat.QDQ,
            nodes_to_exclude=((head_nodes(fp32_model) if chosen["float_head"] else [])
                              + (depthwise_nodes(fp32_model)
                                 if chosen["float_depthwise"] else [])),
            per_channel=chosen["per_channel"], weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            reduce_range=chosen["reduce_range"],
            calibrate_method=CalibrationMethod.MinMax)
        with open(target, "rb") as f:
            return f.read()


# --- cache --------------------------------------------------------------------------

def cache_path(onnx_path: str, calibration_sha256: str,
               reduce_range: Optional[bool] = None) -> str:
    """Beside the fp32 conversion (whose path holds its own key), under a key
    adding the quantizer, its settings and the calibration."""
    key = hashlib.sha256(json.dumps(
        [_QUANT_FORMAT, version("onnxruntime"), settings(reduce_range),
         calibration_sha256]).encode()).hexdigest()[:16]
    return f"{onnx_path}.int8-{key}"


def read_cache(path: str) -> Optional[bytes]:
    try:
        with open(path + ".json") as f:
            info = json.load(f)
        with open(path + ".onnx", "rb") as f:
            model = f.read()
        if hashlib.sha256(model).hexdigest() != info["onnx_sha256"]:
            return None
        return model
    except Exception:  # absent or damaged: quantize again
        return None


def write_cache(path: str, model: bytes, calibration: Calibration) -> None:
    """Best effort and atomic: the .json (the calibration record), written
    last, marks the entry whole."""
    cache.write_entry_atomic(path, {".onnx": model}, {
        "onnx_sha256": hashlib.sha256(model).hexdigest(), "settings": settings(),
        "preprocessing": calibration.preprocessing,
        "calibration": calibration.to_dict()}, "the int8 model")


# --- the guard -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Guard:
    """How close int8's outputs are to fp32's on held-out images."""
    images: int
    top1_agreement: float
    cosine_min: float
    cosine_median: float
    limits: tuple[float, float, float] = (GUARD_TOP1_AGREEMENT, GUARD_COSINE_MIN,
                                          GUARD_COSINE_MEDIAN)

    @property
    def passed(self) -> bool:
        top1, low, median = self.limits
        return (self.top1_agreement >= top1 and self.cosine_min >= low
                and self.cosine_median >= median)

    def describe(self) -> str:
        top1, low, median = self.limits
        return (f"int8 vs fp32 on {self.images} held-out images: top-1 "
                f"agreement {self.top1_agreement:.3f} (limit {top1}), feature "
                f"cosine min {self.cosine_min:.4f} (limit {low}), median "
                f"{self.cosine_median:.4f} (limit {median})")

    def to_dict(self) -> dict:
        return {"images": self.images, "top1_agreement": round(self.top1_agreement, 4),
                "cosine_min": round(self.cosine_min, 5),
                "cosine_median": round(self.cosine_median, 5),
                "limits": {"top1_agreement": self.limits[0],
                           "cosine_min": self.limits[1],
                           "cosine_median": self.limits[2]},
                "passed": self.passed}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    values = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30),
                      1.0)
    return np.nan_to_num(values, nan=-1.0)


def guard(reference: tuple[np.ndarray, np.ndarray],
          candidate: tuple[np.ndarray, np.ndarray],
          limits: Optional[tuple[float, float, float]] = None) -> Guard:
    """The guard's figures of `candidate` (int8 logits, features) against
    `reference` (fp32's) on the same images."""
    (ref_logits, ref_features), (logits, features) = reference, candidate
    agree = float(np.mean(np.argmax(ref_logits, 1) == np.argmax(logits, 1)))
    values = cosines(ref_features, features)
    if not np.isfinite(logits).all():
        agree = 0.0
    return Guard(len(values), agree, float(values.min()),
                 float(statistics.median(values.tolist())),
                 limits or (GUARD_TOP1_AGREEMENT, GUARD_COSINE_MIN,
                            GUARD_COSINE_MEDIAN))
