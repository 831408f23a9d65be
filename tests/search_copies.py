"""Transformed copies of real photos: the near-duplicates search must find.

Each transform is what happens to a photo on its way around: recompression,
downscaling, cropping, mirroring, rotation, brightness, grayscale, a caption.
MILD ones must be found (asserted); HARD ones are reported only.
"""
from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageOps


def _crop_area(im: Image.Image, keep: float) -> Image.Image:
    """The central crop keeping `keep` of the area (same aspect ratio)."""
    side = math.sqrt(keep)
    w, h = im.size
    cw, ch = round(w * side), round(h * side)
    left, top = (w - cw) // 2, (h - ch) // 2
    return im.crop((left, top, left + cw, top + ch))


def _caption(im: Image.Image) -> Image.Image:
    out = im.copy()
    w, h = out.size
    band = max(12, h // 7)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, h - band, w, h), fill=(20, 20, 20))
    draw.text((8, h - band + band // 4), "SALE -30% | shop.example.com", fill=(255, 255, 255))
    return out


# name -> (function, file suffix, save options); JPEG at quality 95 where the
# transform is not the compression itself (PNG is 10x slower to write).
TRANSFORMS = {
    "jpeg_q90": (lambda im: im, ".jpg", {"quality": 90}),
    "jpeg_q50": (lambda im: im, ".jpg", {"quality": 50}),
    "jpeg_q30": (lambda im: im, ".jpg", {"quality": 30}),
    "half": (lambda im: im.resize((im.width // 2, im.height // 2), Image.LANCZOS), ".jpg", {"quality": 95}),
    "quarter": (lambda im: im.resize((im.width // 4, im.height // 4), Image.LANCZOS), ".jpg", {"quality": 95}),
    "crop_80": (lambda im: _crop_area(im, 0.8), ".jpg", {"quality": 95}),
    "crop_50": (lambda im: _crop_area(im, 0.5), ".jpg", {"quality": 95}),
    "mirror": (ImageOps.mirror, ".jpg", {"quality": 95}),
    "rotate_5": (lambda im: im.rotate(5, resample=Image.BILINEAR), ".jpg", {"quality": 95}),
    "brightness_40": (lambda im: ImageEnhance.Brightness(im).enhance(1.4), ".jpg", {"quality": 95}),
    "grayscale": (lambda im: ImageOps.grayscale(im).convert("RGB"), ".jpg", {"quality": 95}),
    "caption": (_caption, ".jpg", {"quality": 95}),
    "rotate_90": (lambda im: im.transpose(Image.ROTATE_90), ".jpg", {"quality": 95}),
    "vertical_flip": (ImageOps.flip, ".jpg", {"quality": 95}),
}
HARD = ("rotate_90", "vertical_flip")
MILD = tuple(t for t in TRANSFORMS if t not in HARD)
SEPARATOR = "__"


def write_copies(photos: list[Path], folder: Path) -> None:
    """The originals (re-encoded losslessly) and one file per transform."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in photos:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            stem = path.stem
            (folder / path.name).write_bytes(path.read_bytes())
            for name, (fn, suffix, options) in TRANSFORMS.items():
                fn(im).save(folder / f"{stem}{SEPARATOR}{name}{suffix}", **options)


def source_and_transform(image_id: str) -> tuple[str, str]:
    """('n01496331_electric_ray', 'jpeg_q30') from a copy's path; the
    transform is 'original' for the photo itself."""
    stem = Path(image_id).name.rsplit(".", 1)[0]
    if SEPARATOR in stem:
        source, transform = stem.rsplit(SEPARATOR, 1)
        return source, transform
    return stem, "original"
