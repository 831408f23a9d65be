"""Inputs the benchmark generates under its work folder (gitignored).

Image sets of N files are the shared sample photographs under distinct
names (distinct names give distinct image ids), as symbolic links: the
photographs themselves are never copied into the repository tree. Without
../shared, photo-like JPEGs are generated instead.
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE_SIZE = (470, 390)  # about the shared sample's size


def sample_photos(shared: Path) -> list[Path]:
    folder = shared / "data" / "imagenet-sample"
    return sorted(folder.glob("*.JPEG")) if folder.is_dir() else []


def sample_labels(shared: Path) -> dict[str, int]:
    """file name -> class index in the 1001-class output."""
    path = shared / "data" / "imagenet-sample" / "labels.csv"
    with open(path, newline="") as f:
        return {row["file"]: int(row["class_index_1001"])
                for row in csv.DictReader(f)}


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour fields plus grain: compresses like a photograph."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height),
                                                     Image.Resampling.BICUBIC))
    grain = rng.normal(0, 10, (height, width, 1))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def synthetic_photos(folder: Path, count: int = 200) -> list[Path]:
    """Stand-ins for the sample photographs where ../shared is absent."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"synthetic_{i:03d}.jpg" for i in range(count)]
    for i, path in enumerate(paths):
        if not path.exists():
            photo_like(*SAMPLE_SIZE, seed=i).save(path, "JPEG", quality=90)
    return paths


def image_set(folder: Path, n: int, sources: list[Path]) -> Path:
    """A folder of n distinct names cycling over `sources` (made once)."""
    target = folder / f"images_{n}"
    if target.is_dir() and len(os.listdir(target)) == n:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(target):
        os.remove(target / name)
    for i in range(n):
        source = sources[i % len(sources)]
        os.symlink(source.resolve(), target / f"{i:05d}_{source.name}")
    return target


def large_photo(source: Path, long_side: int, grain: float, seed: int) -> bytes:
    """A 3000-4000 px JPEG (quality 90) upscaled from a sample photo.

    Upscaling alone gives files far smoother than a camera's (about 0.1
    bytes per pixel), and smooth files are the best case for reduced-size
    decoding: entropy decoding, which cannot be reduced, is then cheap.
    Grain with `grain` sigma (6: sensor noise at base ISO) brings the files
    to the 0.25-0.35 bytes per pixel of real 12 MP photographs.
    """
    with Image.open(source) as im:
        im = im.convert("RGB")
        scale = long_side / max(im.size)
        big = im.resize((round(im.width * scale), round(im.height * scale)),
                        Image.Resampling.BICUBIC)
    if grain:
        pixels = np.asarray(big, dtype=np.int16)
        noise = np.random.default_rng(seed).normal(0, grain, pixels.shape[:2] + (1,))
        big = Image.fromarray(np.clip(pixels + noise.astype(np.int16), 0, 255)
                              .astype(np.uint8))
    out = io.BytesIO()
    big.save(out, "JPEG", quality=90)
    return out.getvalue()


def large_photos(folder: Path, sources: list[Path], count: int,
                 grain: float = 0.0) -> list[Path]:
    """`count` large JPEGs, long sides spread over 3000-4000 px (made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    picks = sources[::max(1, len(sources) // count)][:count]
    paths = []
    for i, source in enumerate(picks):
        long_side = 3000 + (1000 * i) // max(1, count - 1)
        path = folder / f"large_{i:02d}_{long_side}_grain{grain:g}_{source.stem}.jpg"
        if not path.exists():
            path.write_bytes(large_photo(source, long_side, grain, seed=i))
        paths.append(path)
    return paths
