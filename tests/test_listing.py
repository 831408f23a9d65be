"""Listing loses nothing: every glob match and manifest entry ends as an
ImageRef, a FailedImage (stage "list") or a count, and a manifest that
cannot be read at all is one clear ListingError."""
from __future__ import annotations

import os
from pathlib import Path

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that

from corpus import encode, photo_like
from jobs import read_embeddings, read_errors, run_job, summary
from transforms.listing import (DEFAULT_EXTENSIONS, ENTRIES, NOT_IMAGES, ListImages,
                                ListingError, check_inputs, normalize_pattern)

JPEG = encode(photo_like(16, 16), "JPEG")
_COLLECTED: dict = {}


def _store(name, value):
    # Top-level, so the pickled matchers call this module's function (and
    # dict) instead of a copy of it.
    _COLLECTED[name] = value


def listed(patterns, manifest=None, extensions=DEFAULT_EXTENSIONS) -> dict:
    """Run ListImages alone; {"refs": {id: uri}, "failed": {id: error_class},
    "stats": {name: n}}."""
    got = _COLLECTED
    got.clear()

    def keep(name, fn):
        def matcher(actual):
            _store(name, fn(actual))
        return matcher

    with beam.Pipeline(runner="FnApiRunner") as p:  # in this process
        out = p | ListImages([normalize_pattern(x) for x in patterns], manifest, [],
                             extensions)
        assert_that(out["refs"], keep("refs", lambda rs: {r.image_id: r.uri for r in rs}),
                    label="refs")
        assert_that(out[ListImages.FAILED],
                    keep("failed", lambda fs: {f.image_id: f.error_class for f in fs}),
                    label="failed")

        def totals(pairs):
            counts = {}
            for name, n in pairs:
                counts[name] = counts.get(name, 0) + n
            return counts
        assert_that(out[ListImages.STATS], keep("stats", totals), label="stats")
    return dict(got)


def images(folder: Path, n: int, prefix: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{i:03d}.jpg" for i in range(n)]
    for path in paths:
        path.write_bytes(JPEG)
    return paths


# --- symlinks ------------------------------------------------------------------------

def test_symlinked_folders_are_followed(tmp_path):
    real = images(tmp_path / "store" / "photos", 12)
    root = tmp_path / "input"
    images(root, 1, prefix="direct")
    (root / "nested").mkdir()
    os.symlink(tmp_path / "store" / "photos", root / "nested" / "linked")
    os.symlink(tmp_path / "store", root / "store-link")  # a link to a folder of folders
    got = listed([str(root)])
    expected = {str(root / "direct000.jpg")}
    expected |= {str(root / "nested" / "linked" / p.name) for p in real}
    expected |= {str(root / "store-link" / "photos" / p.name) for p in real}
    assert set(got["refs"]) == expected
    assert got["failed"] == {}
    assert got["stats"][ENTRIES] == 25


def test_broken_and_looping_symlinks_are_reported_not_dropped(tmp_path):
    root = tmp_path / "input"
    images(root, 20)
    os.symlink(tmp_path / "gone.jpg", root / "dangling.jpg")
    os.symlink(root / "self.jpg", root / "self.jpg")  # ELOOP
    os.symlink(root / "ping.jpg", root / "pong.jpg")
    os.symlink(root / "pong.jpg", root / "ping.jpg")
    (root / "sub").mkdir()
    os.symlink(root, root / "sub" / "back-up")  # a folder loop
    got = listed([str(root)])
    assert len(got["refs"]) == 20
    assert got["failed"] == {
        str(root / "dangling.jpg"): "BrokenSymlink",
        str(root / "self.jpg"): "SymlinkLoop",
        str(root / "ping.jpg"): "SymlinkLoop",
        str(root / "pong.jpg"): "SymlinkLoop",
        str(root / "sub" / "back-up"): "SymlinkLoop",
    }
    assert got["stats"][ENTRIES] == 25


def test_broken_symlinks_outside_the_extensions_are_only_counted(tmp_path):
    root = tmp_path / "input"
    images(root, 2)
    os.symlink(tmp_path / "gone.txt", root / "notes.txt")
    got = listed([str(root)])
    assert len(got["refs"]) == 2 and got["failed"] == {}
    assert got["stats"][NOT_IMAGES] == 1


def test_a_pattern_matches_through_links_with_beams_glob_rules(tmp_path):
    real = images(tmp_path / "store", 3)
    root = tmp_path / "input"
    (root / "a").mkdir(parents=True)
    os.symlink(tmp_path / "store", root / "a" / "b")
    images(root / "a", 1, prefix="top")
    # "*" stays inside one folder, "**" crosses folders
    one_level = listed([str(root / "a" / "*" / "*.jpg")])
    assert set(one_level["refs"]) == {str(root / "a" / "b" / p.name) for p in real}
    anywhere = listed([str(root / "**.jpg")])
    assert len(anywhere["refs"]) == 4


def test_an_unreadable_folder_is_reported(tmp_path):
    from corpus import file_permissions_enforced
    root = tmp_path / "input"
    images(root, 2)
    images(root / "locked", 3)
    os.chmod(root / "locked", 0)
    try:
        with file_permissions_enforced() as enforced:
            if not enforced:
                pytest.skip("cannot make a folder unreadable for this user")
            got = listed([str(root)])
    finally:
        os.chmod(root / "locked", 0o755)
    assert len(got["refs"]) == 2
    assert got["failed"] == {str(root / "locked"): "PermissionDenied"}


def test_check_inputs_sees_images_behind_links(tmp_path):
    images(tmp_path / "store", 2)
    root = tmp_path / "input"
    root.mkdir()
    os.symlink(tmp_path / "store", root / "linked")
    check_inputs([normalize_pattern(str(root))], None)  # no "matched no files"
    with pytest.raises(ListingError, match="matched no files"):
        check_inputs([normalize_pattern(str(tmp_path / "nothing-*.jpg"))], None)


def test_local_names_with_query_like_text_stay_two_images(tmp_path):
    (tmp_path / "a?sig=1.jpg").write_bytes(JPEG)
    (tmp_path / "a?sig=2.jpg").write_bytes(encode(photo_like(16, 16, seed=3), "JPEG"))
    got = listed([str(tmp_path)])
    assert set(got["refs"]) == {str(tmp_path / "a?sig=1.jpg"), str(tmp_path / "a?sig=2.jpg")}


def test_job_over_symlinked_folders_accounts_for_everything(tmp_path):
    images(tmp_path / "store", 4)
    root = tmp_path / "input"
    images(root, 1)
    os.symlink(tmp_path / "store", root / "linked")
    os.symlink(tmp_path / "gone.jpg", root / "dangling.jpg")
    output = tmp_path / "out"
    code = run_job("--input", root, "--output", output, "--model_source", "random",
                   "--model", "mobilenet_v2_035_96", "--max_failure_rate", "0.5")
    assert code == 0
    assert read_embeddings(output).num_rows == 5
    errors = read_errors(output).to_pylist()
    assert [(e["stage"], e["error_class"]) for e in errors] == [("list", "BrokenSymlink")]
    counts = summary(output)["counts"]
    assert counts["entries_listed"] == 6
    assert summary(output)["accounting"]["ok"] is True


# --- manifests that cannot be read ---------------------------------------------------

def _parquet(path: Path, **columns) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


@pytest.mark.parametrize("column,type_text", [
    (pa.array([1, 2], pa.int64()), "int64"),
    (pa.array([["a.jpg"], ["b.jpg"]], pa.list_(pa.string())), "list<"),
])
def test_parquet_uri_column_of_another_type_is_one_line(tmp_path, column, type_text):
    manifest = _parquet(tmp_path / "m.parquet", uri=column)
    with pytest.raises(ListingError) as info:
        check_inputs([], manifest)
    message = str(info.value)
    assert "'uri'" in message and type_text in message and "\n" not in message


def test_parquet_id_column_of_a_nested_type_is_one_line(tmp_path):
    manifest = _parquet(tmp_path / "m.parquet", uri=pa.array(["a.jpg"]),
                        id=pa.array([{"x": 1}]))
    with pytest.raises(ListingError, match=r"'id'.*struct"):
        check_inputs([], manifest)


@pytest.mark.parametrize("name,content,why", [
    ("list.txt", "photos/a.jpg\nphotos/b.jpg\n".encode("utf-16"), "UTF-16"),
    ("list.csv", "uri\nphotos/é.jpg\n".encode("utf-32"), "UTF-32"),
    ("list.txt", JPEG, "binary"),
    ("list.csv", "uri\n" + "".join(f"fotos/caf\xe9{i}.jpg\n" for i in range(9)),
     "not UTF-8"),
])
def test_manifest_that_is_not_utf8_text_is_one_line(tmp_path, name, content, why):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("latin-1"))
    with pytest.raises(ListingError) as info:
        check_inputs([], str(path))
    assert "not UTF-8 text" in str(info.value) and why in str(info.value)


def test_one_stray_non_utf8_line_still_fails_alone(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"a.jpg\nb.jpg\ncaf\xe9.jpg\nd.jpg\n")
    check_inputs([], str(path))  # the stray name becomes a NonUtf8Path failure


@pytest.mark.parametrize("name", ["list.txt", "list.csv", "list.parquet"])
def test_empty_manifest_is_one_line(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    with pytest.raises(ListingError, match="is empty"):
        check_inputs([], str(path))


def test_directory_as_manifest_is_one_line(tmp_path):
    folder = tmp_path / "manifest.txt"
    folder.mkdir()
    with pytest.raises(ListingError, match="is a folder"):
        check_inputs([], str(folder))


def test_a_file_that_is_not_parquet_is_one_line(tmp_path):
    path = tmp_path / "list.parquet"
    path.write_bytes(b"uri\na.jpg\n")
    with pytest.raises(ListingError, match="not a Parquet file"):
        check_inputs([], str(path))
