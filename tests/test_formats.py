"""HEIC/HEIF, AVIF and the TIFFs of scanners and microscopes.

Every file here is made by the test itself with the libraries that write
these formats (pillow-heif's x265 encoder, Pillow's libavif, tifffile), so
the expected pixels come from the source image, not from the code tested.
"""
from __future__ import annotations

import io
import resource
import struct
import time

import numpy as np
import pytest
import tifffile
from PIL import Image, features

from corpus import STORE_ROTATED, blocks_image, encode, float_planar_tiff, photo_like
from jobs import matrix, read_embeddings, read_errors, run_job, sample_photos, summary
from transforms.decode import (ALLOWED_FORMATS, DecodeLimits, ImageError, PreprocessSettings,
                               decode_and_resize)
from transforms.listing import DEFAULT_EXTENSIONS

LIMITS = DecodeLimits()
# Lossy HEIC/AVIF at quality 90 against the source, mean abs levels.
LOSSY_TOLERANCE = 4.0


def decode(data: bytes, width: int, height: int, limits: DecodeLimits = LIMITS, **kw):
    return decode_and_resize(data, PreprocessSettings(height, width, **kw), limits)


def error_of(data: bytes, limits: DecodeLimits = LIMITS) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode(data, 16, 16, limits)
    return info.value


def mean_abs_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean())


def tiff(array: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, array, **kw)
    return buf.getvalue()


def patch_ispe(data: bytes, width: int, height: int) -> bytes:
    """Make the image spatial extent box declare another size."""
    at = data.index(b"ispe") + 8  # type, then version and flags
    return data[:at] + struct.pack(">II", width, height) + data[at + 8:]


def patch_tiff_size(data: bytes, width: int, height: int) -> bytes:
    """Rewrite ImageWidth and ImageLength in the first IFD (little-endian,
    classic TIFF, as tifffile and Pillow write them)."""
    assert data[:4] == b"II*\x00"
    out = bytearray(data)
    ifd = struct.unpack_from("<I", data, 4)[0]
    for i in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * i
        tag, kind = struct.unpack_from("<HH", data, entry)
        if tag in (256, 257):
            fmt = "<H" if kind == 3 else "<I"
            struct.pack_into(fmt, out, entry + 8, width if tag == 256 else height)
    return bytes(out)


# --- HEIC and AVIF -----------------------------------------------------------------

def test_the_installed_libraries_decode_heif_and_avif():
    assert "HEIF" in ALLOWED_FORMATS and "AVIF" in ALLOWED_FORMATS
    assert features.check("avif"), "this Pillow was built without libavif"
    assert {"heic", "heif", "avif"} <= set(DEFAULT_EXTENSIONS)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_phone_formats_decode_close_to_their_source(fmt, mode):
    source = photo_like(96, 64, seed=11).convert(mode)
    pixels, width, height = decode(encode(source, fmt, quality=90), 96, 64)
    assert (width, height) == (96, 64)
    assert mean_abs_diff(pixels, source.convert("RGB")) < LOSSY_TOLERANCE


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_come_out_upright(fmt):
    # HEIF stores the turn as an irot box (pillow-heif writes one from the
    # EXIF tag); Pillow's AVIF keeps the EXIF tag. Both must end upright.
    upright = photo_like(64, 48, seed=12)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(upright.transpose(STORE_ROTATED[6]), fmt, quality=95, exif=exif.tobytes())
    pixels, width, height = decode(data, 64, 48)
    assert (width, height) == (64, 48)
    assert mean_abs_diff(pixels, upright) < LOSSY_TOLERANCE


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_formats_alpha_goes_onto_the_background(fmt):
    rgba = Image.new("RGBA", (32, 32), (0, 0, 255, 255))
    rgba.paste((255, 0, 0, 0), (0, 0, 16, 32))  # left half fully transparent
    pixels, _, _ = decode(encode(rgba, fmt, quality=95), 32, 32,
                          alpha_background=(0, 255, 0))
    assert mean_abs_diff(pixels[:, 2:14], np.full((32, 12, 3), (0, 255, 0))) < 8
    assert mean_abs_diff(pixels[:, 18:30], np.full((32, 12, 3), (0, 0, 255))) < 8


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_truncated_phone_formats_say_so(fmt):
    data = encode(photo_like(96, 64, seed=13), fmt, quality=90)
    for cut in (30, len(data) // 2, len(data) - 10):
        e = error_of(data[:cut])
        assert (e.stage, e.error_class) == ("decode", "TruncatedImage"), (cut, str(e))


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_phone_format_bombs_are_refused_from_the_header(fmt):
    data = encode(photo_like(64, 64, seed=14), fmt, quality=90)
    # 12000x12000 is under libheif's and libavif's own limits (they would
    # decode it), 40000x40000 over them (they would call it corrupt).
    for side in (12000, 40000):
        start = time.perf_counter()
        e = error_of(patch_ispe(data, side, side))
        assert time.perf_counter() - start < 0.5
        assert (e.stage, e.error_class) == ("decode", "DecompressionBomb"), str(e)
        assert f"{side}x{side}" in e.message
    small = error_of(data, DecodeLimits(max_pixels=64 * 64 - 1))
    assert small.error_class == "DecompressionBomb"


def test_an_iso_media_file_that_is_no_image_says_so():
    video = struct.pack(">I", 24) + b"ftypisom" + struct.pack(">I", 512) + b"isomiso2"
    e = error_of(video + b"\x00" * 100)
    assert (e.stage, e.error_class) == ("decode", "UnrecognizedFormat")
    assert "'isom'" in e.message and "not a still image" in e.message


# --- TIFF ---------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["deflate", "lzw", "zstd", "packbits",
                                         "webp", "jpeg2000", "lerc"])
def test_compressed_tiffs_decode_exactly(compression):
    # webp, jpeg2000 and lerc are beyond Pillow's libtiff: tifffile reads them.
    kw = {"compressionargs": {"level": 100}} if compression == "webp" else {}
    if compression == "jpeg2000":
        kw = {"compressionargs": {"level": 0}}  # lossless (reversible) JPEG 2000
    blocks = np.asarray(blocks_image())
    data = tiff(blocks, photometric="rgb", compression=compression, **kw)
    pixels, width, height = decode(data, 32, 16)
    assert (width, height) == (32, 16)
    assert np.array_equal(pixels, blocks)


def test_multipage_tiff_gives_its_first_page():
    pages = np.stack([np.full((16, 24, 3), c, np.uint8)
                      for c in ((200, 30, 30), (30, 200, 30), (30, 30, 200))])
    for kw in ({}, {"compression": "zstd"}, {"photometric": "rgb", "compression": "lzw"}):
        pixels, width, height = decode(tiff(pages, **kw), 24, 16)
        assert (width, height) == (24, 16)
        assert (pixels == (200, 30, 30)).all(), kw


def test_float_planar_multipage_tiff_decodes_its_first_page():
    pixels, width, height = decode(float_planar_tiff(pages=3), 32, 16)
    assert (width, height) == (32, 16)
    assert np.array_equal(pixels, np.asarray(blocks_image()))


def test_scikit_image_multipage_rgb_tiff_decodes():
    """The real file that failed as "header is invalid"."""
    path = sample_photos() / "multipage_rgb.tif"
    first_page = tifffile.imread(path, key=0)  # (3, 10, 10) floats in [0, 1]
    pixels, width, height = decode(path.read_bytes(), 10, 10)
    assert (width, height) == (10, 10)
    want = np.rint(first_page.transpose(1, 2, 0) * 255)
    assert np.abs(pixels - want).max() == 0


@pytest.mark.parametrize("bits,dtype", [(16, np.uint16), (12, np.uint16)])
def test_deep_integer_tiffs_scale_by_their_bit_depth(bits, dtype):
    top = 2 ** bits - 1
    values = np.array([[0, top // 2 + 1, top]], dtype=dtype).repeat(4, axis=0)
    kw = {"bitspersample": bits} if bits == 12 else {}  # 12 bits: packed, uncompressed
    pixels, _, _ = decode(tiff(values, photometric="minisblack", **kw), 3, 4)
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def test_float_tiffs_outside_zero_to_one_are_refused():
    for values in (np.full((4, 4), 2.5, np.float32), np.full((4, 4), np.nan, np.float32)):
        data = tiff(np.stack([values] * 3, axis=-1), photometric="rgb")
        e = error_of(data)
        assert (e.stage, e.error_class) == ("preprocess", "UnsupportedMode"), str(e)
    single = error_of(tiff(np.full((4, 4), -1.0, np.float32)))  # Pillow's mode F
    assert single.error_class == "UnsupportedMode" and "[0, 1]" in single.message
    ok, _, _ = decode(tiff(np.full((4, 4), 0.5, np.float32)), 4, 4)
    assert (ok == 128).all()


def test_tiff_alpha_goes_onto_the_background():
    rgba = np.zeros((8, 8, 4), np.float32)
    rgba[..., 2] = 1.0  # blue
    rgba[:, 4:, 3] = 1.0  # the left half fully transparent
    data = tiff(rgba, photometric="rgb", extrasamples=["unassalpha"])
    pixels, _, _ = decode(data, 8, 8, alpha_background=(0, 255, 0))
    assert (pixels[:, :3] == (0, 255, 0)).all() and (pixels[:, 5:] == (0, 0, 255)).all()


@pytest.mark.parametrize("name,data", [
    ("zstd", encode(photo_like(64, 48), "TIFF", compression="tiff_zstd")),
    ("float-planar", float_planar_tiff(pages=1)),
    ("jpeg2000", tiff(np.asarray(photo_like(64, 48)), photometric="rgb",
                      compression="jpeg2000")),
])
def test_truncated_tiffs_say_so(name, data):
    for cut in (len(data) // 2, len(data) - 10):
        e = error_of(data[:cut])
        assert (e.stage, e.error_class) == ("decode", "TruncatedImage"), (name, cut, str(e))


@pytest.mark.parametrize("name,data", [
    ("pillow-readable", encode(photo_like(64, 48), "TIFF", compression="tiff_deflate")),
    ("tifffile-only", float_planar_tiff(pages=1)),
])
def test_tiff_bombs_are_refused_before_decoding(name, data):
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    start = time.perf_counter()
    e = error_of(patch_tiff_size(data, 60000, 60000))
    assert time.perf_counter() - start < 0.5
    assert (e.stage, e.error_class) == ("decode", "DecompressionBomb"), (name, str(e))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024 < 100


def test_settings_record_formats_and_frame_policy():
    metadata = PreprocessSettings(96, 96).to_metadata()
    assert {"HEIF", "AVIF", "TIFF"} <= set(metadata["formats"])
    assert "TIFF page" in metadata["frames"] and "HEIF primary image" in metadata["frames"]
    assert metadata["tiff_fallback"] == "tifffile"
    versions = metadata["library_versions"]
    assert versions["libheif"] and versions["libavif"] and versions["imagecodecs"]


# --- end to end -----------------------------------------------------------------------

def test_job_embeds_the_new_formats(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    photo = photo_like(96, 64, seed=21)
    files = {
        "phone.heic": encode(photo, "HEIF", quality=90),
        "phone.avif": encode(photo, "AVIF", quality=90),
        "scan-zstd.tif": encode(photo, "TIFF", compression="tiff_zstd"),
        "scan-pages.tiff": tiff(np.stack([np.asarray(photo)] * 2), photometric="rgb",
                                compression="jpeg2000"),
        "microscope.tif": float_planar_tiff(),
        "reference.png": encode(photo, "PNG"),
        "cut.heic": encode(photo, "HEIF", quality=90)[:500],
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    output = tmp_path / "out"
    code = run_job("--input", folder, "--output", output, "--model_source", "random",
                   "--model", "mobilenet_v2_035_96", "--max_failure_rate", "0.5")
    assert code == 0
    table = read_embeddings(output)
    ids = [i.rsplit("/", 1)[-1] for i in table.column("image_id").to_pylist()]
    assert sorted(ids) == sorted(set(files) - {"cut.heic"})
    errors = read_errors(output).to_pylist()
    assert [(e["image_id"].rsplit("/", 1)[-1], e["error_class"]) for e in errors] == \
        [("cut.heic", "TruncatedImage")]
    # The same picture in lossless and lossy formats: nearly the same embedding.
    embeddings = dict(zip(ids, matrix(table, "feature_vector")))
    reference = embeddings["reference.png"]
    for name in ("phone.heic", "phone.avif", "scan-zstd.tif"):
        cosine = float(embeddings[name] @ reference
                       / np.linalg.norm(embeddings[name]) / np.linalg.norm(reference))
        assert cosine > 0.97, name
    assert summary(output)["counts"]["embedded"] == 6


@pytest.mark.parametrize("photometric", ["miniswhite", "palette", "separated", "minisblack"])
def test_tiff_colour_spaces_read_by_tifffile_match_pillows_reading(photometric):
    """The same page, uncompressed (Pillow reads it) and LERC-compressed
    (only tifffile does): the two readers must give the same pixels."""
    rng = np.random.default_rng(30)
    kw = {"photometric": photometric}
    if photometric == "separated":
        samples = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)  # CMYK inks
    elif photometric == "palette":
        samples = rng.integers(0, 4, (12, 20), dtype=np.uint8)
        colours = np.array([[65535, 0, 0, 30000], [0, 65535, 0, 30000],
                            [0, 0, 65535, 30000]], dtype=np.uint16)
        kw["colormap"] = np.concatenate([colours, np.zeros((3, 252), np.uint16)], axis=1)
    else:
        samples = rng.integers(0, 256, (12, 20), dtype=np.uint8)
    plain, lerc = tiff(samples, **kw), tiff(samples, compression="lerc", **kw)
    with pytest.raises(Exception):  # the premise: Pillow cannot read LERC
        Image.open(io.BytesIO(lerc)).load()
    by_pillow, *size_a = decode(plain, 20, 12)
    by_tifffile, *size_b = decode(lerc, 20, 12)
    assert size_a == size_b == [20, 12]
    assert np.abs(by_pillow.astype(int) - by_tifffile.astype(int)).max() <= 1
