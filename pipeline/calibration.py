"""`--precision int8|auto` in the launcher: draw the calibration sample,
quantize, check int8 against fp32, decide, before any image is written.

The sample is the first CALIBRATION_IMAGES images the job lists (or those
`--calibration_input` names), decoded with the job's own preprocessing;
images that do not decode are left out. The guard runs on images held out
of it (`quantize.split`), or, with `--calibration_input`, on the first of
the job's own inputs: what the int8 model is checked on is what it will
embed. Below the guard's limits, or where int8 cannot be had at all, the job
runs in fp32 after one warning saying why.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Optional

from transforms import listing
from transforms.decode import DecodeLimits, PreprocessSettings, decode_sample
from transforms.model import quantize
from transforms.model.loading import (LoadedModel, ModelSpec,
                                      ModelUnavailableError, QuantizationError,
                                      gpu_present, load_model)

LOG = logging.getLogger("mobilenet_embed")


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
    if quantize.int8_instructions() is None:
        return ("this CPU has no VNNI/AMX int8 instructions, without which "
                "int8 gains little over fp32")
    return None


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

    def fall_back(why: str) -> Decision:
        LOG.warning("int8 not used, running fp32: %s", why)
        return Decision(spec, reason=f"{precision}: fell back to fp32: {why}")

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
    pixels, kept = decode_sample(sample_uris, settings, limits)
    if not kept:
        return fall_back(f"no calibration image could be read and decoded "
                         f"from {source}")
    if calibration_input:
        guard_uris = listing.first_uris(patterns, manifest, extensions,
                                        quantize.GUARD_IMAGES)
        guard_pixels, _ = decode_sample(guard_uris, settings, limits)
        if not len(guard_pixels):
            return fall_back("none of the job's first inputs decodes, so "
                             "the guard has nothing to check int8 on")
    else:
        guard_pixels = pixels[quantize.split(len(pixels))[1]]
    calibration = quantize.Calibration(
        tuple(kept), quantize.pixels_digest(pixels),
        json.dumps(settings.to_metadata(), sort_keys=True), source)
    int8_spec = dataclasses.replace(spec, precision="int8",
                                    calibration=calibration)
    try:
        model = load_model(int8_spec, paths, calibration_pixels=lambda: pixels)
    except (QuantizationError, ModelUnavailableError) as e:
        return fall_back(str(e))
    result = quantize.guard(predict(model.reference, guard_pixels),
                            predict(model, guard_pixels), guard_limits)
    if not result.passed:
        return fall_back(f"the accuracy guard failed ({result.describe()})")
    LOG.info("int8 on %s: %s", model.engine, result.describe())
    model.quantization = dict(model.quantization or {}, guard=result.to_dict())
    return Decision(int8_spec, model)


def predict(model: LoadedModel, pixels, step: int = 16):
    """(logits, features) of many images, 16 at a time: the model's memory
    grows with the batch (1.4_224 at 200 images in one call: 18 GB)."""
    import numpy as np
    parts = [model.predict(pixels[i:i + step]) for i in range(0, len(pixels), step)]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))
