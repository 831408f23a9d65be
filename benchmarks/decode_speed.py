"""Decode+resize speed per core: reduced-size JPEG decoding vs a full decode.

Runs `transforms.decode.decode_and_resize` on bytes already in memory, in
this process's single thread. Speed is images per CPU-second of this
process: what one core does, and far less sensitive than wall time to other
processes on a shared machine (wall-clock figures are kept alongside).
"""
from __future__ import annotations

import io
import statistics
import time
from pathlib import Path

import numpy as np

from transforms.decode import DecodeLimits, PreprocessSettings, decode_and_resize

# The project's own tolerance (tests/test_decode.py DRAFT_TOLERANCE): mean
# absolute difference, in 0..255 levels, between reduced and full decoding.
TOLERANCE_MEAN_LEVELS = 1.5
LIMITS = DecodeLimits()


def _settings(size: int, reduced: bool, jpeg_decoder: str = "pillow") -> PreprocessSettings:
    # Pillow's draft vs a full decode: the question measure_set answers.
    return PreprocessSettings(size, size, reduced_jpeg_decode=reduced,
                              jpeg_decoder=jpeg_decoder)


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


# --- other JPEG decoders, against the current path ---------------------------
#
# Issue "ONNX Runtime" item 5: is there a faster decode + resize than Pillow's
# (draft mode + antialiased bilinear) that keeps the model's answers? Each
# candidate decodes only what it alone can (a plain RGB or grayscale JPEG,
# no EXIF turn); everything else goes the current way, as an adopted path
# would. Time is the CPU time of this thread, the cases alternating image by
# image; OpenCV is held to one thread so that it is one core's work.

def _candidates() -> dict:
    import simplejpeg
    from PIL import Image

    from transforms.decode import _orientation
    try:  # only for the comparison: not a dependency of the project
        import cv2
        cv2.setNumThreads(1)
    except ImportError:
        cv2 = None

    def via(min_factor: float, resize):
        def decode(data: bytes, size: int) -> np.ndarray:
            with Image.open(io.BytesIO(data)) as im:  # the header, as the stage does
                plain = (im.format == "JPEG" and im.mode in ("RGB", "L")
                         and _orientation(im) == 1)
            if not plain:
                return _current(data, size)
            # libjpeg-turbo scales by M/8 (M = 1..16) in the DCT: the
            # smallest scale leaving min_factor x the target in both axes.
            side = int(min_factor * size)
            pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side,
                                            min_width=side)
            return resize(pixels, size)
        return decode

    def pil_bilinear(pixels, size):
        return np.asarray(Image.fromarray(pixels).resize(
            (size, size), Image.Resampling.BILINEAR))

    def cv_area(pixels, size):
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)

    def cv_linear(pixels, size):
        return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_LINEAR)

    def adopted(data: bytes, size: int) -> np.ndarray:
        return decode_and_resize(data, _settings(size, True, "simplejpeg"), LIMITS)[0]

    everything = {
        "current (Pillow draft 1/2^k, bilinear)": _current,
        "adopted: transforms.decode jpeg_decoder=simplejpeg": adopted,
        "turbo M/8 >=2x + Pillow bilinear": via(2, pil_bilinear),
        "turbo M/8 >=1.5x + Pillow bilinear": via(1.5, pil_bilinear),
        "turbo M/8 >=1.25x + Pillow bilinear": via(1.25, pil_bilinear),
        "turbo M/8 >=1x + Pillow bilinear": via(1, pil_bilinear),
    }
    if cv2 is not None:
        everything.update({
            "turbo M/8 >=2x + OpenCV area": via(2, cv_area),
            "turbo M/8 >=1x + OpenCV area": via(1, cv_area),
            "turbo M/8 >=2x + OpenCV linear": via(2, cv_linear),
        })
    chosen = [n for n in everything if any(w in n for w in _ONLY)] if _ONLY else everything
    return {n: everything[n] for n in everything if n in chosen or n.startswith("current")}


_ONLY: list[str] = []  # substrings of candidate names; empty: all


def _current(data: bytes, size: int) -> np.ndarray:
    return decode_and_resize(data, _settings(size, True), LIMITS)[0]


def compare_decoders(sets: dict[str, list[bytes]], sizes: tuple[int, ...],
                     rounds: int) -> dict:
    """{set: {size: {candidate: ms per image, x speed over current, pixel
    difference from current}}}, medians over `rounds`."""
    candidates = _candidates()
    out = {}
    for set_name, blobs in sets.items():
        cases = [(size, name) for size in sizes for name in candidates]
        totals = {case: [] for case in cases}
        for _ in range(rounds):
            spent = dict.fromkeys(cases, 0.0)
            for data in blobs:
                for size, name in cases:
                    start = time.thread_time()
                    candidates[name](data, size)
                    spent[(size, name)] += time.thread_time() - start
            for case in cases:
                totals[case].append(spent[case])
        out[set_name] = {}
        for size in sizes:
            base = statistics.median(totals[(size, next(iter(candidates)))])
            rows = {}
            for name, fn in candidates.items():
                cpu = statistics.median(totals[(size, name)])
                diffs = [float(np.abs(fn(d, size).astype(np.int16)
                                      - _current(d, size).astype(np.int16)).mean())
                         for d in blobs]
                rows[name] = {"ms_per_image": round(1000 * cpu / len(blobs), 2),
                              "speed_over_current": round(base / cpu, 2),
                              "mean_abs_levels_vs_current": round(statistics.mean(diffs), 2)}
            out[set_name][size] = rows
    return out


def accuracy_guard(photos: list[Path], labels: dict[str, int], model_dir: Path,
                   size: int = 224) -> dict:
    """Top-1 on labelled photos with real weights, and the feature cosine to
    the current path, per candidate."""
    import tensorflow as tf
    classify = tf.saved_model.load(str(model_dir / "classification"))
    features = tf.saved_model.load(str(model_dir / "feature_vector"))
    blobs = [p.read_bytes() for p in photos]
    truth = np.array([labels[p.name] for p in photos])

    def run(model, pixels):
        return np.concatenate([model(tf.cast(pixels[i:i + 50], tf.float32) / 255.0).numpy()
                               for i in range(0, len(pixels), 50)])

    from PIL import Image

    def model_input(pixels: np.ndarray) -> np.ndarray:
        # Below 224 there are no real weights: the decoded image is scaled up
        # to the 224 model, which then tells what the paths' differences cost.
        if pixels.shape[0] == 224:
            return pixels
        return np.asarray(Image.fromarray(pixels).resize((224, 224),
                                                         Image.Resampling.BILINEAR))

    results, base = {}, None
    for name, fn in _candidates().items():
        pixels = np.stack([model_input(fn(d, size)) for d in blobs])
        logits, feats = run(classify, pixels), run(features, pixels)
        if base is None:
            base = (logits, feats)
        cosine = (feats * base[1]).sum(1) / (np.linalg.norm(feats, axis=1)
                                            * np.linalg.norm(base[1], axis=1))
        results[name] = {
            "top1": round(float((logits.argmax(1) == truth).mean()), 3),
            "top1_changed_vs_current": int((logits.argmax(1) != base[0].argmax(1)).sum()),
            "feature_cosine_mean": round(float(cosine.mean()), 4),
            "feature_cosine_min": round(float(cosine.min()), 4),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """python -m benchmarks.decode_speed [--rounds N] [--large N] [--no-guard]"""
    import argparse
    import json
    import tempfile

    from benchmarks import inputs
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--shared", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--large", type=int, default=12,
                        help="camera-size photos (3000-4000 px, grain) made from the sample")
    parser.add_argument("--no-guard", action="store_true")
    parser.add_argument("--guard_size", type=int, action="append", default=None,
                        help="decode size(s) for the accuracy guard (default 224; "
                             "others are scaled up to the 224 model)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only candidates whose name contains this (repeatable)")
    args = parser.parse_args(argv)
    _ONLY[:] = args.only
    args.guard_size = args.guard_size or [224]
    photos = inputs.sample_photos(args.shared)
    sets = {"sample (ImageNet photos, ~500x375)": [p.read_bytes() for p in photos]}
    if args.large:
        with tempfile.TemporaryDirectory() as tmp:
            large = inputs.large_photos(Path(tmp), photos, args.large, grain=6.0)
            sets["large (3000-4000 px, grain 6)"] = [p.read_bytes() for p in large]
    result = {"speed": compare_decoders(sets, (224, 96), args.rounds)}
    if not args.no_guard:
        for size in args.guard_size:
            result[f"accuracy_{size}"] = accuracy_guard(
                photos, inputs.sample_labels(args.shared),
                args.shared / "models" / "mobilenet_v2_100_224", size)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
