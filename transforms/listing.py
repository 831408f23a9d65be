"""Listing stage: globs and manifests -> one ImageRef per image to embed.

Inputs are listed on the workers (Beam's MatchAll, a manifest read in a
DoFn), then joined by image_id with the ids already in the output dataset
(its embeddings and its error rows). That one shuffle does four jobs: it
drops duplicate entries (embedded once, counted), skips images a previous
run already embedded (resume), names the earlier rows this run supersedes
(an image in the dataset twice after a killed run; the error row of an
image listed again or embedded since), and redistributes the work so a
million files spread over every worker.

Counts leave on the "stats" output as (name, n) pairs for the run summary.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
from typing import Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import METRICS_NAMESPACE, FailedImage, ImageRef
from transforms.dataset import EMBEDDINGS, ERRORS
from transforms.uris import is_local, redact

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "jpe", "mpo", "png", "gif", "bmp", "webp",
                      "tif", "tiff", "ppm", "pgm", "pbm")
_URI_COLUMNS = ("uri", "path", "url", "file")
_ID_COLUMNS = ("image_id", "id", "key")

# Names of the counts on the "stats" output.
ENTRIES = "entries_listed"  # glob matches and manifest rows, before dedupe
DUPLICATES = "duplicates_dropped"  # extra entries with an id seen already
SKIPPED_EXISTING = "skipped_already_embedded"  # resume
NOT_IMAGES = "skipped_not_image_extension"  # glob matches filtered out
TO_EMBED = "images_to_embed"
COUNTS = (ENTRIES, DUPLICATES, SKIPPED_EXISTING, NOT_IMAGES, TO_EMBED)


class ListingError(ValueError):
    """The inputs cannot be listed at all (reported before the job starts)."""



def normalize_pattern(pattern: str) -> str:
    """A directory means every file under it; local paths become absolute."""
    if is_local(pattern):
        pattern = os.path.abspath(os.path.expanduser(pattern)) + (
            "/" if pattern.endswith("/") else "")
        if os.path.isdir(pattern):
            return pattern.rstrip("/") + "/**"
        return pattern
    if pattern.endswith("/"):
        return pattern + "**"
    return pattern


def manifest_format(path: str) -> str:
    ext = path.rsplit(".", 1)[-1].lower() if "." in path else ""
    if ext in ("txt", "lst", "list", ""):
        return "txt"
    if ext in ("csv", "parquet"):
        return ext
    raise ListingError(
        f"manifest {path!r}: unknown format .{ext}; use a text file (one URI "
        "a line), a CSV or a Parquet file with a 'uri' column and an optional "
        "'id' column")


def check_inputs(patterns: list[str], manifest: Optional[str]) -> None:
    """Fail fast, before any worker starts, where nothing could be listed."""
    if not patterns and not manifest:
        raise ListingError("nothing to embed: pass --input and/or --manifest")
    for pattern in patterns:
        try:
            found = FileSystems.match([pattern], limits=[1])[0].metadata_list
        except Exception as e:
            raise ListingError(f"cannot list --input {redact(pattern)}: "
                               f"{type(e).__name__}") from e
        if not found:
            raise ListingError(f"--input {redact(pattern)} matched no files")
    if manifest:
        manifest_format(manifest)
        if not FileSystems.exists(manifest):
            raise ListingError(f"--manifest {redact(manifest)} does not exist")
        with FileSystems.open(manifest) as f:
            for _ in _read_manifest(f, manifest):
                return
        raise ListingError(f"--manifest {redact(manifest)} lists no images")


def _resolve(entry: str, manifest: str) -> str:
    """Relative manifest entries are relative to the manifest's folder."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    if is_local(manifest):
        return os.path.normpath(os.path.join(
            os.path.dirname(os.path.abspath(manifest)), entry))
    scheme, rest = manifest.rsplit("/", 1)[0].split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, entry))}"


def _read_manifest(f, path: str) -> Iterable[tuple[Optional[str], str]]:
    """(id or None, uri) per entry; blank lines and '#' comments skipped."""
    fmt = manifest_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        table = pq.ParquetFile(f)
        names = table.schema_arrow.names
        uri_col = _pick(names, _URI_COLUMNS, path)
        id_col = next((c for c in _ID_COLUMNS if c in names), None)
        columns = [uri_col] + ([id_col] if id_col else [])
        for batch in table.iter_batches(columns=columns, batch_size=65536):
            uris = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_col else [None] * len(uris)
            for image_id, uri in zip(ids, uris):
                yield (None if image_id is None else str(image_id)), uri or ""
        return
    # surrogateescape: a stray non-UTF-8 entry fails alone (see _ref), not the
    # whole manifest.
    text = io.TextIOWrapper(f, encoding="utf-8-sig", errors="surrogateescape",
                            newline="")
    if fmt == "txt":
        for line in text:
            line = line.strip()
            if line and not line.startswith("#"):
                yield None, line
        return
    reader = csv.DictReader(text)
    uri_col = _pick(reader.fieldnames or [], _URI_COLUMNS, path)
    id_col = next((c for c in _ID_COLUMNS if c in (reader.fieldnames or [])),
                  None)
    for row in reader:
        image_id = (row.get(id_col) or "").strip() if id_col else ""
        yield image_id or None, (row.get(uri_col) or "").strip()


def _pick(names, wanted, path) -> str:
    for name in wanted:
        if name in names:
            return name
    raise ListingError(f"manifest {path}: no URI column; expected one of "
                       f"{', '.join(wanted)}, found {', '.join(names) or 'none'}")


class _ReadManifest(beam.DoFn):
    def process(self, path: str):
        with FileSystems.open(path) as f:
            for number, (image_id, entry) in enumerate(
                    _read_manifest(f, path), start=1):
                if not entry:
                    yield beam.pvalue.TaggedOutput(ListImages.STATS,
                                                   (ENTRIES, 1))
                    yield beam.pvalue.TaggedOutput(ListImages.FAILED, FailedImage(
                        image_id or f"{path}#entry{number}", "", "list",
                        "EmptyUri", f"manifest entry {number} has no URI"))
                    continue
                yield from _emit(_resolve(entry, path), image_id)


class _GlobToRefs(beam.DoFn):
    def __init__(self, extensions: Optional[tuple[str, ...]]):
        self._extensions = extensions

    def process(self, metadata):
        path = metadata.path
        ext = path.rsplit(".", 1)[-1].lower() if "." in path.rsplit("/", 1)[-1] else ""
        if self._extensions is not None and ext not in self._extensions:
            yield beam.pvalue.TaggedOutput(ListImages.STATS, (NOT_IMAGES, 1))
            return
        yield from _emit(path)


def _emit(uri: str, image_id: Optional[str] = None):
    """The ImageRef of a listed URI, or why it cannot be one.

    Without a manifest id the id is the URI, with any credentials in it
    redacted: ids end up in files and logs.
    """
    try:
        uri.encode("utf-8")
        (image_id or "").encode("utf-8")
    except UnicodeEncodeError:
        # Parquet strings are UTF-8: a name that is not cannot be a key.
        shown = uri.encode("utf-8", "backslashreplace").decode()
        yield beam.pvalue.TaggedOutput(ListImages.STATS, (ENTRIES, 1))
        yield beam.pvalue.TaggedOutput(ListImages.FAILED, FailedImage(
            (image_id or uri).encode("utf-8", "backslashreplace").decode(),
            redact(shown), "list", "NonUtf8Path",
            f"{redact(shown)} is not valid UTF-8; rename it to embed it"))
        return
    yield ImageRef(image_id or redact(uri), uri)


class _ReadExistingIds(beam.DoFn):
    """(image_id, (kind, file)) for every row of an existing part file."""
    def process(self, part: tuple[str, str]):
        import pyarrow.parquet as pq
        kind, path = part
        with FileSystems.open(path) as f:
            column = pq.read_table(f, columns=["image_id"]).column(0)
        for image_id in column.to_pylist():
            yield image_id, (kind, path)


class _Resolve(beam.DoFn):
    """One image_id's listed entries and existing rows -> what to do."""
    def __init__(self):
        self._listed = Metrics.counter(METRICS_NAMESPACE, "images_listed")

    def process(self, element):
        image_id, grouped = element
        entries = list(grouped["listed"])
        uris = sorted({r.uri for r in entries})
        existing = sorted(set(grouped["existing"]))
        embedded_in = [path for kind, path in existing if kind == EMBEDDINGS]
        failed_in = [path for kind, path in existing if kind == ERRORS]
        if entries:
            yield beam.pvalue.TaggedOutput(ListImages.STATS,
                                           (ENTRIES, len(entries)))
            if len(entries) > len(uris):  # the same image listed again
                yield beam.pvalue.TaggedOutput(
                    ListImages.STATS, (DUPLICATES, len(entries) - len(uris)))
        # The same image in several embeddings files: a retried bundle of a
        # killed run. Keep the first; the finalizer drops the others.
        for path in embedded_in[1:]:
            yield beam.pvalue.TaggedOutput(ListImages.REDUNDANT, (path, image_id))
        # An earlier error row is superseded once the image is embedded or
        # listed again (it is retried now and gets a new row either way).
        # Error rows of images this run does not list stay: one per image.
        superseded = failed_in if (embedded_in or uris) else failed_in[:-1]
        for path in superseded:  # parts sort by run: the last is the latest
            yield beam.pvalue.TaggedOutput(ListImages.REDUNDANT, (path, image_id))
        if not uris:
            return
        # Same id, different URIs: the first (sorted) is embedded; the others
        # cannot be, or the id would stop being a key.
        for other in uris[1:]:
            yield beam.pvalue.TaggedOutput(ListImages.FAILED, FailedImage(
                image_id, other, "list", "DuplicateImageId",
                f"image_id {image_id!r} is also given to {redact(uris[0])}"))
        if embedded_in:
            yield beam.pvalue.TaggedOutput(ListImages.STATS,
                                           (SKIPPED_EXISTING, 1))
            return
        self._listed.inc()
        yield beam.pvalue.TaggedOutput(ListImages.STATS, (TO_EMBED, 1))
        yield ImageRef(image_id, uris[0])


class ListImages(beam.PTransform):
    """PBegin -> ImageRef (main), FailedImage ("failed"), (name, n) ("stats"),
    (file, image_id) rows to drop from existing files ("redundant").

    `existing_parts`: (kind, path) of the part files already in the output,
    kind "embeddings" or "errors"."""
    FAILED, STATS, REDUNDANT = "failed", "stats", "redundant"

    def __init__(self, patterns: list[str], manifest: Optional[str],
                 existing_parts: list[tuple[str, str]],
                 extensions: Optional[tuple[str, ...]] = DEFAULT_EXTENSIONS):
        super().__init__()
        self._patterns = patterns
        self._manifest = manifest
        self._existing = existing_parts
        self._extensions = extensions

    def expand(self, pbegin):
        p = pbegin.pipeline
        listed, failed, stats = [], [], []
        if self._patterns:
            from apache_beam.io import fileio
            globbed = (p
                       | "Patterns" >> beam.Create(self._patterns)
                       | "Match" >> fileio.MatchAll()
                       | "KeepImages" >> beam.ParDo(
                           _GlobToRefs(self._extensions)).with_outputs(
                               self.STATS, self.FAILED, main="refs"))
            listed.append(globbed.refs)
            stats.append(globbed[self.STATS])
            failed.append(globbed[self.FAILED])
        if self._manifest:
            from_manifest = (p
                             | "Manifest" >> beam.Create([self._manifest])
                             | "ReadManifest" >> beam.ParDo(
                                 _ReadManifest()).with_outputs(
                                     self.FAILED, self.STATS, main="refs"))
            listed.append(from_manifest.refs)
            failed.append(from_manifest[self.FAILED])
            stats.append(from_manifest[self.STATS])
        refs = (listed | "AllListed" >> beam.Flatten()
                | "KeyById" >> beam.Map(lambda r: (r.image_id, r)))
        existing = (p
                    | "ExistingParts" >> beam.Create(self._existing)
                    | "ExistingIds" >> beam.ParDo(_ReadExistingIds()))
        resolved = ({"listed": refs, "existing": existing}
                    | "JoinById" >> beam.CoGroupByKey()
                    | "Resolve" >> beam.ParDo(_Resolve()).with_outputs(
                        self.FAILED, self.STATS, self.REDUNDANT, main="refs"))
        failed.append(resolved[self.FAILED])
        stats.append(resolved[self.STATS])
        return {
            "refs": resolved.refs,
            self.FAILED: failed | "ListFailures" >> beam.Flatten(),
            self.STATS: stats | "ListStats" >> beam.Flatten(),
            self.REDUNDANT: resolved[self.REDUNDANT],
        }
