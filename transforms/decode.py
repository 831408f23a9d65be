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
import os
import stat
import threading
from dataclasses import dataclass

import apache_beam as beam
import numpy as np
import PIL
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.localfilesystem import LocalFileSystem
from apache_beam.metrics import Metrics
from PIL import ExifTags, Image, UnidentifiedImageError

from schemas.records import STAGES, DecodedImage, FailedImage, ImageRef
from transforms.uris import redact, redact_text

METRICS_NAMESPACE = "mobilenet_embed"

# Formats Pillow may try. An allow-list, because Pillow's defaults include
# EPS/PS (which run Ghostscript) and many obscure parsers. "JPEG" also opens
# MPO files (Pillow has no separate MPO opener; im.format then says "MPO").
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
_JPEG_FORMATS = ("JPEG", "MPO")

# JPEG reduced (DCT-domain) decoding is used only while the scaled crop keeps
# at least this many source pixels per output pixel in both dimensions. With
# 1 the result drifts visibly from a full decode (on ImageNet photos, mean abs
# diff up to 2.8 levels, max 45); with 2 it stays within 0.6 mean.
DRAFT_MARGIN = 2

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

    def __post_init__(self):
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, "
                             f"got {self.resize_mode!r}")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction!r}")
        background = tuple(self.alpha_background)  # a list when read from JSON
        if len(background) != 3 or not all(
                isinstance(c, int) and 0 <= c <= 255 for c in background):
            raise ValueError("alpha_background must be three ints in 0..255, "
                             f"got {self.alpha_background!r}")
        object.__setattr__(self, "alpha_background", background)

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
            "cmyk": "converted without ICC profile (PIL)",
            "icc_profile": "ignored",
            "frames": "first",
            "reduced_jpeg_decode": self.reduced_jpeg_decode,
            "jpeg_draft_margin": DRAFT_MARGIN if self.reduced_jpeg_decode else None,
            "formats": list(ALLOWED_FORMATS),
            "pillow": PIL.__version__,
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
    try:
        filesystem = FileSystems.get_filesystem(uri)
    except Exception as e:  # Beam raises ValueError for an unknown scheme
        raise ImageError("read", "ReadError",
                         f"no filesystem for {shown}: {_clean_message(e)}") from None
    try:
        if isinstance(filesystem, LocalFileSystem):
            _check_local_file(uri, max_bytes, shown)
        # UNCOMPRESSED: the default (AUTO) would gunzip a file named *.gz.
        with filesystem.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
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
    try:
        with _open(data) as im:
            return _decode_opened(im, settings, limits)
    except ImageError:
        raise
    except Exception as e:  # whatever Pillow or a codec raised while decoding
        raise _decode_error(e, data) from None


def _decode_opened(im: Image.Image, settings: PreprocessSettings,
                   limits: DecodeLimits) -> tuple[np.ndarray, int, int]:
    stored_w, stored_h = im.size
    if stored_w < 1 or stored_h < 1:
        raise ImageError("decode", "CorruptImage", f"declares an empty size {im.size}")
    if stored_w * stored_h > limits.max_pixels:
        raise ImageError("decode", "DecompressionBomb",
                         f"declares {stored_w}x{stored_h} = {stored_w * stored_h} "
                         f"pixels, over the limit of {limits.max_pixels}")
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
        pixels = _to_model_input(im, orientation, scale, width, height, settings)
    except ImageError:
        raise
    except MemoryError:
        raise ImageError("preprocess", "OutOfMemory",
                         f"out of memory converting a {width}x{height} image") from None
    except Exception as e:
        raise ImageError("preprocess", "PreprocessFailed",
                         f"{type(e).__name__}: {_clean_message(e)}") from None
    return pixels, width, height


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


def _to_model_input(im: Image.Image, orientation: int, scale: float, width: int,
                    height: int, settings: PreprocessSettings) -> np.ndarray:
    if orientation in _UPRIGHT:
        im = im.transpose(_UPRIGHT[orientation])
    im = _to_l_or_rgb(im, settings.alpha_background)
    box = tuple(v / scale for v in settings.crop_box(width, height))
    im = im.resize((settings.width, settings.height), Image.Resampling.BILINEAR, box=box)
    if im.mode != "RGB":
        im = im.convert("RGB")
    pixels = np.array(im, dtype=np.uint8)  # a writable, C-contiguous copy
    if pixels.shape != (settings.height, settings.width, 3):
        raise ImageError("preprocess", "PreprocessFailed",
                         f"produced pixels of shape {pixels.shape}")
    return pixels


def _to_l_or_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """8-bit grayscale or RGB, alpha composited onto `background`.

    Grayscale stays one channel through the resize (a third of the work).
    """
    if im.mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion to L clips at 255 instead of scaling.
        values = np.asarray(im)
        if values.dtype.kind == "i":  # mode I holds 16-bit data in int32
            values = np.clip(values, 0, 65535)
        # round(v / 257): 0 -> 0, 32768 -> 128, 65535 -> 255
        return Image.fromarray(((values.astype(np.uint32) * 2 + 257) // 514).astype(np.uint8))
    if im.mode == "F":
        raise ImageError("preprocess", "UnsupportedMode",
                         "32-bit float pixels have no defined 0..255 scale")
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


def _decode_error(e: Exception, data: bytes) -> ImageError:
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return ImageError("decode", "DecompressionBomb",
                          f"refused by Pillow's bomb guard: {_clean_message(e)}")
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
)


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


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
        return f"an ISO media container (brand {brand!r}), e.g. HEIC/AVIF, not accepted"
    try:  # incremental: a character cut at byte 1024 is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(data[:1024])
    except UnicodeDecodeError:
        text = None
    if text is not None and sum(c.isprintable() or c.isspace() for c in text) >= 0.95 * len(text):
        return "looks like text"
    return "unknown binary data"


# --- the Beam stage ---------------------------------------------------------

class ReadDecodeResize(beam.DoFn):
    """ImageRef -> DecodedImage, or FailedImage on the FAILED output.

    Never raises for a bad image: one hostile file must not fail (and, on
    retry, re-fail) a bundle of good ones.
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

    def _decode(self, ref: ImageRef) -> DecodedImage | FailedImage:
        digest = None
        try:
            data = read_bytes(ref.uri, self._limits.max_bytes)
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
