"""Decode+resize speed per core: reduced-size JPEG decoding vs a full decode.

Runs `transforms.decode.decode_and_resize` on bytes already in memory, in
this process's single thread. Speed is images per CPU-second of this
process: what one core does, and far less sensitive than wall time to other
processes on a shared machine (wall-clock figures are kept alongside).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from transforms.decode import DecodeLimits, PreprocessSettings, decode_and_resize

# The project's own tolerance (tests/test_decode.py DRAFT_TOLERANCE): mean
# absolute difference, in 0..255 levels, between reduced and full decoding.
TOLERANCE_MEAN_LEVELS = 1.5
LIMITS = DecodeLimits()


def _settings(size: int, reduced: bool) -> PreprocessSettings:
    return PreprocessSettings(size, size, reduced_jpeg_decode=reduced)


def _time_one(data: bytes, settings: PreprocessSettings) -> tuple[float, float]:
    """(CPU s, wall s) of one decode."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    decode_and_resize(data, settings, LIMITS)
    return time.process_time() - cpu0, time.perf_counter() - wall0


def _pixel_difference(blobs: list[bytes], size: int) -> dict:
    per_image_mean, worst = [], 0
    for data in blobs:
        reduced = decode_and_resize(data, _settings(size, True), LIMITS)[0]
        full = decode_and_resize(data, _settings(size, False), LIMITS)[0]
        diff = np.abs(reduced.astype(np.int16) - full.astype(np.int16))
        per_image_mean.append(float(diff.mean()))
        worst = max(worst, int(diff.max()))
    return {"mean_abs_levels": round(statistics.mean(per_image_mean), 3),
            "worst_image_mean_abs_levels": round(max(per_image_mean), 3),
            "max_abs_levels": worst,
            "within_tolerance": max(per_image_mean) <= TOLERANCE_MEAN_LEVELS}


def measure_set(name: str, paths: list[Path], sizes: tuple[int, ...],
                rounds: int) -> dict:
    """Reduced vs full decoding of one image set at each size. The cases
    alternate image by image, so a burst of load hits them alike."""
    blobs = [p.read_bytes() for p in paths]
    cases = [(size, reduced) for size in sizes for reduced in (True, False)]
    totals = {case: [] for case in cases}
    for _ in range(rounds):
        spent = {case: [0.0, 0.0] for case in cases}
        for data in blobs:
            for case in cases:
                cpu, wall = _time_one(data, _settings(*case))
                spent[case][0] += cpu
                spent[case][1] += wall
        for case in cases:
            totals[case].append(tuple(spent[case]))
    pixels = statistics.mean(_pixel_count(p) for p in paths)
    result = {"name": name, "images": len(blobs),
              "mean_file_mb": round(statistics.mean(map(len, blobs)) / 1e6, 3),
              "mean_megapixels": round(pixels / 1e6, 1),
              "bytes_per_pixel": round(statistics.mean(map(len, blobs)) / pixels, 3),
              "sizes": {}}
    for size in sizes:
        reduced = _rates(totals[(size, True)], len(blobs))
        full = _rates(totals[(size, False)], len(blobs))
        result["sizes"][size] = {
            "reduced": reduced, "full": full,
            "speedup": round(reduced["per_core_images_per_s"]
                             / full["per_core_images_per_s"], 2),
            "difference": _pixel_difference(blobs, size)}
    return result


def _pixel_count(path: Path) -> int:
    from PIL import Image
    with Image.open(path) as im:
        return im.width * im.height


def _rates(runs: list[tuple[float, float]], n: int) -> dict:
    cpu = statistics.median(r[0] for r in runs)
    wall = statistics.median(r[1] for r in runs)
    return {"per_core_images_per_s": round(n / cpu, 1),
            "wall_images_per_s": round(n / wall, 1),
            "ms_per_image": round(1000 * cpu / n, 2)}


def run(sets: dict[str, tuple[str, list[Path]]], sizes: tuple[int, ...],
        rounds: int) -> dict:
    """sets: {key: (description, paths)}."""
    out = {key: measure_set(name, paths, sizes, rounds)
           for key, (name, paths) in sets.items()}
    out["tolerance_mean_levels"] = TOLERANCE_MEAN_LEVELS
    return out
