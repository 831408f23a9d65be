"""Read, decode and resize: turn an `ImageRef` into the model's input pixels.

Every file the stage is given comes out exactly once: as a `DecodedImage`, or
as a `FailedImage` saying in which stage it failed and why. Untrusted files are
the norm in large collections (HTML error pages saved as .jpg, truncated
uploads, decompression bombs), so each failure is mapped to a short, stable
`error_class` instead of an exception that would fail the whole bundle.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import math
import os
import re
import stat
import struct
import threading
from dataclasses import dataclass

import apache_beam as beam
import imagecodecs
import numpy as np
import PIL
import pillow_heif
import simplejpeg
import tifffile
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.metrics import Metrics
from PIL import ExifTags, Image, UnidentifiedImageError, features

from schemas import METRICS_NAMESPACE
from schemas.records import STAGES, DecodedImage, FailedImage, ImageRef
from transforms.uris import redact, redact_text



# HEIC/HEIF (phones) through pillow-heif's Pillow plugin (libheif + libde265).
# Registered once per process, here, so every worker that decodes has it.
pillow_heif.register_heif_opener()

# Formats Pillow may try. An allow-list, because Pillow's defaults include
# EPS/PS (which run Ghostscript) and many obscure parsers. "JPEG" also opens
# MPO files (Pillow has no separate MPO opener; im.format then says "MPO").
# "AVIF" is Pillow's own plugin (libavif), "HEIF" pillow-heif's.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "HEIF", "AVIF")
_JPEG_FORMATS = ("JPEG", "MPO")
# TIFFs Pillow cannot read (float or planar samples, JPEG 2000/JPEG XL/WebP/
# LERC compression...) are read by tifffile with imagecodecs' codecs.
TIFF_FALLBACK = "tifffile"

# JPEG reduced (DCT-domain) decoding is used only while the scaled crop keeps
# at least this many source pixels per output pixel in both dimensions. With
# 1 the result drifts visibly from a full decode (on ImageNet photos, mean abs
# diff up to 2.8 levels, max 45); with 2 it stays within 0.6 mean.
DRAFT_MARGIN = 2

# JPEG decoders. "simplejpeg": libjpeg-turbo through simplejpeg, which scales
# by M/8 (M = 1..16) in the DCT where Pillow's draft has only 1/2, 1/4 and
# 1/8, so it can stop closer to the target: TURBO_MARGIN source pixels per
# output pixel. Used for plain RGB and grayscale JPEGs without an EXIF turn;
# every other image, and any JPEG libjpeg-turbo reports damage in, goes
# Pillow's way. "pillow": Pillow for every JPEG (its draft, DRAFT_MARGIN).
# Measured (benchmarks/decode_speed.py, 200 ImageNet photos, real weights at
# 224): top-1 0.845 vs 0.840, feature cosine to Pillow's path >= 0.992 on
# every photo; 1.4x the decode speed at 96, the same at 224 (one thread's
# CPU time, same run; the table is in benchmarks/README.md).
JPEG_DECODERS = ("simplejpeg", "pillow")
TURBO_MARGIN = 1.5

# EXIF orientation -> the transposition that makes the image upright, the
# same table as PIL.ImageOps.exif_transpose.
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = (5, 6, 7, 8)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")

RESIZE_MODES = ("stretch", "center_crop")


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that decides the pixels handed to the model."""
    height: int
    width: int
    # "stretch": the whole image to height x width, ignoring its aspect ratio
    # (what the TF-Hub modules expect). "center_crop": see crop_box().
    resize_mode: str = "stretch"
    crop_fraction: float = 0.875
    alpha_background: tuple[int, int, int] = (255, 255, 255)
    reduced_jpeg_decode: bool = True
    jpeg_decoder: str = "simplejpeg"  # see JPEG_DECODERS

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, "
                             f"got {self.resize_mode!r}")
        if self.jpeg_decoder not in JPEG_DECODERS:
            raise ValueError(f"jpeg_decoder must be one of {JPEG_DECODERS}, "
                             f"got {self.jpeg_decoder!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        background = tuple(self.alpha_background)  # a list when read from JSON
        if len(background) != 3 or not all(
                isinstance(c, int) and 0 <= c <= 255 for c in background):
            raise ValueError("alpha_background must be three ints in 0..255, "
                             f"got {self.alpha_background!r}")
        object.__setattr__(self, "alpha_background", background)

    @property
    def _turbo(self) -> bool:
        return self.reduced_jpeg_decode and self.jpeg_decoder == "simplejpeg"

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The region (left, top, right, bottom) of an upright width x height
        image that is resized to the model's input.

        "stretch": the whole image. "center_crop": the centred crop with the
        target aspect ratio (self.width : self.height) whose sides are
        crop_fraction times those of the largest such crop. For a square
        target that is a square of side crop_fraction * the shorter side.
        Coordinates are floats: Pillow resamples a fractional box exactly.
        """
        if self.resize_mode == "stretch":
            return (0.0, 0.0, float(width), float(height))
        scale = min(width / self.width, height / self.height) * self.crop_fraction
        crop_w, crop_h = self.width * scale, self.height * scale
        left, top = (width - crop_w) / 2, (height - crop_h) / 2
        return (left, top, left + crop_w, top + crop_h)

    @classmethod
    def from_metadata(cls, recorded: dict) -> "PreprocessSettings":
        """The settings behind a `to_metadata` record (a dataset's, to
        preprocess query images the same way); KeyError/ValueError when
        it is malformed."""
        crop = recorded.get("crop_fraction")
        decoder = str(recorded.get("jpeg_decoder", "pillow"))
        return cls(
            height=int(recorded["height"]), width=int(recorded["width"]),
            resize_mode=recorded.get("resize_mode", "stretch"),
            crop_fraction=float(crop) if crop is not None else 0.875,
            alpha_background=tuple(recorded.get("alpha_background",
                                                (255, 255, 255))),
            reduced_jpeg_decode=bool(recorded.get("reduced_jpeg_decode", True)),
            jpeg_decoder="simplejpeg" if decoder.startswith("simplejpeg")
            else "pillow")

    def to_metadata(self) -> dict:
        """A JSON-able record of every choice that changes the pixels."""
        return {
            "height": self.height,
            "width": self.width,
            "color": "RGB",
            "dtype": "uint8",
            "scale": "[0,1]",  # the model divides these 0..255 values by 255
            "resize_mode": self.resize_mode,
            "crop_fraction": self.crop_fraction if self.resize_mode == "center_crop" else None,
            "resize": "bilinear (antialiased, PIL)",
            "exif_orientation": "applied",
            "alpha": "composited onto alpha_background",
            "alpha_background": list(self.alpha_background),
            "sixteen_bit": "rounded to 8 bits (value / 257)",
            "other_integer_depths": "scaled to 8 bits (value * 255 / (2**bits - 1))",
            "float": "values in [0, 1] scaled to 0..255; others refused",
            "cmyk": "converted without ICC profile (PIL)",
            "icc_profile": "ignored",
            "frames": "first (GIF/WebP/MPO/AVIF frame, TIFF page, HEIF primary image)",
            "reduced_jpeg_decode": self.reduced_jpeg_decode,
            "jpeg_draft_margin": DRAFT_MARGIN if self.reduced_jpeg_decode else None,
            "jpeg_decoder": (f"simplejpeg (libjpeg-turbo M/8 scaling, margin {TURBO_MARGIN}) "
                             "for plain RGB/grayscale JPEGs, else Pillow"
                             if self._turbo else "pillow"),
            "formats": list(ALLOWED_FORMATS),
            "heif_decoder": "pillow-heif (libheif)",
            "avif_decoder": "Pillow (libavif)",
            "tiff_fallback": TIFF_FALLBACK,
            "pillow": PIL.__version__,
            # Like "pillow": recorded, not part of the dataset's identity.
            "library_versions": library_versions(),
        }


def library_versions() -> dict:
    """The versions of what turns each format into pixels, for the record."""
    return {
        "pillow_heif": pillow_heif.__version__,
        "libheif": pillow_heif.libheif_info().get("libheif"),
        "libavif": features.version("avif"),
        "libjpeg_turbo": features.version("libjpeg_turbo"),
        "libtiff": features.version("libtiff"),
        "tifffile": tifffile.__version__,
        "imagecodecs": imagecodecs.__version__,
        "simplejpeg": simplejpeg.__version__,
    }


@dataclass(frozen=True)
class DecodeLimits:
    """Bounds on what one file may cost, so a hostile file fails alone."""
    max_bytes: int = 64 * 1024 * 1024
    # Refused from the header, before the pixel data is decoded.
    max_pixels: int = 128_000_000

    def __post_init__(self):
        if self.max_bytes < 1 or self.max_pixels < 1:
            raise ValueError(f"limits must be positive: {self!r}")


class ImageError(Exception):
    """A per-image failure: becomes a FailedImage, never a failed bundle."""

    def __init__(self, stage: str, error_class: str, message: str):
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}")
        # All three in args, so the exception survives pickling.
        super().__init__(stage, error_class, message)
        self.stage = stage
        self.error_class = error_class
        self.message = message

    def __str__(self) -> str:
        return f"{self.stage}/{self.error_class}: {self.message}"


def _clean_message(text: str, limit: int = 500) -> str:
    """One line, bounded, with every URL in it redacted."""
    text = redact_text(" ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --- read -------------------------------------------------------------------

def read_bytes(uri: str, max_bytes: int) -> bytes:
    """The file's bytes, through Beam's FileSystems (local paths, gs://, ...).

    Never reads more than max_bytes + 1 bytes; local files are sized with a
    stat first so an oversized one is not read at all.
    """
    shown = redact(uri)
    if "://" not in uri:
        # A local path: opened directly, not through Beam's filesystem layer
        # (measured 0.09 -> 0.02 ms a file, 4% of a 224 decode); the same
        # checks and the same errors.
        local, opener = True, lambda: open(uri, "rb")
    else:
        try:
            filesystem = FileSystems.get_filesystem(uri)
        except Exception as e:  # Beam raises ValueError for an unknown scheme
            raise ImageError("read", "ReadError",
                             f"no filesystem for {shown}: {_clean_message(e)}") from None
        local = isinstance(filesystem, LocalFileSystem)
        # UNCOMPRESSED: the default (AUTO) would gunzip a file named *.gz.
        opener = lambda: filesystem.open(  # noqa: E731
            uri, compression_type=CompressionTypes.UNCOMPRESSED)
    try:
        if local:
            _check_local_file(uri, max_bytes, shown)
        with opener() as f:
            data = _read_at_most(f, max_bytes + 1)
    except ImageError:
        raise
    except Exception as e:
        raise _read_error(e, shown) from None
    if len(data) > max_bytes:
        raise ImageError("read", "FileTooLarge",
                         f"{shown} is larger than the limit of {max_bytes} bytes")
    return data


def _check_local_file(path: str, max_bytes: int, shown: str) -> None:
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise ImageError("read", "IsADirectory", f"{shown} is a directory")
    if not stat.S_ISREG(st.st_mode):  # a FIFO could block forever, a device never end
        raise ImageError("read", "ReadError", f"{shown} is not a regular file")
    if st.st_size > max_bytes:
        raise ImageError("read", "FileTooLarge",
                         f"{shown} has {st.st_size} bytes, over the limit of {max_bytes}")


def _read_at_most(f, n: int) -> bytes:
    chunks = []
    while n > 0:
        chunk = f.read(n)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _read_error(e: Exception, shown: str) -> ImageError:
    # OSError messages repeat the raw path, so only the redacted one is used.
    code = getattr(e, "code", None)  # HTTP status on google.api_core errors
    if isinstance(e, (FileNotFoundError, NotADirectoryError)) or code == 404:
        return ImageError("read", "FileNotFound", f"{shown}: no such file")
    if isinstance(e, PermissionError) or code in (401, 403):
        return ImageError("read", "PermissionDenied", f"{shown}: permission denied")
    if isinstance(e, IsADirectoryError):
        return ImageError("read", "IsADirectory", f"{shown} is a directory")
    detail = e.strerror if isinstance(e, OSError) and e.strerror else e
    return ImageError("read", "ReadError",
                      f"{shown}: {type(e).__name__}: {_clean_message(detail)}")


# --- decode -----------------------------------------------------------------

_pillow_limit_lock = threading.Lock()


def _allow_pillow_up_to(max_pixels: int) -> None:
    """Make our limit the one that decides.

    Image.open() refuses images over 2 * Image.MAX_IMAGE_PIXELS (about 179M
    by default) before we see them. Raise Pillow's process-wide limit to ours
    when it is lower; never lower or disable it, so it stays a second guard.
    """
    with _pillow_limit_lock:
        current = Image.MAX_IMAGE_PIXELS
        if current is not None and current < max_pixels:
            Image.MAX_IMAGE_PIXELS = max_pixels


def decode_and_resize(data: bytes, settings: PreprocessSettings,
                      limits: DecodeLimits) -> tuple[np.ndarray, int, int]:
    """Decode an image file's bytes into the model's input.

    Returns (pixels, original_width, original_height): pixels is uint8,
    C-contiguous [settings.height, settings.width, 3] RGB; the original size
    is the upright image's (after EXIF orientation), before resizing.
    Raises ImageError for every failure.
    """
    _allow_pillow_up_to(limits.max_pixels)
    if not data:
        raise ImageError("decode", "EmptyFile", "the file is empty (0 bytes)")
    kind = _signature(data)
    if kind == "JPEG" and settings._turbo:
        # The common case without Pillow's parse of the header: what
        # _decode_opened would do for a plain JPEG, the same pixels.
        plain = _plain_jpeg(data)
        if plain is not None:
            mode, width, height = plain
            _check_declared_size((width, height), limits)
            pixels = _decode_turbo(data, mode, width, height, settings)
            if pixels is not None:
                return pixels, width, height
    if kind in ("HEIF", "AVIF"):
        _check_declared_size(_iso_declared_pixels(data), limits)
    if kind == "TIFF" and _tiff_first_page_cut(data):
        # Checked first: Pillow reads a TIFF cut inside its tags with defaults.
        raise ImageError("decode", "TruncatedImage",
                         "the file ends before the TIFF's first page (tags or pixel data)")
    try:
        try:
            with _open(data) as im:
                return _decode_opened(im, data, settings, limits)
        except ImageError:
            raise
        except Exception as e:  # whatever Pillow or a codec raised while decoding
            raise _decode_error(e, data, limits) from None
    except ImageError as pillow_error:
        if (_signature(data) != "TIFF" or pillow_error.stage != "decode"
                or pillow_error.error_class not in _TIFF_RETRY):
            raise
        return _decode_tiff(data, settings, limits, pillow_error)


def decode_sample(uris, settings: PreprocessSettings, limits: DecodeLimits
                  ) -> tuple[np.ndarray, list[str]]:
    """(pixels uint8 [n, H, W, 3], the uris they came from) of the images of
    `uris` that read and decode; the others are left out. For samples the
    launcher draws (int8 calibration) and rebuilds from their record."""
    pixels, kept = [], []
    for uri in uris:
        try:
            pixels.append(decode_and_resize(read_bytes(uri, limits.max_bytes),
                                            settings, limits)[0])
            kept.append(uri)
        except ImageError:
            continue
    if not pixels:
        return np.zeros((0, settings.height, settings.width, 3), np.uint8), kept
    return np.stack(pixels), kept


def _check_declared_size(size: tuple[int, int] | None, limits: DecodeLimits) -> None:
    if size is None:
        return
    width, height = size
    if width * height > limits.max_pixels:
        raise _bomb(f"{width}x{height} = {width * height}", limits)


def _bomb(declared: str, limits: DecodeLimits) -> ImageError:
    """The one message of a refused bomb, whoever caught it: it cites our
    --max_pixels, never Pillow's own (raised to ours, doubled) limit."""
    return ImageError("decode", "DecompressionBomb",
                      f"declares {declared} pixels, over the limit of "
                      f"{limits.max_pixels} (--max_pixels)")


def _decode_turbo(data: bytes, mode: str, width: int, height: int,
                  settings: PreprocessSettings) -> np.ndarray | None:
    """A plain JPEG decoded by libjpeg-turbo at the smallest M/8 scale that
    leaves TURBO_MARGIN source pixels per output pixel over the crop, then
    resized as Pillow's path does; None where libjpeg-turbo reports damage
    (even a recoverable warning), so that Pillow decides about that file.

    No intermediate copies: colour is decoded as RGBX, the layout Pillow
    keeps RGB in, so the decoded buffer becomes a Pillow image without a
    copy (`frombuffer`), and the one resize writes the model's input.
    """
    left, top, right, bottom = settings.crop_box(width, height)
    # simplejpeg's minimum is for the whole image; ours is for the crop.
    min_w = math.ceil(TURBO_MARGIN * settings.width * width / (right - left))
    min_h = math.ceil(TURBO_MARGIN * settings.height * height / (bottom - top))
    gray = mode == "L"
    try:
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if gray else "RGBX",
                                        min_width=min_w, min_height=min_h, strict=True)
    except ValueError:
        return None
    decoded_h, decoded_w = pixels.shape[:2]
    sx, sy = decoded_w / width, decoded_h / height
    im = Image.frombuffer("L" if gray else "RGBX", (decoded_w, decoded_h), pixels,
                          "raw", "L" if gray else "RGBX", 0, 1)
    im = im.resize((settings.width, settings.height), Image.Resampling.BILINEAR,
                   box=(left * sx, top * sy, right * sx, bottom * sy))
    if gray:
        return np.repeat(np.asarray(im)[:, :, None], 3, axis=2)
    return np.ascontiguousarray(np.asarray(im)[:, :, :3])


def _plain_jpeg(data: bytes) -> tuple[str, int, int] | None:
    """(mode, width, height) of a JPEG that Pillow would open as format JPEG
    in mode RGB or L with no EXIF block (so no turn), read from its markers
    without Pillow; None for anything else (EXIF, MPO, CMYK, a header that
    does not parse), which then goes the general way."""
    pos, end, found = 2, len(data), None
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9:  # start of scan / end of image
            break
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end:
            return None
        segment = data[pos + 4:pos + 2 + length]
        if marker == 0xE1 and segment.startswith(b"Exif"):
            return None  # an orientation may turn it: Pillow reads it
        if marker == 0xE2 and segment.startswith(b"MPF\x00"):
            return None  # Pillow opens it as MPO
        if marker in _SOF_MARKERS:
            if len(segment) < 6:
                return None
            height = int.from_bytes(segment[1:3], "big")
            width = int.from_bytes(segment[3:5], "big")
            found = ({1: "L", 3: "RGB"}.get(segment[5]), width, height)
        pos += 2 + length
    if found is None or found[0] is None or found[1] < 1 or found[2] < 1:
        return None
    return found


# Start-of-frame markers (baseline, extended, progressive, lossless,
# arithmetic), as Pillow's JPEG plugin lists them.
_SOF_MARKERS = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA,
                          0xCB, 0xCD, 0xCE, 0xCF))


def _decode_opened(im: Image.Image, data: bytes, settings: PreprocessSettings,
                   limits: DecodeLimits) -> tuple[np.ndarray, int, int]:
    stored_w, stored_h = im.size
    if stored_w < 1 or stored_h < 1:
        raise ImageError("decode", "CorruptImage", f"declares an empty size {im.size}")
    _check_declared_size(im.size, limits)
    if settings._turbo and im.format == "JPEG" and im.mode in ("RGB", "L") \
            and _orientation(im) == 1:
        pixels = _decode_turbo(data, im.mode, stored_w, stored_h, settings)
        if pixels is not None:
            return pixels, stored_w, stored_h
    scale = 1.0
    if settings.reduced_jpeg_decode and im.format in _JPEG_FORMATS:
        # A JPEG's EXIF is parsed by open(): reading it decodes no pixels.
        scale = _apply_draft(im, settings, _orientation(im) in _SWAPS_AXES)
    im.load()
    # Read after load(): for PNG, getexif() would otherwise load() itself and
    # a failure there would leave a half-decoded image behind.
    orientation = _orientation(im)
    width, height = ((stored_h, stored_w) if orientation in _SWAPS_AXES
                     else (stored_w, stored_h))
    try:
        pixels = _to_model_input(im, orientation, scale, width, height, settings,
                                 _sample_bits(im))
    except Exception as e:  # pylint: disable=broad-except
        raise _preprocess_error(e, width, height) from None
    return pixels, width, height


def _preprocess_error(e: Exception, width: int, height: int) -> ImageError:
    """What went wrong turning decoded pixels into the model's input."""
    if isinstance(e, ImageError):
        return e
    if isinstance(e, MemoryError):
        return ImageError("preprocess", "OutOfMemory",
                          f"out of memory converting a {width}x{height} image")
    return ImageError("preprocess", "PreprocessFailed",
                      f"{type(e).__name__}: {_clean_message(e)}")


def _open(data: bytes) -> Image.Image:
    """Parse the header only; Pillow decodes pixels lazily in load()."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(ExifTags.Base.Orientation, 1)
        return value if value in _UPRIGHT else 1
    except Exception:  # a malformed EXIF block must not cost us the pixels
        return 1


def _apply_draft(im: Image.Image, settings: PreprocessSettings, swap: bool) -> float:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode when that still leaves
    DRAFT_MARGIN source pixels per output pixel over the crop; returns the
    scale applied (1.0 for none).

    The DCT scale is the same on both axes, so deciding it in upright
    coordinates and requesting it in stored ones is consistent under EXIF
    rotation. Keeps the mode, so CMYK and grayscale are scaled as they are.
    """
    stored_w, stored_h = im.size
    upright_w, upright_h = (stored_h, stored_w) if swap else (stored_w, stored_h)
    left, top, right, bottom = settings.crop_box(upright_w, upright_h)
    for s in (8, 4, 2):
        if ((right - left) / s >= DRAFT_MARGIN * settings.width
                and (bottom - top) / s >= DRAFT_MARGIN * settings.height):
            drafted = im.draft(im.mode, (stored_w // s, stored_h // s))
            # Pillow reports the full image's extent in scaled pixels.
            return stored_w / drafted[1][2] if drafted else 1.0
    return 1.0


def _sample_bits(im: Image.Image) -> int:
    """Significant bits of a 16-bit-mode image: a 12-bit TIFF (cameras,
    microscopes) is held as I;16 with values up to 4095, not 65535."""
    if im.mode in _SIXTEEN_BIT_MODES and im.format == "TIFF":
        bits = im.tag_v2.get(258)  # BitsPerSample
        bits = bits[0] if isinstance(bits, tuple) and bits else bits
        if isinstance(bits, int) and 1 <= bits < 16:
            return bits
    return 16


def _to_model_input(im: Image.Image, orientation: int, scale: float, width: int,
                    height: int, settings: PreprocessSettings,
                    bits: int = 16) -> np.ndarray:
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    im = _to_l_or_rgb(im, settings.alpha_background, bits)
    box = tuple(v / scale for v in settings.crop_box(width, height))
    im = im.resize((settings.width, settings.height), Image.Resampling.BILINEAR, box=box)
    if im.mode != "RGB":
        im = im.convert("RGB")
    pixels = np.array(im, dtype=np.uint8)  # a writable, C-contiguous copy
    if pixels.shape != (settings.height, settings.width, 3):
        raise ImageError("preprocess", "PreprocessFailed",
                         f"produced pixels of shape {pixels.shape}")
    return pixels


def _to_l_or_rgb(im: Image.Image, background: tuple[int, int, int],
                 bits: int = 16) -> Image.Image:
    """8-bit grayscale or RGB, alpha composited onto `background`.

    Grayscale stays one channel through the resize (a third of the work).
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion to L clips at 255 instead of scaling.
        values = np.asarray(im)
        if values.dtype.kind == "i":  # mode I holds 16-bit data in int32
            values = np.clip(values, 0, 65535)
        # round(v / 257): 0 -> 0, 32768 -> 128, 65535 -> 255
        top = 2 ** bits - 1
        # round(v * 255 / top); for 16 bits round(v / 257): 0 -> 0, 32768 -> 128
        return Image.fromarray(
            ((np.minimum(values.astype(np.uint64), top) * 510 + top) // (2 * top))
            .astype(np.uint8))
    if im.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(im)))
    if im.has_transparency_data:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, background)
        out.paste(rgba, mask=rgba)
        return out
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    return im.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV, ...


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    """Float samples -> 0..255. Only [0, 1] has an agreed meaning (scikit-
    image, tifffile, OpenCV); anything else would be a guess, so it fails."""
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageError("preprocess", "UnsupportedMode",
                         "float pixels include NaN or infinity")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 1:
        raise ImageError("preprocess", "UnsupportedMode",
                         f"float pixels range over [{low:.4g}, {high:.4g}]; "
                         "only [0, 1] has a defined 0..255 scale")
    return np.rint(values.astype(np.float32) * 255).astype(np.uint8)


# --- TIFFs Pillow cannot read -------------------------------------------------

# Pillow failures worth a second reader; a bomb or a memory error is final.
_TIFF_RETRY = ("CorruptImage", "TruncatedImage", "UnrecognizedFormat")
_ALPHA_EXTRASAMPLES = (1, 2)  # EXTRASAMPLE.ASSOCALPHA, UNASSALPHA
_PHOTOMETRIC_CHANNELS = {0: 1, 1: 1, 2: 3, 3: 1, 5: 4, 6: 3}  # per tifffile.PHOTOMETRIC


def _decode_tiff(data: bytes, settings: PreprocessSettings, limits: DecodeLimits,
                 pillow_error: ImageError) -> tuple[np.ndarray, int, int]:
    """The first page of a TIFF Pillow rejected, read with tifffile.

    The same limits as Pillow's path: the declared size is checked from the
    first IFD before any strip or tile is decompressed, and a file whose
    strips end past its last byte is refused as truncated (tifffile would
    read the missing data as zeros). Where tifffile cannot parse the file
    either, Pillow's error stands.
    """
    try:
        tif = tifffile.TiffFile(io.BytesIO(data))
    except Exception:
        raise pillow_error from None
    with tif:
        try:
            page = tif.pages.first
        except Exception:
            raise pillow_error from None
        width, height, depth = page.imagewidth, page.imagelength, page.imagedepth
        if width < 1 or height < 1:
            raise ImageError("decode", "CorruptImage", f"declares an empty size {width}x{height}")
        _check_declared_size((width, height * depth), limits)
        ends = [o + n for o, n in zip(page.dataoffsets, page.databytecounts) if n]
        if not ends:
            raise ImageError("decode", "CorruptImage", "the first TIFF page has no pixel data")
        if max(ends) > len(data):
            raise ImageError("decode", "TruncatedImage",
                             f"the TIFF's pixel data ends at byte {max(ends)}, "
                             f"the file at {len(data)}")
        layout = _tiff_layout(page)
        try:
            samples = page.asarray(maxworkers=1)
        except MemoryError:
            raise ImageError("decode", "OutOfMemory", "out of memory while decoding") from None
        except Exception as e:
            raise ImageError("decode", "CorruptImage",
                             f"{type(e).__name__}: {_clean_message(e)}") from None
        orientation = page.tags.valueof(274, 1)
    orientation = orientation if orientation in _UPRIGHT else 1
    try:
        im = _tiff_to_image(samples, page.axes, layout, settings.alpha_background)
        upright = (height, width) if orientation in _SWAPS_AXES else (width, height)
        pixels = _to_model_input(im, orientation, 1.0, *upright, settings)
    except Exception as e:  # pylint: disable=broad-except
        raise _preprocess_error(e, width, height) from None
    return (pixels, *upright)


@dataclass(frozen=True)
class _TiffLayout:
    photometric: int
    bits: int
    sample_format: int  # 1 uint, 2 int, 3 float
    has_alpha: bool
    premultiplied: bool
    colormap: np.ndarray | None


def _tiff_layout(page) -> _TiffLayout:
    """What the first page's samples mean, or ImageError for what we do not
    convert (signed or complex samples, CIELab, YCbCr not from JPEG...)."""
    photometric = int(page.photometric)
    if photometric == 6 and int(page.compression) not in (6, 7):
        photometric = -1  # raw YCbCr; tifffile turns only JPEG's into RGB
    if photometric not in _PHOTOMETRIC_CHANNELS:
        name = getattr(page.photometric, "name", photometric)
        raise ImageError("decode", "UnsupportedImage",
                         f"TIFF colour space {name} is not supported")
    if photometric == 5 and page.samplesperpixel - len(page.extrasamples) != 4:
        raise ImageError("decode", "UnsupportedImage",
                         "TIFF separated (ink) colour other than CMYK is not supported")
    sample_format = int(page.sampleformat)
    if sample_format not in (1, 3):
        raise ImageError("preprocess", "UnsupportedMode",
                         f"TIFF sample format {getattr(page.sampleformat, 'name', sample_format)} "
                         "has no defined 0..255 scale")
    extras = tuple(int(e) for e in page.extrasamples)
    has_alpha = bool(extras) and extras[0] in _ALPHA_EXTRASAMPLES
    colormap = page.colormap if photometric == 3 else None
    if photometric == 3 and colormap is None:
        raise ImageError("decode", "CorruptImage", "palette TIFF without a colour map")
    return _TiffLayout(photometric, int(page.bitspersample), sample_format, has_alpha,
                       has_alpha and extras[0] == 1, colormap)


def _tiff_to_image(samples: np.ndarray, axes: str, layout: _TiffLayout,
                   background: tuple[int, int, int]) -> Image.Image:
    """tifffile's array for one page -> an 8-bit L or RGB image, alpha
    composited onto `background`."""
    for axis in reversed(range(samples.ndim)):  # e.g. a depth axis of size 1
        if axes[axis] not in "YXS":
            if samples.shape[axis] != 1:
                raise ImageError("decode", "UnsupportedImage",
                                 f"TIFF page of shape {samples.shape} ({axes}) is not one image")
            samples = samples.take(0, axis=axis)
            axes = axes[:axis] + axes[axis + 1:]
    if "S" not in axes:
        samples, axes = samples[..., None], axes + "S"
    samples = np.moveaxis(samples, [axes.index("Y"), axes.index("X"), axes.index("S")],
                          [0, 1, 2])
    channels = _PHOTOMETRIC_CHANNELS[layout.photometric]
    colour, alpha = samples[..., :channels], None
    if layout.has_alpha and samples.shape[2] > channels:
        alpha = _unit(samples[..., channels], layout)
    if layout.photometric == 3:  # palette: 16-bit colour map entries
        lut = np.rint(layout.colormap.T.astype(np.float32) / 257).astype(np.uint8)
        rgb = lut[np.clip(colour[..., 0].astype(np.int64), 0, len(lut) - 1)]
    else:
        rgb = _to_8bit(colour, layout)
        if layout.photometric == 0:  # min-is-white
            rgb = 255 - rgb
        elif layout.photometric == 5:
            rgb = np.asarray(Image.frombytes("CMYK", rgb.shape[1::-1],
                                             np.ascontiguousarray(rgb).tobytes())
                             .convert("RGB"))
    if alpha is not None:  # as Pillow's path: onto the background, in RGB
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        a = alpha[..., None]
        base, bg = rgb.astype(np.float32), np.asarray(background, np.float32)
        # Associated alpha: the colour is already multiplied by it.
        out = base + (1 - a) * bg if layout.premultiplied else base * a + (1 - a) * bg
        rgb = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if rgb.shape[2] == 1:
        return Image.fromarray(np.ascontiguousarray(rgb[..., 0]))
    return Image.fromarray(np.ascontiguousarray(rgb))


def _unit(values: np.ndarray, layout: _TiffLayout) -> np.ndarray:
    """Samples as float32 in [0, 1]."""
    if layout.sample_format == 3:
        return _float_to_uint8(values).astype(np.float32) / 255
    return values.astype(np.float32) / float(2 ** layout.bits - 1)


def _to_8bit(values: np.ndarray, layout: _TiffLayout) -> np.ndarray:
    if layout.sample_format == 3:
        return _float_to_uint8(values)
    if values.dtype == np.uint8 and layout.bits == 8:
        return values
    top = 2 ** layout.bits - 1  # 1-bit: 1, 12-bit: 4095, 16-bit: 65535
    scaled = (values.astype(np.uint64) * 510 + top) // (2 * top)  # round(v * 255 / top)
    return scaled.astype(np.uint8)


def _decode_error(e: Exception, data: bytes, limits: DecodeLimits) -> ImageError:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow refuses at open() above twice its limit, which
        # _allow_pillow_up_to raised to ours: its message would cite that.
        found = re.search(r"\((\d+) pixels\)", str(e))
        return _bomb(found.group(1) if found else "more", limits)
    if isinstance(e, MemoryError):
        return ImageError("decode", "OutOfMemory", "out of memory while decoding")
    detail = f"{type(e).__name__}: {_clean_message(e)}"
    if "truncated" in str(e).lower() or isinstance(e, EOFError) or _looks_truncated(data):
        return ImageError("decode", "TruncatedImage", detail)
    return ImageError("decode", "CorruptImage", detail)


# Signatures of the allowed formats: data that starts like one of them but
# does not parse is a broken image, not an unrecognised file.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
)
# ISO media (ftyp) brands of still images; others (isom, mp42...) are videos.
_AVIF_BRANDS = (b"avif", b"avis")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[4:8] == b"ftyp":
        if data[8:12] in _AVIF_BRANDS:
            return "AVIF"
        return "HEIF" if data[8:12] in _HEIF_BRANDS else None
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def _iso_boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, box end) of the ISO media boxes (HEIF, AVIF)
    in data[start:end]; stops at the first malformed one. A box's end may lie
    past the data when the file was cut."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind, header = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8], 8
        if size == 1:  # a 64-bit size follows the type
            if pos + 16 > end:
                return
            size, header = int.from_bytes(data[pos + 8:pos + 16], "big"), 16
        elif size == 0:  # the last box, up to the end
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, pos + size
        pos += size


def _iso_boxes_overrun(data: bytes) -> bool:
    """Whether the top-level boxes claim more bytes than there are (the file
    was cut), or the file ends inside a box header."""
    last = 0
    for _, _, box_end in _iso_boxes(data):
        last = box_end
    return last > len(data) or 0 < len(data) - last < 8


def _iso_declared_pixels(data: bytes) -> tuple[int, int] | None:
    """The largest width x height declared by an image spatial extent
    ('ispe', in meta/iprp/ipco) of a HEIF or AVIF file, read before the
    decoder sees the file: libheif and libavif refuse sizes only above their
    own, higher limits, and would otherwise report a bomb as a broken file."""
    largest = None
    path = (b"meta", b"iprp", b"ipco")
    boxes = [(0, len(data))]
    for depth, wanted in enumerate(path):
        found = []
        for start, end in boxes:
            for kind, payload, box_end in _iso_boxes(data, start, min(end, len(data))):
                if kind == wanted:
                    # meta is a full box: version and flags come first
                    found.append((payload + (4 if wanted == b"meta" else 0), box_end))
        boxes = found
    for start, end in boxes:
        for kind, payload, _ in _iso_boxes(data, start, min(end, len(data))):
            if kind == b"ispe" and payload + 12 <= len(data):
                width = int.from_bytes(data[payload + 4:payload + 8], "big")
                height = int.from_bytes(data[payload + 8:payload + 12], "big")
                if largest is None or width * height > largest[0] * largest[1]:
                    largest = (width, height)
    return largest


def _looks_truncated(data: bytes) -> bool:
    """Whether the file ends before its format says it should."""
    kind = _signature(data)
    tail = data.rstrip(b"\x00")
    if kind == "JPEG":
        return not tail.endswith(b"\xff\xd9")
    if kind == "PNG":
        return b"IEND" not in data[-12:]
    if kind == "GIF":
        return not tail.endswith(b";")
    if kind == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if kind == "BMP" and len(data) >= 6:
        return int.from_bytes(data[2:6], "little") > len(data)
    if kind in ("HEIF", "AVIF"):
        return _iso_boxes_overrun(data)
    if kind == "TIFF":
        return _tiff_first_page_cut(data)
    return False


# TIFF field types -> bytes per value (BYTE, ASCII, SHORT, LONG, RATIONAL, ...)
_TIFF_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8,
                    11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_TIFF_DATA_TAGS = ((273, 279), (324, 325))  # strip and tile offsets, byte counts


def _tiff_first_page_cut(data: bytes) -> bool:
    """Whether the first IFD, a value it points to, or its pixel data lies
    past the end of the file. Pillow and tifffile write the IFD after the
    pixels, so a cut file loses its tags first, and Pillow then decodes what
    is left with default values (with only a warning)."""
    big = data[2:4] in (b"+\x00", b"\x00+")
    order = "<" if data[:2] == b"II" else ">"
    count_fmt, entry_size, inline, offset_fmt = (
        ("Q", 20, 8, "Q") if big else ("H", 12, 4, "I"))
    try:
        ifd = struct.unpack_from(order + offset_fmt, data, 8 if big else 4)[0]
        count = struct.unpack_from(order + count_fmt, data, ifd)[0]
        entries = ifd + struct.calcsize(count_fmt)
        if entries + count * entry_size > len(data):
            return True
        values = {}
        for i in range(count):
            at = entries + i * entry_size
            tag, kind = struct.unpack_from(order + "HH", data, at)
            n = struct.unpack_from(order + offset_fmt, data, at + 4)[0]
            size = _TIFF_TYPE_SIZES.get(kind, 1) * n
            where = at + 4 + inline
            if size > inline:
                where = struct.unpack_from(order + offset_fmt, data, where)[0]
                if where + size > len(data):
                    return True
            if kind in (3, 4, 16) and any(tag in pair for pair in _TIFF_DATA_TAGS):
                fmt = {3: "H", 4: "I", 16: "Q"}[kind]
                values[tag] = struct.unpack_from(f"{order}{n}{fmt}", data, where)
        for offsets, counts in _TIFF_DATA_TAGS:
            pairs = zip(values.get(offsets, ()), values.get(counts, ()))
            if any(o + c > len(data) for o, c in pairs):
                return True
    except struct.error:  # a header too short to hold what it declares
        return True
    return False


def _unidentified(data: bytes) -> ImageError:
    kind = _signature(data)
    if kind is not None:
        if _looks_truncated(data):
            return ImageError("decode", "TruncatedImage",
                              f"starts like {kind} but ends early; its header cannot be read")
        return ImageError("decode", "CorruptImage",
                          f"starts like {kind} but its header is invalid")
    return ImageError("decode", "UnrecognizedFormat",
                      f"not an image in an accepted format ({_describe(data)}); "
                      f"accepted: {', '.join(ALLOWED_FORMATS)}")


def _describe(data: bytes) -> str:
    """What an unrecognised file seems to be; never quotes its content."""
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<!doctype html", b"<html")) or any(
            tag in head for tag in (b"<html", b"<head", b"<body")):
        return "looks like an HTML page, e.g. an error or login page saved under an image name"
    if b"<svg" in head:
        return "looks like an SVG drawing, which is not rasterised"
    if head.startswith(b"%pdf"):
        return "looks like a PDF document"
    if head.startswith(b"%!ps") or data[:4] == b"\xc5\xd0\xd3\xc6":
        return "looks like PostScript/EPS, refused because it would run Ghostscript"
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        return f"an ISO media container of brand {brand!r}, e.g. a video, not a still image"
    try:  # incremental: a character cut at byte 1024 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:1024])
    except UnicodeDecodeError:
        text = None
    if text is not None and sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text):
        return "looks like text"
    return "unknown binary data"


# --- the Beam stage ---------------------------------------------------------

def _as_ref(element) -> tuple[ImageRef, bytes | None]:
    """An ImageRef, a URI, or (image_id, bytes) -> (ref, bytes if given)."""
    if isinstance(element, ImageRef):
        return element, None
    if isinstance(element, str):
        return ImageRef(redact(element), element), None
    image_id, data = element
    return ImageRef(str(image_id), f"bytes:{image_id}"), bytes(data)


class ReadDecodeResize(beam.DoFn):
    """ImageRef (or a URI, or (image_id, bytes)) -> DecodedImage, or
    FailedImage on the FAILED output.

    Never raises for a bad image: one hostile file must not fail (and, on
    retry, re-fail) a bundle of good ones. One DoFn for every kind of input,
    so decoding fuses with inference: no decoded pixels are ever buffered
    between stages.
    """
    FAILED = "failed"

    def __init__(self, settings: PreprocessSettings, limits: DecodeLimits):
        self._settings = settings
        self._limits = limits
        self._decoded = Metrics.counter(METRICS_NAMESPACE, "images_decoded")
        self._bytes_read = Metrics.counter(METRICS_NAMESPACE, "bytes_read")

    def process(self, element):
        result = self._decode(element)
        if isinstance(result, FailedImage):
            Metrics.counter(METRICS_NAMESPACE, f"failed_{result.stage}").inc()
            yield beam.pvalue.TaggedOutput(self.FAILED, result)
        else:
            self._decoded.inc()
            yield result

    def _decode(self, element) -> DecodedImage | FailedImage:
        ref, data = _as_ref(element)
        digest = None
        try:
            if data is None:
                data = read_bytes(ref.uri, self._limits.max_bytes)
            elif len(data) > self._limits.max_bytes:
                raise ImageError("read", "FileTooLarge",
                                 f"{len(data)} bytes, over the limit of "
                                 f"{self._limits.max_bytes}")
            self._bytes_read.inc(len(data))
            digest = hashlib.sha256(data).hexdigest()
            pixels, width, height = decode_and_resize(data, self._settings, self._limits)
            return DecodedImage(ref.image_id, ref.uri, pixels, width, height,
                                digest, len(data))
        except ImageError as e:
            return FailedImage(ref.image_id, ref.uri, e.stage, e.error_class,
                               _clean_message(e.message), digest)
        except Exception as e:  # a bug or an unforeseen library error
            return FailedImage(ref.image_id, ref.uri, "decode", type(e).__name__,
                               _clean_message(f"unexpected error: {e}"), digest)
