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
import errno
import functools
import io
import os
import posixpath
import re
import stat
from typing import Iterable, Iterator, Optional, Union

import apache_beam as beam
from apache_beam.io.filesystem import FileMetadata, FileSystem
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from schemas import METRICS_NAMESPACE, FailedImage, ImageRef
from transforms.dataset import EMBEDDINGS, ERRORS
from transforms.uris import is_local, redact

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "jpe", "mpo", "png", "gif", "bmp", "webp",
                      "tif", "tiff", "ppm", "pgm", "pbm", "heic", "heif", "avif")
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
            if is_local(pattern):  # the same walk the job does: through links
                found = next((m for m in _match_local(pattern)
                              if isinstance(m, FileMetadata)), None)
            else:
                found = FileSystems.match([pattern], limits=[1])[0].metadata_list
        except Exception as e:
            raise ListingError(f"cannot list --input {redact(pattern)}: "
                               f"{type(e).__name__}") from e
        if not found:
            raise ListingError(f"--input {redact(pattern)} matched no files")
    if manifest:
        manifest_format(manifest)
        shown = redact(manifest)
        if not FileSystems.exists(manifest):
            raise ListingError(f"--manifest {shown} does not exist")
        if is_local(manifest) and os.path.isdir(manifest):
            raise ListingError(f"--manifest {shown} is a folder; give a file listing "
                               "the images (for a folder of images, use --input)")
        found = FileSystems.match([manifest])[0].metadata_list
        if found and found[0].size_in_bytes == 0:
            raise ListingError(f"--manifest {shown} is empty (0 bytes)")
        with FileSystems.open(manifest) as f:
            for _ in _read_manifest(f, manifest):
                return
        raise ListingError(f"--manifest {shown} lists no images")


def first_uris(patterns: list[str], manifest: Optional[str],
               extensions: Optional[tuple[str, ...]], limit: int) -> list[str]:
    """Up to `limit` URIs the job would list, in listing order (patterns,
    then the manifest), without duplicates: a sample drawn in the launcher
    (the int8 calibration). What cannot be listed is skipped here; the job
    itself reports it."""
    found: list[str] = []

    def add(uri: str) -> bool:
        if uri not in found:
            found.append(uri)
        return len(found) >= limit

    for pattern in patterns:
        try:
            matches = (_match_local(pattern) if is_local(pattern) else
                       FileSystems.match([pattern])[0].metadata_list)
            for match in matches:
                if not isinstance(match, FileMetadata):
                    continue
                if extensions is not None and _extension(match.path) not in extensions:
                    continue
                if add(match.path):
                    return found
        except Exception:  # pylint: disable=broad-except
            continue
    if manifest:
        try:
            with FileSystems.open(manifest) as f:
                for _, entry in _read_manifest(f, manifest):
                    if entry and add(_resolve(entry, manifest)):
                        return found
        except Exception:  # pylint: disable=broad-except
            pass
    return found


# --- local globs --------------------------------------------------------------

def _match_local(pattern: str) -> Iterator[Union[FileMetadata, tuple[FailedImage, bool]]]:
    """Beam's glob rules (`*` within a folder, `**` across folders, the
    regex of FileSystem.translate_pattern), over a walk that follows
    symbolic links, where Beam's os.walk does not: a linked folder is
    listed, a link that points nowhere or round in a circle is a
    FailedImage, and so is a folder that cannot be read. Beam drops all
    three without a count. Failures come as (FailedImage, whether it is a
    link that may have named a file rather than a folder).

    A linked folder is not entered when it is one of its own ancestors
    (the walk would never end); everything else is followed, so a folder
    reached through two links is listed under both paths.
    """
    if not os.path.isabs(pattern):  # normalize_pattern's job; never walk from /
        pattern = os.path.join(os.getcwd(), pattern)
    regex = re.compile(FileSystem.translate_pattern(pattern))
    prefix = re.match(r"^[^[*?]*", pattern).group(0)
    if prefix == pattern:  # no glob: one path
        entry = _local_entry(pattern, regex)
        if entry is not None:
            yield entry
        return
    root = prefix if prefix.endswith("/") else os.path.dirname(prefix) or "/"
    root = root.rstrip("/") or "/"
    try:
        root_stat = os.stat(root)
    except OSError:
        return  # nothing there: check_inputs says "matched no files"
    if not stat.S_ISDIR(root_stat.st_mode):
        return
    parts = pattern.split("/")
    stack = [(root, frozenset([(root_stat.st_dev, root_stat.st_ino)]))]
    while stack:
        folder, ancestors = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if folder != root or not isinstance(e, FileNotFoundError):
                yield _list_failure(folder, e, "folder"), False
            continue
        subfolders = []
        for entry in entries:
            path = os.path.join(folder, entry.name)
            try:
                st = entry.stat()  # follows links
            except OSError as e:
                if entry.is_symlink() and regex.match(path):
                    yield _list_failure(path, e, "symbolic link"), True
                continue
            if stat.S_ISDIR(st.st_mode):
                if not _may_contain_matches(parts, path):
                    continue
                key = (st.st_dev, st.st_ino)
                if key in ancestors:
                    yield FailedImage(path, path, "list", "SymlinkLoop",
                                      f"{path} links back to {os.path.realpath(path)}, "
                                      "a folder that contains it; not followed"), False
                    continue
                subfolders.append((path, ancestors | {key}))
            elif stat.S_ISREG(st.st_mode) and regex.match(path):
                yield FileMetadata(path, st.st_size, st.st_mtime)
        stack.extend(reversed(subfolders))


def _local_entry(path: str, regex) -> Optional[Union[FileMetadata, tuple[FailedImage, bool]]]:
    try:
        st = os.stat(path)
    except OSError as e:
        return (_list_failure(path, e, "symbolic link"), True) if os.path.islink(path) else None
    if stat.S_ISREG(st.st_mode) and regex.match(path):
        return FileMetadata(path, st.st_size, st.st_mtime)
    return None


def _list_failure(path: str, e: OSError, what: str) -> FailedImage:
    if e.errno == errno.ELOOP:
        return FailedImage(path, path, "list", "SymlinkLoop",
                           f"{path} is a {what} that leads round in a circle")
    if isinstance(e, FileNotFoundError) and what == "symbolic link":
        return FailedImage(path, path, "list", "BrokenSymlink",
                           f"{path} is a symbolic link to {os.readlink(path)}, "
                           "which does not exist")
    if isinstance(e, PermissionError):
        return FailedImage(path, path, "list", "PermissionDenied",
                           f"{path}: {what}: permission denied")
    return FailedImage(path, path, "list", "ListError",
                       f"{path}: {what}: {e.strerror or type(e).__name__}")


def _may_contain_matches(parts: list[str], folder: str) -> bool:
    """Whether a path under `folder` can match the pattern split in `parts`,
    so folders no match can lie in are not walked."""
    names = folder.split("/")
    for depth, name in enumerate(names):
        part = parts[depth] if depth < len(parts) else ""
        if "**" in part:
            return True
        if depth >= len(parts) - 1:  # the pattern's last part names files
            return False
        if not _part_regex(part).match(name):
            return False
    return True


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


@functools.lru_cache(maxsize=256)
def _part_regex(part: str):
    return re.compile(FileSystem.translate_pattern(part))


class _MatchPatterns(beam.DoFn):
    """pattern -> FileMetadata per file; local patterns through
    _match_local, others (gs://, which has no links) through Beam. What
    cannot be listed leaves on FAILED, counted as an entry; a broken link
    whose name has none of the extensions is counted as not an image."""
    def __init__(self, extensions: Optional[tuple[str, ...]]):
        self._extensions = extensions

    def process(self, pattern: str):
        if not is_local(pattern):
            for result in FileSystems.match([pattern]):
                yield from result.metadata_list
            return
        for found in _match_local(pattern):
            if isinstance(found, FileMetadata):
                yield found
                continue
            failure, is_link = found
            if (is_link and self._extensions is not None
                    and _extension(failure.uri) not in self._extensions):
                yield beam.pvalue.TaggedOutput(ListImages.STATS, (NOT_IMAGES, 1))
                continue
            yield beam.pvalue.TaggedOutput(ListImages.STATS, (ENTRIES, 1))
            yield beam.pvalue.TaggedOutput(ListImages.FAILED, failure)


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
    """(id or None, uri) per entry; blank lines and '#' comments skipped.
    A file that is no manifest at all raises ListingError (one line)."""
    fmt = manifest_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq
        try:
            table = pq.ParquetFile(f)
        except Exception as e:  # pyarrow's ArrowInvalid, with a long text
            raise ListingError(f"manifest {redact(path)} is not a Parquet file "
                               f"({type(e).__name__})") from None
        schema = table.schema_arrow
        names = schema.names
        uri_col = _pick(names, _URI_COLUMNS, path)
        id_col = next((c for c in _ID_COLUMNS if c in names), None)
        _check_column_type(path, uri_col, schema.field(uri_col).type, ids=False)
        if id_col:
            _check_column_type(path, id_col, schema.field(id_col).type, ids=True)
        columns = [uri_col] + ([id_col] if id_col else [])
        for batch in table.iter_batches(columns=columns, batch_size=65536):
            uris = batch.column(0).to_pylist()
            ids = batch.column(1).to_pylist() if id_col else [None] * len(uris)
            for image_id, uri in zip(ids, uris):
                yield (None if image_id is None else str(image_id)), uri or ""
        return
    head = f.read(_TEXT_CHECK_BYTES)
    if not head:
        raise ListingError(f"manifest {redact(path)} is empty (0 bytes)")
    problem = _not_utf8_text(head)
    if problem:
        raise ListingError(f"manifest {redact(path)} is not UTF-8 text: {problem}")
    # surrogateescape: a stray non-UTF-8 entry fails alone (see _emit), not
    # the whole manifest.
    text = io.TextIOWrapper(io.BufferedReader(_Prefixed(head, f)), encoding="utf-8-sig",
                            errors="surrogateescape", newline="")
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


_TEXT_CHECK_BYTES = 64 * 1024
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
              (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _not_utf8_text(head: bytes) -> Optional[str]:
    """Why the start of a text manifest is not UTF-8 text, or None. One
    stray non-UTF-8 line is allowed (it fails alone); a file most of whose
    lines are not UTF-8 is another encoding or no text at all."""
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return f"it is {name}; save it as UTF-8"
    if b"\x00" in head:
        return ("it holds NUL bytes: binary data, or UTF-16/UTF-32 without a "
                "byte-order mark")
    lines = [line for line in head.split(b"\n")[:-1] or [head] if line.strip()]
    bad = 0
    for line in lines:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            bad += 1
    if lines and bad * 2 > len(lines):
        return (f"{bad} of its first {len(lines)} lines are not valid UTF-8 "
                "(Latin-1 or Windows-1252?); save it as UTF-8")
    return None


class _Prefixed(io.RawIOBase):
    """Bytes already read from the start of `rest`, then the rest of it."""
    def __init__(self, head: bytes, rest):
        self._head, self._rest = head, rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._rest.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


def _check_column_type(path: str, column: str, arrow_type, ids: bool) -> None:
    import pyarrow as pa
    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    ok = (pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)
          or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(arrow_type))
          or (ids and pa.types.is_integer(arrow_type)))
    if not ok:
        wanted = "strings or integers" if ids else "strings (paths or URIs)"
        raise ListingError(f"manifest {redact(path)}: column {column!r} has type "
                           f"{arrow_type}; it must hold {wanted}")


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
        if self._extensions is not None and _extension(path) not in self._extensions:
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
            matched = (p
                       | "Patterns" >> beam.Create(self._patterns)
                       | "Match" >> beam.ParDo(_MatchPatterns(self._extensions))
                       .with_outputs(self.STATS, self.FAILED, main="files"))
            globbed = (matched.files
                       | "KeepImages" >> beam.ParDo(
                           _GlobToRefs(self._extensions)).with_outputs(
                               self.STATS, self.FAILED, main="refs"))
            listed.append(globbed.refs)
            stats += [matched[self.STATS], globbed[self.STATS]]
            failed += [matched[self.FAILED], globbed[self.FAILED]]
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
