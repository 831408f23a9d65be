"""`--precision int8|auto` in the launcher: draw the calibration sample,
quantize, check int8 against fp32, decide, before any image is written.

The sample is the first CALIBRATION_IMAGES images the job lists (or those
`--calibration_input` names), decoded with the job's own preprocessing;
images that do not decode are left out. The guard runs on images held out
of it (`quantize.split`), or, with `--calibration_input`, on the first of
the job's own inputs: what the int8 model is checked on is what it will
embed. Below the guard's limits, or where int8 cannot be had at all, the job
runs in fp32 after one warning saying why.

`--precision auto` tries int8 on every CPU (also without VNNI/AMX: what
counts is what it gives here) and keeps it only where the guard passes and
int8 is measured faster end to end on this machine (`predicted_speedup`:
decoding plus the model per image, fp32 against int8, at the job's batch
size) by at least AUTO_MIN_SPEEDUP; otherwise fp32, with one line saying
why. The decision is cached per machine, model, batch size and
calibration sample (`decision_path`), so later runs and workers on the same
machine do not quantize or time again to reach the same answer.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Optional

from transforms import listing
from transforms.decode import DecodeLimits, PreprocessSettings, decode_sample
from transforms.model import cache, engines, quantize
from transforms.model.loading import (LoadedModel, ModelSpec,
                                      ModelUnavailableError, QuantizationError,
                                      gpu_present, load_model, timing_pixels)

LOG = logging.getLogger("mobilenet_embed")

# `auto` keeps int8 only where it is predicted at least this much faster end
# to end: below it the gain is within a shared machine's noise, and int8
# costs accuracy (the guard's limits allow some).
AUTO_MIN_SPEEDUP = 1.05
# Bump when what a cached decision means changes.
_DECISION_FORMAT = "1"


class CalibrationInputError(ValueError):
    """--calibration_input names no image: the user's to fix (exit 2)."""


@dataclasses.dataclass
class Decision:
    """What the launcher settled on: `model` is the int8 model that passed
    the guard, None for fp32; `reason` says why fp32 where it was not asked."""
    spec: ModelSpec
    model: Optional[LoadedModel] = None
    reason: str = ""


def auto_reason(spec: ModelSpec) -> Optional[str]:
    """Why `--precision auto` keeps fp32 before trying anything; None: try int8."""
    if spec.runtime == "tensorflow":
        return "--runtime tensorflow runs fp32 only"
    if gpu_present():
        return "a GPU runs the model in fp32"
    return None


@dataclasses.dataclass
class Speed:
    """Milliseconds per image on this machine: decoding (CPU time, one
    process) and the model in fp32 and in int8 at the job's batch size."""
    decode_ms: float
    fp32_ms: float
    int8_ms: float

    @property
    def speedup(self) -> float:
        """int8's end-to-end rate over fp32's: both stages share the cores,
        so an image costs its decode plus its share of a model call."""
        return (self.decode_ms + self.fp32_ms) / (self.decode_ms + self.int8_ms)

    def describe(self) -> str:
        return (f"int8 is {self.speedup:.2f}x fp32 end to end here (decode "
                f"{self.decode_ms:.2f} ms + model {self.fp32_ms:.2f} ms fp32 vs "
                f"{self.int8_ms:.2f} ms int8 per image; needs "
                f">= {AUTO_MIN_SPEEDUP:.2f}x)")

    def to_dict(self) -> dict:
        return {"decode_ms": round(self.decode_ms, 3), "fp32_ms": round(self.fp32_ms, 3),
                "int8_ms": round(self.int8_ms, 3), "speedup": round(self.speedup, 3),
                "min_speedup": AUTO_MIN_SPEEDUP}


def model_ms_per_image(model: LoadedModel, pixels) -> float:
    """Best of a few timed calls on one job-sized batch."""
    return engines.time_runner(model.predict, pixels) / len(pixels) * 1000


def measure_speed(model: LoadedModel, decode_ms: float) -> Speed:
    """fp32 (the int8 model's reference) and int8 timed alternately on the
    same batch, so a busy neighbour slows both alike."""
    pixels = timing_pixels(model.input_size, model.spec.batch_size)
    fp32, int8 = [], []
    for _ in range(2):
        fp32.append(model_ms_per_image(model.reference, pixels))
        int8.append(model_ms_per_image(model, pixels))
    return Speed(decode_ms, min(fp32), min(int8))


def decision_path(spec: ModelSpec, calibration_sha256: str,
                  guard_limits: Optional[tuple] = None) -> str:
    """Where `auto`'s decision for this model, batch size, calibration
    sample and machine (`engines.machine()`) is kept."""
    model = dataclasses.replace(spec, precision="fp32", calibration=None, engine="auto")
    key = hashlib.sha256(repr((
        _DECISION_FORMAT, repr(model), calibration_sha256, AUTO_MIN_SPEEDUP,
        guard_limits, sorted((k, str(v)) for k, v in engines.machine().items()),
    )).encode()).hexdigest()[:16]
    return os.path.join(cache.cache_root(), "decisions", f"{spec.variant}-{key}.json")


def _sample(calibration_input, patterns, manifest, extensions,
            settings, limits):
    """(pixels, kept uris, guard pixels or None, source, decode ms per image)."""
    if calibration_input:
        sample_uris = listing.first_uris(
            [listing.normalize_pattern(calibration_input)], None, extensions,
            quantize.CALIBRATION_IMAGES)
        source = f"--calibration_input {calibration_input}"
        if not sample_uris:
            raise CalibrationInputError(
                f"--calibration_input {calibration_input} matched no images")
    else:
        sample_uris = listing.first_uris(patterns, manifest, extensions,
                                         quantize.CALIBRATION_IMAGES)
        source = "the first images of the job's inputs"
    started = time.process_time()  # CPU time: reading gs:// is not decoding
    pixels, kept = decode_sample(sample_uris, settings, limits)
    decode_ms = (time.process_time() - started) / max(len(sample_uris), 1) * 1000
    guard_pixels = None
    if calibration_input and kept:
        guard_uris = listing.first_uris(patterns, manifest, extensions,
                                        quantize.GUARD_IMAGES)
        guard_pixels, _ = decode_sample(guard_uris, settings, limits)
    elif kept:
        guard_pixels = pixels[quantize.split(len(pixels))[1]]
    return pixels, kept, guard_pixels, source, decode_ms


def decide(spec: ModelSpec, precision: str, settings: PreprocessSettings,
           limits: DecodeLimits, patterns: list[str], manifest: Optional[str],
           extensions, calibration_input: Optional[str],
           paths: Optional[list[str]] = None,
           guard_limits: Optional[tuple[float, float, float]] = None) -> Decision:
    """fp32 or int8 for this job (`precision` is fp32, int8 or auto)."""
    if precision == "fp32":
        return Decision(spec)
    if precision == "auto":
        reason = auto_reason(spec)
        if reason:
            LOG.info("--precision auto: fp32, because %s", reason)
            return Decision(spec, reason=f"auto: {reason}")

    def fall_back(why: str, remember: Optional[str] = None) -> Decision:
        if precision == "auto":
            LOG.info("--precision auto: fp32, because %s", why)
            if remember:
                cache.write_json_atomic(remember, {"precision": "fp32", "reason": why},
                                        "the precision decision")
            return Decision(spec, reason=f"auto: {why}")
        LOG.warning("int8 not used, running fp32: %s", why)
        return Decision(spec, reason=f"{precision}: fell back to fp32: {why}")

    pixels, kept, guard_pixels, source, decode_ms = _sample(
        calibration_input, patterns, manifest, extensions, settings, limits)
    if not kept:
        return fall_back(f"no calibration image could be read and decoded "
                         f"from {source}")
    if not len(guard_pixels):
        return fall_back("none of the job's first inputs decodes, so "
                         "the guard has nothing to check int8 on")
    calibration = quantize.Calibration(
        tuple(kept), quantize.pixels_digest(pixels),
        json.dumps(settings.to_metadata(), sort_keys=True), source)
    remember = None
    if precision == "auto":
        remember = decision_path(spec, calibration.sha256, guard_limits)
        earlier = cache.read_json(remember) or {}
        if earlier.get("precision") == "fp32":
            return fall_back(f"{earlier.get('reason', '?')} (decided earlier on this "
                             f"machine; delete {remember} to measure again)")
    int8_spec = dataclasses.replace(spec, precision="int8",
                                    calibration=calibration)
    try:
        model = load_model(int8_spec, paths, calibration_pixels=lambda: pixels)
    except (QuantizationError, ModelUnavailableError) as e:
        return fall_back(str(e))  # not remembered: it may be transient
    result = quantize.guard(predict(model.reference, guard_pixels),
                            predict(model, guard_pixels), guard_limits)
    if not result.passed:
        return fall_back(f"the accuracy guard failed ({result.describe()})", remember)
    record = dict(model.quantization or {}, guard=result.to_dict())
    if precision == "auto":
        speed = (Speed(**{k: earlier[k] for k in ("decode_ms", "fp32_ms", "int8_ms")})
                 if earlier.get("precision") == "int8" else measure_speed(model, decode_ms))
        if speed.speedup < AUTO_MIN_SPEEDUP:
            return fall_back(speed.describe(), remember)
        cache.write_json_atomic(remember, {"precision": "int8", **speed.to_dict()},
                                "the precision decision")
        record["auto"] = dict(speed.to_dict(), cached=earlier.get("precision") == "int8")
        LOG.info("--precision auto: int8, because %s", speed.describe())
    LOG.info("int8 on %s: %s", model.engine, result.describe())
    model.quantization = record
    return Decision(int8_spec, model)


def predict(model: LoadedModel, pixels, step: int = 16):
    """(logits, features) of many images, 16 at a time: the model's memory
    grows with the batch (1.4_224 at 200 images in one call: 18 GB)."""
    import numpy as np
    parts = [model.predict(pixels[i:i + step]) for i in range(0, len(pixels), step)]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))
