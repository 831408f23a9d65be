"""Tests for transforms.decode: the read + decode + resize stage."""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import pickle
import resource
import warnings
from pathlib import Path

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageOps, JpegImagePlugin

import corpus
from paths import needs_shared
from corpus import CORPUS_MAX_BYTES, MISSING_FILES, encode, photo_like, raw_png
from schemas.records import STAGES, DecodedImage, FailedImage, ImageRef
from transforms import decode
from transforms.decode import (DecodeLimits, ImageError, PreprocessSettings, ReadDecodeResize,
                               decode_and_resize, read_bytes)
from transforms.uris import redact

SHARED = Path(__file__).resolve().parents[2] / "shared"
IMAGENET = SHARED / "data" / "imagenet-sample"
LIMITS = DecodeLimits(max_bytes=CORPUS_MAX_BYTES)
# Mean abs difference (levels) allowed between a reduced (draft) JPEG decode
# and a full decode followed by the same resize.
DRAFT_TOLERANCE = 1.5


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> tuple[Path, dict[str, corpus.Expected]]:
    directory = tmp_path_factory.mktemp("corpus")
    return directory, corpus.make_corpus(directory)


def decode_file(path: Path, settings: PreprocessSettings, limits: DecodeLimits = LIMITS):
    return decode_and_resize(read_bytes(str(path), limits.max_bytes), settings, limits)


def error_of(fn, *args) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args)
    return info.value


def native(directory: Path, name: str, background=(255, 255, 255)) -> np.ndarray:
    """Decode at the image's own size, so no resampling blurs the values."""
    with Image.open(directory / name) as im:
        width, height = im.size
    return decode_file(directory / name, PreprocessSettings(
        height, width, alpha_background=background))[0]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


# --- the corpus, end to end --------------------------------------------------

@pytest.mark.parametrize("resize_mode", ["stretch", "center_crop"])
def test_every_corpus_file_has_its_expected_outcome(corpus_dir, resize_mode):
    directory, expected = corpus_dir
    assert sorted(p.name for p in directory.iterdir()) == sorted(expected)
    settings = PreprocessSettings(24, 40, resize_mode=resize_mode)
    wrong = []
    for name, want in expected.items():
        try:
            pixels, width, height = decode_file(directory / name, settings)
        except ImageError as e:
            if (e.stage, e.error_class) != (want.stage, want.error_class):
                wrong.append((name, want, str(e)))
            continue
        if not want.ok or (width, height) != want.size:
            wrong.append((name, want, ("OK", width, height)))
        assert pixels.shape == (24, 40, 3) and pixels.dtype == np.uint8, name
        assert pixels.flags.c_contiguous and pixels.flags.writeable, name
    assert wrong == []


def test_corpus_is_small(tmp_path):
    corpus.make_corpus(tmp_path)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2 * 1024 * 1024


def test_unrecognised_files_say_what_they_look_like(corpus_dir):
    directory, _ = corpus_dir
    html = error_of(decode_file, directory / "error-page.jpg", PreprocessSettings(8, 8))
    assert (html.stage, html.error_class) == ("decode", "UnrecognizedFormat")
    assert "HTML" in html.message
    eps = error_of(decode_file, directory / "postscript.jpg", PreprocessSettings(8, 8))
    assert eps.error_class == "UnrecognizedFormat" and "Ghostscript" in eps.message
    noise = error_of(decode_file, directory / "random-bytes.jpg", PreprocessSettings(8, 8))
    assert "HTML" not in noise.message and "binary" in noise.message


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_truncation_is_not_papered_over(fmt):
    # With ImageFile.LOAD_TRUNCATED_IMAGES a cut file would decode to grey.
    data = encode(photo_like(64, 64), fmt)
    for cut in (len(data) // 3, len(data) - 10):
        e = error_of(decode_and_resize, data[:cut], PreprocessSettings(8, 8), LIMITS)
        assert (e.stage, e.error_class) == ("decode", "TruncatedImage"), cut


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about some damage
def test_damaged_files_only_ever_raise_image_error(corpus_dir):
    """Seeded fuzzing: flipped bytes and cuts in every good corpus file."""
    directory, expected = corpus_dir
    rng = np.random.default_rng(20)
    settings = PreprocessSettings(16, 16)
    for name in sorted(n for n, e in expected.items() if e.ok):
        original = (directory / name).read_bytes()
        for _ in range(8):
            data = bytearray(original)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            data = bytes(data[: int(rng.integers(len(data) // 2, len(data) + 1))])
            try:  # a hang fails the test through pytest-timeout
                pixels, _, _ = decode_and_resize(data, settings, LIMITS)
                assert pixels.shape == (16, 16, 3), name
            except ImageError as e:
                assert e.stage in ("decode", "preprocess") and e.error_class, name


# --- decompression bombs -----------------------------------------------------

def test_bombs_are_refused_from_the_header(corpus_dir):
    directory, _ = corpus_dir
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    for name in ("bomb.png", "bomb.jpg"):  # 1.6 and 3.6 gigapixels declared
        data = (directory / name).read_bytes()
        e = error_of(decode_and_resize, data, PreprocessSettings(224, 224), DecodeLimits())
        assert (e.stage, e.error_class) == ("decode", "DecompressionBomb"), name
    # Decoding either would take gigabytes: refused before any pixel.
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100


def test_our_pixel_limit_refuses_before_decoding():
    # 2000x2000 is far below Pillow's own limit; the pixel stream is garbage,
    # so decoding it would give CorruptImage, not DecompressionBomb.
    data = raw_png(2000, 2000, 8, 0, np.random.default_rng(8).bytes(64))
    e = error_of(decode_and_resize, data, PreprocessSettings(8, 8),
                 DecodeLimits(max_pixels=1_000_000))
    assert (e.stage, e.error_class) == ("decode", "DecompressionBomb")
    assert "2000x2000" in e.message


def test_our_pixel_limit_overrides_a_lower_pillow_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone refuses > 2000
    data = encode(photo_like(100, 100), "PNG")
    pixels, width, height = decode_and_resize(data, PreprocessSettings(8, 8), DecodeLimits())
    assert (width, height) == (100, 100) and pixels.shape == (8, 8, 3)


def test_pillow_bomb_warning_maps_to_decompression_bomb(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)
    data = encode(photo_like(150, 100), "PNG")  # 15000 px: Pillow warns
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        e = error_of(decode_and_resize, data, PreprocessSettings(8, 8),
                     DecodeLimits(max_pixels=10_000))
    assert (e.stage, e.error_class) == ("decode", "DecompressionBomb")


# --- pixel values ------------------------------------------------------------

def test_tiny_and_extreme_aspect_images(corpus_dir):
    directory, _ = corpus_dir
    for mode in ("stretch", "center_crop"):
        pixels, *_ = decode_file(directory / "one-pixel.png", PreprocessSettings(
            16, 16, resize_mode=mode))
        assert (pixels == (10, 200, 30)).all(), mode
    stretched, *_ = decode_file(directory / "wide-10000x10.png", PreprocessSettings(8, 64))
    row = stretched[4, :, 0].astype(int)
    assert row[0] < 5 and row[-1] > 250 and (np.diff(row) >= 0).all()
    cropped, *_ = decode_file(directory / "wide-10000x10.png", PreprocessSettings(
        8, 8, resize_mode="center_crop"))
    assert np.abs(cropped.astype(int) - 127).max() <= 2  # the middle of the gradient


def test_cmyk_and_grayscale_jpeg_become_rgb(corpus_dir):
    directory, _ = corpus_dir
    cmyk = native(directory, "cmyk.jpg")
    assert np.abs(cmyk.reshape(-1, 3).mean(axis=0) - corpus.CMYK_SOURCE_RGB).max() < 6
    gray = native(directory, "gray.jpg")
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_sixteen_bit_images_are_scaled_not_clipped(corpus_dir):
    directory, _ = corpus_dir
    gray16 = native(directory, "gray16.png")
    assert [int(gray16[0, x, 0]) for x in (0, 16, 32)] == [0, 128, 255]
    assert (gray16[..., 0] == gray16[..., 2]).all()
    rgb16 = native(directory, "rgb16.png")
    assert (rgb16 == (255, 128, 0)).all()


@pytest.mark.parametrize("background", [(255, 255, 255), (0, 128, 255)])
def test_transparency_is_composited_onto_the_background(corpus_dir, background):
    directory, _ = corpus_dir
    for name, right in (("palette-transparent.png", corpus.PALETTE_RIGHT_RGBA[:3]),
                        ("gray-alpha.png", (corpus.LA_RIGHT[0],) * 3),
                        ("rgba.png", corpus.RGBA_RIGHT[:3])):
        pixels = native(directory, name, background)
        assert (pixels[:, :16] == background).all(), name  # transparent: background
        assert (pixels[:, 16:] == right).all(), name  # opaque: unchanged


def test_half_transparent_pixels_are_blended():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 128))
    pixels, *_ = decode_and_resize(encode(rgba, "PNG"), PreprocessSettings(
        4, 4, alpha_background=(0, 0, 255)), LIMITS)
    assert np.abs(pixels.astype(int) - (128, 0, 127)).max() <= 1


def test_bilevel_multi_frame_and_lossless_formats(corpus_dir):
    directory, _ = corpus_dir
    bilevel = native(directory, "bilevel.png")[..., 0]
    checker = np.indices((16, 16)).sum(axis=0) % 2 * 255
    assert (bilevel == checker).all()
    assert (native(directory, "animated.gif") == corpus.GIF_FRAME_COLOURS[0]).all()
    first_picture = native(directory, "stereo.mpo")
    assert mean_abs_diff(first_picture, native(directory, "good.jpg")) < 3
    blocks = np.asarray(corpus.blocks_image())
    for name in ("blocks.webp", "blocks.bmp", "blocks.tif", "blocks.ppm"):
        assert (native(directory, name) == blocks).all(), name


def test_exif_orientation_is_applied(corpus_dir):
    directory, _ = corpus_dir
    upright = native(directory, "upright.jpg")
    assert upright.shape == (48, 64, 3)
    for orientation in (3, 6, 8):
        name = f"exif-orientation-{orientation}.jpg"
        pixels, width, height = decode_file(directory / name, PreprocessSettings(48, 64))
        assert (width, height) == (64, 48), name
        assert mean_abs_diff(pixels, upright) < 3, name
        # the image is asymmetric, so a wrong turn would show
        assert mean_abs_diff(pixels, np.rot90(upright, 2)) > 20, name
        with Image.open(directory / name) as im:
            reference = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
        assert (pixels == reference).all(), name


def test_center_crop_takes_the_centred_target_aspect_region():
    # 300x150, red border, green inside. The 0.875 centred square is
    # x 84.4..215.6, y 9.4..140.6; green covers x 80..220, y 5..145, so even
    # the bilinear filter's reach past the crop edge only sees green.
    image = np.zeros((150, 300, 3), np.uint8)
    image[...] = (255, 0, 0)
    image[5:145, 80:220] = (0, 255, 0)
    data = encode(Image.fromarray(image), "PNG")
    cropped, width, height = decode_and_resize(data, PreprocessSettings(
        32, 32, resize_mode="center_crop"), LIMITS)
    assert (width, height) == (300, 150)
    assert (cropped == (0, 255, 0)).all()
    whole, *_ = decode_and_resize(data, PreprocessSettings(
        32, 32, resize_mode="center_crop", crop_fraction=1.0), LIMITS)
    assert whole[0, 16, 0] > 100 and whole[16, 16, 0] == 0  # border above, green centre
    stretched, *_ = decode_and_resize(data, PreprocessSettings(32, 32), LIMITS)
    assert stretched[16, 0, 0] == 255 and stretched[16, 16, 1] == 255


def test_center_crop_box_follows_the_target_aspect_ratio():
    settings = PreprocessSettings(50, 100, resize_mode="center_crop", crop_fraction=0.5)
    # largest 2:1 crop of 400x400 is 400x200; half of it is 200x100, centred
    assert settings.crop_box(400, 400) == (100.0, 150.0, 300.0, 250.0)
    assert PreprocessSettings(50, 100).crop_box(400, 400) == (0.0, 0.0, 400.0, 400.0)


# --- reduced-size JPEG decoding ----------------------------------------------

@pytest.fixture
def draft_calls(monkeypatch):
    """Records (mode before, requested size, mode after) of each draft()."""
    calls = []
    original = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        before = self.mode
        result = original(self, mode, size)
        calls.append((before, size, self.mode))
        return result
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    return calls


def textured(width: int, height: int, seed: int) -> Image.Image:
    """photo_like plus fine grain, the detail a real large photo has."""
    base = np.asarray(photo_like(width, height, seed), dtype=np.int16)
    grain = np.random.default_rng(seed).normal(0, 12, (height, width, 1))
    return Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8))


def compare_draft(data: bytes, settings: PreprocessSettings):
    """(mean, max) abs diff between the drafted decode and a full one."""
    full = dataclasses.replace(settings, reduced_jpeg_decode=False)
    drafted, *size_a = decode_and_resize(data, settings, LIMITS)
    reference, *size_b = decode_and_resize(data, full, LIMITS)
    assert size_a == size_b
    diff = np.abs(drafted.astype(np.int16) - reference.astype(np.int16))
    return float(diff.mean()), int(diff.max())


@pytest.fixture(scope="module")
def large_jpeg() -> bytes:
    return encode(textured(3500, 2600, seed=11), "JPEG", quality=90)


@pytest.mark.parametrize("resize_mode", ["stretch", "center_crop"])
def test_draft_stays_within_tolerance_on_a_large_jpeg(large_jpeg, draft_calls, resize_mode):
    settings = PreprocessSettings(224, 224, resize_mode=resize_mode, jpeg_decoder="pillow")
    mean, worst = compare_draft(large_jpeg, settings)
    # 2600 / 4 = 650 >= 2 * 224 but 2600 / 8 = 325 is not: a 1/4 decode
    assert draft_calls == [("RGB", (875, 650), "RGB")]
    assert mean <= DRAFT_TOLERANCE, (mean, worst)


def test_draft_is_skipped_when_the_image_is_not_large_enough(draft_calls):
    data = encode(textured(600, 440, seed=12), "JPEG", quality=90)
    mean, worst = compare_draft(data, PreprocessSettings(224, 224, jpeg_decoder="pillow"))
    assert draft_calls == [] and (mean, worst) == (0.0, 0)


def test_draft_respects_exif_orientation(draft_calls):
    upright = textured(2400, 1600, seed=13)
    rotated = corpus.rotated_jpeg(upright, 6, quality=90)  # stored as 1600x2400
    # Upright, 1600 / 2 >= 2 * 300 allows only a 1/2 decode; judging the
    # stored 1600x2400 against the 300x100 target would wrongly allow 1/4.
    settings = PreprocessSettings(300, 100)
    pixels, width, height = decode_and_resize(rotated, settings, LIMITS)
    assert (width, height) == (2400, 1600)
    assert draft_calls[0][1] == (800, 1200)  # in stored orientation
    assert compare_draft(rotated, settings)[0] <= DRAFT_TOLERANCE
    reference, *_ = decode_and_resize(encode(upright, "JPEG", quality=90), PreprocessSettings(
        300, 100, reduced_jpeg_decode=False), LIMITS)
    assert mean_abs_diff(pixels, reference) < 3


@pytest.mark.parametrize("mode", ["CMYK", "L"])
def test_draft_keeps_cmyk_and_grayscale_modes(draft_calls, mode):
    data = encode(textured(1600, 1200, seed=14).convert(mode), "JPEG", quality=90)
    mean, worst = compare_draft(data, PreprocessSettings(128, 128, jpeg_decoder="pillow"))
    assert draft_calls[0][0] == draft_calls[0][2] == mode
    assert draft_calls[0][1] == (400, 300)
    assert mean <= DRAFT_TOLERANCE, (mean, worst)


@pytest.mark.skipif(not IMAGENET.is_dir(), reason=f"needs the shared photo sample at {IMAGENET}")
def test_draft_on_real_photos(tmp_path, draft_calls):
    photos = sorted(IMAGENET.glob("*.JPEG"))[:40:10]
    assert photos, f"no *.JPEG in {IMAGENET}"
    settings = PreprocessSettings(224, 224, jpeg_decoder="pillow")
    for photo in photos:
        small = photo.read_bytes()
        assert compare_draft(small, settings) == (0.0, 0)  # about 500x375: no draft
        with Image.open(photo) as im:
            im = im.convert("RGB")
            scale = 3500 / max(im.size)
            big = im.resize((round(im.width * scale), round(im.height * scale)),
                            Image.Resampling.BICUBIC)
        mean, worst = compare_draft(encode(big, "JPEG", quality=90), settings)
        assert mean <= DRAFT_TOLERANCE, (photo.name, mean, worst)
    assert len(draft_calls) == len(photos)


# --- libjpeg-turbo (simplejpeg) for plain JPEGs ------------------------------------

TURBO, PILLOW = PreprocessSettings(1, 1), PreprocessSettings(1, 1, jpeg_decoder="pillow")
# Mean abs levels between the two JPEG paths; measured on the ImageNet sample
# (benchmarks/decode_speed.py): 0.28 at 224, 1.47 at 96, the worst photo 4.1.
TURBO_TOLERANCE = {224: 0.6, 96: 2.0}
TURBO_WORST_PHOTO = 6.0


def at(settings: PreprocessSettings, size: int, **kw) -> PreprocessSettings:
    return dataclasses.replace(settings, height=size, width=size, **kw)


@pytest.fixture
def turbo_calls(monkeypatch):
    """(min_width, min_height) of each simplejpeg decode, and what it gave."""
    calls = []
    real = decode.simplejpeg.decode_jpeg

    def spy(data, **kw):
        result = real(data, **kw)
        calls.append(((kw["min_width"], kw["min_height"]), result.shape))
        return result
    monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", spy)
    return calls


def test_settings_choose_the_jpeg_decoder():
    assert PreprocessSettings(8, 8).jpeg_decoder == "simplejpeg"
    assert "simplejpeg" in PreprocessSettings(8, 8).to_metadata()["jpeg_decoder"]
    assert PreprocessSettings(8, 8, jpeg_decoder="pillow").to_metadata()["jpeg_decoder"] == \
        "pillow"
    with pytest.raises(ValueError, match="jpeg_decoder"):
        PreprocessSettings(8, 8, jpeg_decoder="opencv")


@pytest.mark.parametrize("size", [224, 96])
@pytest.mark.parametrize("resize_mode", ["stretch", "center_crop"])
def test_turbo_stays_close_to_pillow_on_a_generated_photo(turbo_calls, size, resize_mode):
    data = encode(textured(1600, 1200, seed=21), "JPEG", quality=90)
    fast, *fast_size = decode_and_resize(data, at(TURBO, size, resize_mode=resize_mode), LIMITS)
    slow, *slow_size = decode_and_resize(data, at(PILLOW, size, resize_mode=resize_mode),
                                         LIMITS)
    assert fast_size == slow_size == [1600, 1200]
    assert len(turbo_calls) == 1
    (min_w, min_h), shape = turbo_calls[0]
    # the smallest M/8 scale leaving 1.5 source pixels per output pixel
    assert shape[0] >= min_h and shape[1] >= min_w and shape[0] < 1200
    assert mean_abs_diff(fast, slow) <= TURBO_TOLERANCE[size]


@needs_shared
@pytest.mark.parametrize("size", [224, 96])
def test_turbo_stays_close_to_pillow_on_real_photos(size):
    diffs = []
    for photo in sorted(IMAGENET.glob("*.JPEG"))[::5]:
        data = photo.read_bytes()
        fast = decode_and_resize(data, at(TURBO, size), LIMITS)[0]
        slow = decode_and_resize(data, at(PILLOW, size), LIMITS)[0]
        diffs.append(mean_abs_diff(fast, slow))
    assert np.mean(diffs) <= TURBO_TOLERANCE[size], np.mean(diffs)
    assert max(diffs) <= TURBO_WORST_PHOTO, max(diffs)


def test_turbo_leaves_other_images_to_pillow(corpus_dir, turbo_calls):
    directory, _ = corpus_dir
    settings = at(TURBO, 16)
    for name in ("exif-orientation-6.jpg", "cmyk.jpg", "stereo.mpo", "good.png"):
        fast = decode_file(directory / name, settings)[0]
        assert np.array_equal(fast, decode_file(directory / name, at(PILLOW, 16))[0]), name
    assert turbo_calls == []
    for name in ("good.jpg", "gray.jpg", "progressive.jpg"):
        decode_file(directory / name, settings)
    assert len(turbo_calls) == 3
    decode_file(directory / "good.jpg", dataclasses.replace(settings, reduced_jpeg_decode=False))
    assert len(turbo_calls) == 3  # a full decode is Pillow's


def test_turbo_gives_damaged_jpegs_to_pillow():
    # Junk between markers, damaged scan data: libjpeg-turbo warns ("Corrupt
    # JPEG data"), simplejpeg raises on the warning, and Pillow, which decodes
    # such files, decides. A file cut short still fails as truncated.
    data = encode(photo_like(64, 48, seed=22), "JPEG", quality=90)
    flipped = bytearray(data)
    sos = data.index(b"\xff\xda")
    flipped[sos + 40] ^= 0x55
    for damaged in (data[:20] + b"\x00\x00" + data[20:], bytes(flipped)):
        with pytest.raises(ValueError, match="Corrupt JPEG data"):
            decode.simplejpeg.decode_jpeg(damaged, strict=True)
        fast = decode_and_resize(damaged, at(TURBO, 32), LIMITS)[0]
        assert np.array_equal(fast, decode_and_resize(damaged, at(PILLOW, 32), LIMITS)[0])
    e = error_of(decode_and_resize, data[: len(data) * 2 // 3], at(TURBO, 32), LIMITS)
    assert e.error_class == "TruncatedImage"


# --- read_bytes --------------------------------------------------------------

def test_read_errors(tmp_path, corpus_dir):
    directory, _ = corpus_dir
    missing = error_of(read_bytes, str(tmp_path / "nope.jpg"), 100)
    assert (missing.stage, missing.error_class) == ("read", "FileNotFound")
    assert error_of(read_bytes, str(tmp_path), 100).error_class == "IsADirectory"
    assert error_of(read_bytes, str(directory / "good.jpg" / "x"), 100).error_class == \
        "FileNotFound"
    # a device never ends; it must be refused, not read
    assert error_of(read_bytes, "/dev/zero", 100).error_class == "ReadError"


def test_size_limit_is_exact(tmp_path, monkeypatch):
    path = tmp_path / "ten.bin"
    path.write_bytes(b"x" * 10)
    assert read_bytes(str(path), 10) == b"x" * 10
    assert error_of(read_bytes, str(path), 9).error_class == "FileTooLarge"
    # without the stat (as for gs://), the bounded read still refuses it
    monkeypatch.setattr(decode, "_check_local_file", lambda *args: None)
    assert error_of(read_bytes, str(path), 9).error_class == "FileTooLarge"


def test_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "secret.jpg"
    path.write_bytes(b"\xff\xd8\xff")
    with corpus.file_permissions_enforced() as enforced:
        if not (enforced and corpus.make_unreadable(path)):
            pytest.skip("cannot make a file unreadable for this process")
        e = error_of(read_bytes, str(path), 100)
    assert (e.stage, e.error_class) == ("read", "PermissionDenied")


def test_odd_names_read_fine_and_nothing_is_decompressed(tmp_path, corpus_dir):
    directory, _ = corpus_dir
    good = (directory / "good.jpg").read_bytes()
    for name in ("name with spaces.jpg", "ünïcödé 写真.jpg", "hash#1.jpg"):
        assert read_bytes(str(directory / name), CORPUS_MAX_BYTES) == good, name
    # Beam would gunzip a *.gz by default; the stage must see the raw bytes
    packed = gzip.compress(good)
    (tmp_path / "photo.jpg.gz").write_bytes(packed)
    assert read_bytes(str(tmp_path / "photo.jpg.gz"), CORPUS_MAX_BYTES) == packed


def test_unknown_scheme_is_a_read_error_without_credentials():
    e = error_of(read_bytes, "nosuch://alice:hunter2@host/a.jpg?token=abc123", 100)
    assert (e.stage, e.error_class) == ("read", "ReadError")
    assert "hunter2" not in e.message and "abc123" not in e.message


def test_redact():
    assert redact("https://alice:hunter2@example.com/a.jpg") == \
        "https://<redacted>@example.com/a.jpg"
    assert redact("https://x.example/a.jpg?width=3&X-Goog-Signature=abc&api_key=k#t") == \
        "https://x.example/a.jpg?width=3&X-Goog-Signature=<redacted>&api_key=<redacted>#t"
    assert redact("https://x.example/a?sig=1&access_token=2") == \
        "https://x.example/a?sig=<redacted>&access_token=<redacted>"
    # an @ in the object name is not a password
    assert redact("gs://bucket/users/bob@example.com.jpg") == "gs://bucket/users/bob@example.com.jpg"
    assert redact("/data/hash#1.jpg") == "/data/hash#1.jpg"


def test_local_names_that_look_like_queries_stay_distinct(tmp_path):
    # A local path has no query: "sig=1" is part of the file's name, and
    # redacting it would make two files one image id.
    first, second = tmp_path / "a?sig=1.jpg", tmp_path / "a?sig=2.jpg"
    first.write_bytes(encode(photo_like(16, 16, seed=1), "JPEG"))
    second.write_bytes(encode(photo_like(16, 16, seed=2), "JPEG"))
    assert redact(str(first)) == str(first) and redact(str(second)) == str(second)
    assert read_bytes(str(first), 10**6) == first.read_bytes()
    assert read_bytes(str(second), 10**6) == second.read_bytes()
    # with a scheme the same text is a query, and its value a secret
    assert redact("https://x.example/a?sig=1.jpg") == "https://x.example/a?sig=<redacted>"


# --- API details ---------------------------------------------------------------

def test_settings_validate_and_describe_themselves():
    metadata = PreprocessSettings(224, 224, alpha_background=[0, 0, 0]).to_metadata()
    assert json.loads(json.dumps(metadata)) == metadata
    assert metadata["color"] == "RGB" and metadata["scale"] == "[0,1]"
    assert metadata["alpha_background"] == [0, 0, 0]
    for bad in ({"height": 0}, {"resize_mode": "fit"}, {"crop_fraction": 0},
                {"alpha_background": (0, 0, 256)}):
        with pytest.raises(ValueError):
            PreprocessSettings(**{"height": 8, "width": 8, **bad})


def test_image_error_survives_pickling():
    e = pickle.loads(pickle.dumps(ImageError("decode", "CorruptImage", "bad")))
    assert (e.stage, e.error_class, e.message) == ("decode", "CorruptImage", "bad")
    with pytest.raises(ValueError):
        ImageError("unpacking", "X", "no such stage")


def test_dofn_turns_unexpected_errors_into_failures(corpus_dir, monkeypatch):
    directory, _ = corpus_dir

    def broken(*args):
        raise RuntimeError("boom at https://alice:hunter2@example.com/x?token=t0k")
    monkeypatch.setattr(decode, "decode_and_resize", broken)
    dofn = ReadDecodeResize(PreprocessSettings(8, 8), LIMITS)
    [out] = list(dofn.process(ImageRef("id", str(directory / "good.jpg"))))
    assert out.tag == ReadDecodeResize.FAILED
    failure = out.value
    assert (failure.stage, failure.error_class) == ("decode", "RuntimeError")
    assert "hunter2" not in failure.message and "t0k" not in failure.message
    assert failure.content_sha256 == hashlib.sha256(
        (directory / "good.jpg").read_bytes()).hexdigest()


def _summary(element) -> tuple:
    if isinstance(element, DecodedImage):
        return ("ok", element.image_id, hashlib.sha256(element.pixels.tobytes()).hexdigest(),
                element.pixels.shape, element.original_width, element.original_height,
                element.content_sha256, element.content_bytes)
    assert isinstance(element, FailedImage) and element.stage in STAGES and element.message
    return ("failed", element.image_id, element.stage, element.error_class)


def test_pipeline_routes_every_image_exactly_once(corpus_dir):
    directory, expected = corpus_dir
    cases = {**expected, **MISSING_FILES}
    refs = [ImageRef(f"id-{i}", str(directory / name)) for i, name in enumerate(sorted(cases))]
    settings = PreprocessSettings(24, 24)
    want, bytes_read = [], 0
    for ref in refs:
        case = cases[Path(ref.uri).name]
        if case.ok:  # decoded alone: bad neighbours must not change a thing
            data = Path(ref.uri).read_bytes()
            pixels, width, height = decode_and_resize(data, settings, LIMITS)
            want.append(_summary(DecodedImage(ref.image_id, ref.uri, pixels, width, height,
                                              hashlib.sha256(data).hexdigest(), len(data))))
        else:
            want.append(("failed", ref.image_id, case.stage, case.error_class))
        if case.stage != "read":
            bytes_read += len(Path(ref.uri).read_bytes())

    pipeline = beam.Pipeline(runner="FnApiRunner")
    outputs = (pipeline
               | beam.Create(refs)
               | beam.ParDo(ReadDecodeResize(settings, LIMITS)).with_outputs(
                   ReadDecodeResize.FAILED, main="decoded"))
    assert_that(outputs.decoded | "KindOfDecoded" >> beam.Map(lambda d: type(d).__name__),
                equal_to(["DecodedImage"] * sum(c.ok for c in cases.values())),
                label="OnlyDecodedOnMain")
    assert_that((outputs.decoded, outputs[ReadDecodeResize.FAILED])
                | beam.Flatten() | beam.Map(_summary), equal_to(want))
    result = pipeline.run()
    result.wait_until_finish()

    counters = {c.key.metric.name: c.committed for c in result.metrics().query(
        MetricsFilter().with_namespace(decode.METRICS_NAMESPACE))["counters"]}
    failures = [c for c in cases.values() if not c.ok]
    assert counters == {
        "images_decoded": len(cases) - len(failures),
        "bytes_read": bytes_read,
        "failed_read": sum(c.stage == "read" for c in failures),
        "failed_decode": sum(c.stage == "decode" for c in failures),
    }


def test_every_bomb_message_cites_our_own_limit(corpus_dir):
    # bomb.png is refused by Pillow at open() (above twice its limit, which
    # we raise to ours), bomb.jpg by our header check: one message for both,
    # citing --max_pixels, never Pillow's doubled figure.
    directory, _ = corpus_dir
    for limits in (DecodeLimits(), DecodeLimits(max_pixels=5_000_000)):
        for name in ("bomb.png", "bomb.jpg"):
            data = (directory / name).read_bytes()
            e = error_of(decode_and_resize, data, PreprocessSettings(224, 224), limits)
            assert e.error_class == "DecompressionBomb", name
            assert f"over the limit of {limits.max_pixels} (--max_pixels)" in e.message, (
                name, e.message)
            assert str(2 * max(limits.max_pixels, 128_000_000)) not in e.message


def test_the_plain_jpeg_fast_path_gives_the_general_paths_pixels(monkeypatch):
    # Plain JPEGs skip Pillow's header parse (decode._plain_jpeg): colour,
    # grayscale, progressive, both resize modes, both sizes, the same pixels
    # as the general path. JPEGs with EXIF or MPF are left to the general one.
    import io
    photos = [photo_like(640, 427, seed=3), photo_like(300, 500, seed=4)]
    blobs = [encode(photos[0], "JPEG", quality=90),
             encode(photos[1], "JPEG", quality=75, progressive=True),
             encode(photos[0].convert("L"), "JPEG", quality=85)]
    assert all(decode._plain_jpeg(b) is not None for b in blobs)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    photos[0].save(buffer, "JPEG", exif=exif.tobytes())
    assert decode._plain_jpeg(buffer.getvalue()) is None
    cases = [decode.PreprocessSettings(s, s, resize_mode=m)
             for s in (224, 96) for m in ("stretch", "center_crop")]
    fast = [decode.decode_and_resize(b, s, decode.DecodeLimits()) for b in blobs for s in cases]
    monkeypatch.setattr(decode, "_plain_jpeg", lambda data: None)
    general = [decode.decode_and_resize(b, s, decode.DecodeLimits()) for b in blobs for s in cases]
    for (a, wa, ha), (b, wb, hb) in zip(fast, general):
        assert (wa, ha) == (wb, hb) and a.flags.c_contiguous and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
