"""A small corpus of odd and hostile image files, generated on the fly.

`make_corpus(directory)` writes every file and returns, per file name, what
the read/decode stage must do with it. No pytest dependency, so pipeline-level
tests can reuse it; everything is seeded, so the files are the same each run.

The expectations assume `DecodeLimits(max_bytes=CORPUS_MAX_BYTES)` and the
default max_pixels. Entries that cannot be files in the directory (a missing
path, an unreadable file) are separate: MISSING_FILES and make_unreadable().
"""
from __future__ import annotations

import contextlib
import ctypes
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np
import pillow_heif
from PIL import Image, ImageOps

pillow_heif.register_heif_opener()  # lets Image.save write "HEIF"

# The corpus's max_bytes: too-large.bmp is just over it, everything else under.
CORPUS_MAX_BYTES = 256 * 1024


class Expected(NamedTuple):
    """What should happen to one corpus entry."""
    stage: Optional[str] = None  # None: decodes fine
    error_class: Optional[str] = None
    size: Optional[tuple[int, int]] = None  # (original_width, original_height) when OK

    @property
    def ok(self) -> bool:
        return self.stage is None


def ok(width: int, height: int) -> Expected:
    return Expected(size=(width, height))


def failed(stage: str, error_class: str) -> Expected:
    return Expected(stage, error_class)


# Manifest entries naming files that do not exist: add them to a manifest
# as directory / name, never create them.
MISSING_FILES = {"missing.jpg": failed("read", "FileNotFound")}
# What a file passed through make_unreadable() must give.
UNREADABLE = failed("read", "PermissionDenied")

# Contents of the small lossless images, so tests can check exact pixels.
# BLOCKS: 2 rows x 4 columns of 8x8 cells -> a 32x16 image.
BLOCK_COLOURS = np.array([
    [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)],
    [(0, 255, 255), (255, 0, 255), (0, 0, 0), (255, 255, 255)],
], dtype=np.uint8)
CMYK_SOURCE_RGB = (200, 60, 30)
GRAY16_BANDS = (0, 32768, 65535)  # three 16-pixel-wide columns of gray16.png
RGB16_VALUE = (65535, 32768, 0)  # every pixel of rgb16.png
# left half / right half of the alpha images
PALETTE_LEFT_RGBA, PALETTE_RIGHT_RGBA = (255, 0, 0, 0), (0, 0, 255, 255)
LA_LEFT, LA_RIGHT = (200, 0), (60, 255)
RGBA_LEFT, RGBA_RIGHT = (255, 0, 0, 0), (0, 255, 0, 255)
GIF_FRAME_COLOURS = ((255, 0, 0), (0, 255, 0))

# EXIF orientation -> the transposition that stores an upright image so that
# the orientation tag turns it upright again (the inverse of the one
# PIL.ImageOps.exif_transpose applies).
STORE_ROTATED = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


def blocks_image() -> Image.Image:
    return Image.fromarray(np.repeat(np.repeat(BLOCK_COLOURS, 8, axis=0), 8, axis=1))


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """An RGB image with smooth gradients, texture and hard edges, no symmetry
    (so a wrong rotation or flip shows)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / max(width - 1, 1)
    g = 255 * y / max(height - 1, 1)
    b = 128 + 100 * np.sin(x / max(width, 1) * 7 + y / max(height, 1) * 3)
    img = np.stack([r, g, b], axis=-1)
    coarse = rng.normal(0, 25, (max(height // 8, 1), max(width // 8, 1), 3))
    img += np.asarray(Image.fromarray(coarse.astype(np.float32)[..., 0]).resize(
        (width, height), Image.Resampling.BILINEAR))[..., None]
    # a bright block in the top-left quadrant and a dark bar on the right
    img[height // 8: height // 3, width // 8: width // 3] = (250, 250, 40)
    img[height // 4: 3 * height // 4, 4 * width // 5: 7 * width // 8] = (20, 20, 90)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def rotated_jpeg(upright: Image.Image, orientation: int, quality: int = 95) -> bytes:
    """A JPEG storing `upright` turned so that EXIF `orientation` undoes it."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored = upright.transpose(STORE_ROTATED[orientation])
    return encode(stored, "JPEG", quality=quality, exif=exif.tobytes())


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int,
            idat: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit RGB, a
    header that lies about the size)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def _rgb16_png() -> bytes:
    row = b"\x00" + struct.pack(">HHH", *RGB16_VALUE) * 16  # filter byte 0, 16 pixels
    return raw_png(16, 16, 16, 2, zlib.compress(row * 16))


def _bomb_png() -> bytes:
    """Declares 40000x40000 (1.6 gigapixels); the data is a few bytes."""
    return raw_png(40000, 40000, 1, 0, zlib.compress(b"\x00" * 64))


def _bomb_jpeg() -> bytes:
    """A small JPEG whose frame header is patched to say 60000x60000."""
    data = bytearray(encode(photo_like(32, 32, seed=7), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", 60000, 60000)  # height, width
    return bytes(data)


def _bad_crc_png() -> bytes:
    data = bytearray(encode(blocks_image(), "PNG"))
    data[29] ^= 0xFF  # the IHDR chunk's CRC (8 signature + 8 + 13 payload)
    return bytes(data)


def _corrupt_data_png() -> bytes:
    """Valid chunks, but the compressed pixel stream inside IDAT is garbage."""
    rng = np.random.default_rng(3)
    rows = (b"\x00" + rng.bytes(32 * 3)) * 16
    idat = bytearray(zlib.compress(rows))
    idat[2:] = rng.bytes(len(idat) - 2)
    return raw_png(32, 16, 8, 2, bytes(idat))


def _palette_png() -> bytes:
    im = Image.new("P", (32, 16), 0)
    im.putpalette(PALETTE_LEFT_RGBA[:3] + PALETTE_RIGHT_RGBA[:3])
    im.paste(1, (16, 0, 32, 16))
    return encode(im, "PNG", transparency=bytes([PALETTE_LEFT_RGBA[3], PALETTE_RIGHT_RGBA[3]]))


def _halves(mode: str, left: tuple, right: tuple) -> Image.Image:
    im = Image.new(mode, (32, 16), left)
    im.paste(right, (16, 0, 32, 16))
    return im


def _gray16_png() -> bytes:
    bands = np.repeat(np.array(GRAY16_BANDS, dtype=np.uint16), 16)
    return encode(Image.fromarray(np.tile(bands, (16, 1))), "PNG")


def _bilevel_png() -> bytes:
    checker = (np.indices((16, 16)).sum(axis=0) % 2).astype(bool)
    return encode(Image.fromarray(checker), "PNG")


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in GIF_FRAME_COLOURS]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)


def float_planar_tiff(pages: int = 2) -> bytes:
    """What scientific software writes (like scikit-image's multipage_rgb.tif):
    float64 RGB in [0, 1], one plane per channel, several pages. Pillow
    cannot read it. Page p holds BLOCK_COLOURS / 255, then darkened by p."""
    import tifffile
    first = np.asarray(blocks_image(), dtype=np.float64) / 255
    stack = np.stack([first / (1 + p) for p in range(pages)]).transpose(0, 3, 1, 2)
    buf = io.BytesIO()
    tifffile.imwrite(buf, stack, photometric="rgb", planarconfig="separate")
    return buf.getvalue()


def _iso_video() -> bytes:
    """The first box of an MP4: an ISO media file that is no still image."""
    return (struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512)
            + b"isomiso2" + struct.pack(">I", 8) + b"free")


def _html_page() -> bytes:
    return (b"<!DOCTYPE html>\n<html><head><title>403 Forbidden</title></head>\n"
            b"<body><h1>Forbidden</h1><p>You don't have permission to access "
            b"this resource.</p></body></html>\n")


def _postscript() -> bytes:
    """EPS, which Pillow would hand to Ghostscript if it were allowed."""
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n")


def make_corpus(directory: Path) -> dict[str, Expected]:
    """Write the corpus into `directory`; return {file name: Expected}.

    Every file listed is written, and nothing else: globbing the directory
    gives exactly the keys.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    photo = photo_like(96, 64, seed=1)
    good_jpeg = encode(photo, "JPEG", quality=90)
    upright = photo_like(64, 48, seed=2)
    wide = Image.fromarray(np.tile(np.linspace(0, 255, 10000, dtype=np.uint8), (10, 1)))
    cmyk = Image.new("RGB", (32, 32), CMYK_SOURCE_RGB).convert("CMYK")
    jpeg = encode(photo_like(128, 96, seed=4), "JPEG", quality=90)
    webp = encode(photo, "WEBP", quality=80)
    heic = encode(photo, "HEIF", quality=80)  # pillow-heif's writer (x265)
    too_large = Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (300, 300, 3), dtype=np.uint8))

    files: dict[str, tuple[bytes, Expected]] = {
        # good images
        "good.jpg": (good_jpeg, ok(96, 64)),
        "good.png": (encode(photo, "PNG"), ok(96, 64)),
        "progressive.jpg": (encode(photo, "JPEG", quality=90, progressive=True), ok(96, 64)),
        # a camera's stereo pair; the second picture is the negative of the first
        "stereo.mpo": (encode(photo, "MPO", quality=90, save_all=True,
                              append_images=[ImageOps.invert(photo)]), ok(96, 64)),
        "gray.jpg": (encode(photo.convert("L"), "JPEG", quality=90), ok(96, 64)),
        "cmyk.jpg": (encode(cmyk, "JPEG", quality=95), ok(32, 32)),
        "one-pixel.png": (encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"), ok(1, 1)),
        "wide-10000x10.png": (encode(wide, "PNG"), ok(10000, 10)),
        "gray16.png": (_gray16_png(), ok(48, 16)),
        "rgb16.png": (_rgb16_png(), ok(16, 16)),
        "palette-transparent.png": (_palette_png(), ok(32, 16)),
        "gray-alpha.png": (encode(_halves("LA", LA_LEFT, LA_RIGHT), "PNG"), ok(32, 16)),
        "rgba.png": (encode(_halves("RGBA", RGBA_LEFT, RGBA_RIGHT), "PNG"), ok(32, 16)),
        "bilevel.png": (_bilevel_png(), ok(16, 16)),
        "animated.gif": (_animated_gif(), ok(16, 16)),
        "blocks.webp": (encode(blocks_image(), "WEBP", lossless=True), ok(32, 16)),
        "blocks.bmp": (encode(blocks_image(), "BMP"), ok(32, 16)),
        "blocks.tif": (encode(blocks_image(), "TIFF", compression="tiff_deflate"), ok(32, 16)),
        "blocks.ppm": (encode(blocks_image(), "PPM"), ok(32, 16)),
        # phones' formats and what scanners and microscopes write
        "photo.heic": (heic, ok(96, 64)),
        "photo.avif": (encode(photo, "AVIF", quality=80), ok(96, 64)),
        "blocks-zstd.tif": (encode(blocks_image(), "TIFF", compression="tiff_zstd"),
                            ok(32, 16)),
        "float-planar-pages.tif": (float_planar_tiff(), ok(32, 16)),
        "upright.jpg": (encode(upright, "JPEG", quality=95), ok(64, 48)),
        "exif-orientation-3.jpg": (rotated_jpeg(upright, 3), ok(64, 48)),
        "exif-orientation-6.jpg": (rotated_jpeg(upright, 6), ok(64, 48)),
        "exif-orientation-8.jpg": (rotated_jpeg(upright, 8), ok(64, 48)),
        "name with spaces.jpg": (good_jpeg, ok(96, 64)),
        "ünïcödé 写真.jpg": (good_jpeg, ok(96, 64)),
        "hash#1.jpg": (good_jpeg, ok(96, 64)),
        # bad files
        "empty.jpg": (b"", failed("decode", "EmptyFile")),
        "truncated.jpg": (jpeg[: len(jpeg) * 6 // 10], failed("decode", "TruncatedImage")),
        "truncated-header.png": (encode(photo, "PNG")[:20], failed("decode", "TruncatedImage")),
        # libwebp only says "could not create decoder object"; the RIFF size tells
        "truncated.webp": (webp[: len(webp) * 6 // 10], failed("decode", "TruncatedImage")),
        "truncated.heic": (heic[: len(heic) * 6 // 10], failed("decode", "TruncatedImage")),
        "truncated-float.tif": (float_planar_tiff(pages=1)[:-200],
                                failed("decode", "TruncatedImage")),
        "video.jpg": (_iso_video(), failed("decode", "UnrecognizedFormat")),
        "random-bytes.jpg": (np.random.default_rng(6).bytes(4096),
                             failed("decode", "UnrecognizedFormat")),
        "error-page.jpg": (_html_page(), failed("decode", "UnrecognizedFormat")),
        "postscript.jpg": (_postscript(), failed("decode", "UnrecognizedFormat")),
        "bad-crc.png": (_bad_crc_png(), failed("decode", "CorruptImage")),
        "corrupt-data.png": (_corrupt_data_png(), failed("decode", "CorruptImage")),
        "bomb.png": (_bomb_png(), failed("decode", "DecompressionBomb")),
        "bomb.jpg": (_bomb_jpeg(), failed("decode", "DecompressionBomb")),
        "too-large.bmp": (encode(too_large, "BMP"), failed("read", "FileTooLarge")),
    }
    for name, (data, _) in files.items():
        (directory / name).write_bytes(data)
    return {name: expected for name, (_, expected) in files.items()}


def make_unreadable(path: Path) -> bool:
    """Remove all permissions from `path`; return whether this process is now
    actually refused (root is not, unless inside file_permissions_enforced())."""
    os.chmod(path, 0)
    try:
        with open(path, "rb"):
            return False
    except PermissionError:
        return True


# Linux capability numbers and the capget/capset ABI (linux/capability.h).
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@contextlib.contextmanager
def file_permissions_enforced() -> Iterator[bool]:
    """Make permission bits apply to the calling thread even as root.

    Root reads a chmod-000 file through CAP_DAC_OVERRIDE; this drops that
    capability (and CAP_DAC_READ_SEARCH) from the thread's effective set and
    restores it afterwards. Threads started inside the block inherit the
    reduced set. Yields whether permissions are enforced.
    """
    if os.geteuid() != 0:
        yield True
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        caps = (_CapData * 2)()
        if libc.capget(ctypes.byref(header), caps) != 0:
            raise OSError(ctypes.get_errno(), "capget")
    except (OSError, AttributeError):  # not Linux, or no capget
        yield False
        return
    saved = caps[0].effective
    caps[0].effective &= ~((1 << _CAP_DAC_OVERRIDE) | (1 << _CAP_DAC_READ_SEARCH))
    dropped = libc.capset(ctypes.byref(header), caps) == 0
    try:
        yield dropped
    finally:
        if dropped:
            caps[0].effective = saved
            libc.capset(ctypes.byref(header), caps)
