"""The output dataset: the one owner of everything under --output.

    OUT/
      embeddings/part-<run>-<uid>.parquet   one row per embedded image
      errors/part-<run>-<uid>.parquet       one row per image that failed
      _dataset.json                         how the dataset was made (identity)
      run_summary.json                      the last run's accounting
      _lock.json                            held by the run writing it
      _staging/                             files being written (local only)
      _set_aside/                           damaged parts moved out of the way

Everything that reads or writes that folder goes through `Dataset`: the job
(identity, overwrite, resume, lock), the write stage (atomic parts), the
report stage (finalize, summary), `show`, and the search commands (metadata,
streamed reads of a few columns).

The rule it keeps: every image a run listed ends as exactly one row, in
embeddings/ or in errors/, and no image id is in the dataset twice.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import uuid
from typing import Iterable, Iterator, Optional

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import DatasetMetadata, read_metadata
from transforms.uris import is_local, join, redact

LOG = logging.getLogger(__name__)
EMBEDDINGS, ERRORS = "embeddings", "errors"
KINDS = (EMBEDDINGS, ERRORS)


class DatasetError(Exception):
    """The output folder cannot be used as asked; one line for the user."""


@dataclasses.dataclass(frozen=True)
class CommittedFile:
    """A part file a bundle wrote and committed, for the run's summary."""
    kind: str
    path: str
    rows: int
    failures: tuple = ()  # ((stage, error_class), count) pairs, errors only


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An output folder, local or gs://. Small and picklable: workers get it."""
    root: str

    def __post_init__(self):
        root = self.root
        if is_local(root):
            root = os.path.abspath(os.path.expanduser(root))
        else:
            root = root.rstrip("/")
        object.__setattr__(self, "root", root)

    # --- layout -------------------------------------------------------------

    def join(self, *parts: str) -> str:
        return join(self.root, *parts)

    @property
    def shown(self) -> str:
        return redact(self.root)

    @property
    def dataset_json(self) -> str:
        return self.join("_dataset.json")

    @property
    def summary_json(self) -> str:
        return self.join("run_summary.json")

    @property
    def lock_json(self) -> str:
        return self.join("_lock.json")

    @property
    def staging(self) -> str:
        return self.join("_staging")

    def part_path(self, kind: str, run_id: str, uid: str) -> str:
        return self.join(kind, f"part-{run_id}-{uid}.parquet")

    def parts(self, kind: str = EMBEDDINGS) -> list[str]:
        """The committed Parquet files of `kind`, sorted."""
        pattern = self.join(kind, "part-*.parquet")
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # no such folder yet
            return []
        return sorted(m.path for m in found)

    # --- reading ------------------------------------------------------------

    def check_exists(self) -> None:
        """DatasetError unless this is an output folder of this project."""
        if is_local(self.root):
            if not os.path.exists(self.root):
                raise DatasetError(f"{self.shown} does not exist")
            if not os.path.isdir(self.root):
                raise DatasetError(f"{self.shown} is a file, not an output folder")
        if not (FileSystems.exists(self.dataset_json) or self.parts(EMBEDDINGS)
                or self.parts(ERRORS)):
            raise DatasetError(f"{self.shown} is not an output of mobilenet-embed "
                               "(no _dataset.json, no part files)")

    def check_readable(self) -> None:
        """DatasetError unless the folder exists and holds embeddings."""
        self.check_exists()
        if not self.parts(EMBEDDINGS):
            raise DatasetError(f"{self.shown} holds no embeddings "
                               f"({self.join(EMBEDDINGS)} has no part files)")

    def recorded_metadata(self) -> Optional[DatasetMetadata]:
        """How the dataset was made: `_dataset.json`, else the first part's
        metadata; None for a new folder. DatasetError when unreadable."""
        recorded = self.read_json(self.dataset_json)
        if recorded is not None:
            try:
                return DatasetMetadata.from_strings(recorded)
            except (KeyError, TypeError, ValueError) as e:
                raise DatasetError(
                    f"{redact(self.dataset_json)} is malformed ({e!r}); "
                    "delete it to have it rebuilt from the part files, or "
                    "use another --output") from None
        parts = self.parts(EMBEDDINGS)
        return self.part_metadata(parts[0]) if parts else None

    def part_metadata(self, path: str) -> DatasetMetadata:
        try:
            with FileSystems.open(path) as f:
                found = read_metadata(pq.read_schema(f))
        except Exception as e:  # pylint: disable=broad-except
            raise DatasetError(f"{redact(path)} cannot be read: "
                               f"{type(e).__name__}: {_first_line(e)}") from None
        if found is None:
            raise DatasetError(f"{redact(path)} was not written by "
                               "mobilenet-embed (no metadata)")
        return found

    def metadata(self) -> DatasetMetadata:
        """The metadata every embeddings part shares; DatasetError where the
        dataset is empty or its parts were made differently."""
        self.check_readable()
        parts = self.parts(EMBEDDINGS)
        first = self.part_metadata(parts[0])
        for path in parts[1:]:
            differing = first.differences(self.part_metadata(path))
            if differing:
                raise DatasetError(
                    f"{self.shown} mixes models or preprocessing: "
                    f"{redact(path)} differs from {redact(parts[0])} "
                    f"({'; '.join(differing)})")
        return first

    def iter_batches(self, columns: list[str], kind: str = EMBEDDINGS,
                     batch_size: int = 8192) -> Iterator[pa.RecordBatch]:
        """The rows of `kind`, only `columns`, streamed part by part: a
        dataset larger than memory is never loaded whole."""
        for path in self.parts(kind):
            with FileSystems.open(path) as f:
                yield from pq.ParquetFile(f).iter_batches(
                    batch_size=batch_size, columns=columns)

    def num_rows(self, kind: str = EMBEDDINGS) -> int:
        total = 0
        for path in self.parts(kind):
            with FileSystems.open(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total

    def read_summary(self) -> Optional[dict]:
        return self.read_json(self.summary_json)

    # --- a run's life: identity, lock, parts, finalize, summary -------------

    def prepare(self, metadata: DatasetMetadata, overwrite: bool) -> str:
        """Check that rows made with `metadata` can go here; record it.

        Returns "new" or "resume". Refuses to mix models or preprocessing
        unless `overwrite`, which removes the earlier outputs.
        """
        self._check_is_folder()
        recorded = self.recorded_metadata()
        if recorded is not None:
            differing = recorded.differences(metadata)
            if differing and not overwrite:
                raise DatasetError(
                    f"{self.shown} holds embeddings made differently "
                    f"(existing vs now: {'; '.join(differing)}). Use another "
                    "--output, or pass --overwrite to replace them.")
            if differing:
                self._remove_outputs()
                recorded = None
        if recorded is None:
            self.write_json(self.dataset_json, {
                **metadata.to_strings(),
                "created_at": _utc_now()})
            return "new"
        return "resume"

    def _check_is_folder(self) -> None:
        if is_local(self.root) and os.path.exists(self.root) \
                and not os.path.isdir(self.root):
            raise DatasetError(f"--output {self.shown} is a file, not a folder")

    def _remove_outputs(self) -> None:
        LOG.warning("--overwrite: removing the existing outputs in %s", self.shown)
        doomed = self.parts(EMBEDDINGS) + self.parts(ERRORS)
        for path in (self.dataset_json, self.summary_json):
            if FileSystems.exists(path):
                doomed.append(path)
        _delete(doomed)

    def acquire_lock(self, run_id: str) -> None:
        """One run at a time writes a dataset. A lock left by a run that
        died on this machine is taken over; any other is refused."""
        self._check_is_folder()
        FolderLock(self.lock_json, self.shown).acquire(run_id)

    def release_lock(self, run_id: str) -> None:
        FolderLock(self.lock_json, self.shown).release(run_id)

    def remove_stale_staging(self) -> int:
        """Files of runs that died mid-write (only the lock holder calls it)."""
        if not is_local(self.root) or not os.path.isdir(self.staging):
            return 0
        names = os.listdir(self.staging)
        for name in names:
            try:
                os.remove(os.path.join(self.staging, name))
            except OSError:
                pass
        try:
            os.rmdir(self.staging)
        except OSError:
            pass
        return len(names)

    def set_aside_damaged_parts(self) -> list[str]:
        """Move part files whose Parquet footer cannot be read (a truncated
        copy, a full disk) to _set_aside/, so their images are listed again
        and re-embedded. Returns the original paths."""
        moved = []
        for kind in KINDS:
            for path in self.parts(kind):
                try:
                    with FileSystems.open(path) as f:
                        pq.ParquetFile(f).metadata  # pylint: disable=expression-not-assigned
                    continue
                except Exception as e:  # pylint: disable=broad-except
                    reason = f"{type(e).__name__}: {_first_line(e)}"
                target = self.join("_set_aside", kind, path.replace("\\", "/").rsplit("/", 1)[-1])
                if is_local(target):
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                FileSystems.rename([path], [target])
                LOG.warning("%s cannot be read (%s); moved to %s, its images "
                            "will be embedded again", redact(path), reason,
                            redact(target))
                moved.append(path)
        return moved

    def open_part(self, kind: str, run_id: str, schema: pa.Schema) -> "PartWriter":
        return PartWriter(self, kind, run_id, schema)

    def finalize(self, run_id: str, committed: list[CommittedFile],
                 redundant: dict[str, set[str]]) -> dict:
        """Make the dataset exactly what this run's successful bundles wrote.

        Removes files of failed bundle attempts (the runner drops their
        outputs, so they are not in `committed`), rows that are in the dataset
        twice or were superseded (`redundant`: part path -> image ids, from
        the listing stage: a killed run's duplicates, earlier error rows of
        images this run listed again or that are embedded now) and the
        staging area. Error rows of images this run did not list stay.
        """
        kept = {c.path for c in committed}
        orphans = [p for kind in KINDS for p in self.parts(kind)
                   if f"/part-{run_id}-" in p.replace(os.sep, "/")
                   and p not in kept]
        _delete(orphans)
        rewritten = removed = 0
        for path, ids in sorted(redundant.items()):
            if self._drop_rows(path, ids, run_id) is None:
                removed += 1
            else:
                rewritten += 1
        staged = self.remove_stale_staging()
        return {"orphan_files_removed": len(orphans),
                "files_rewritten_without_superseded_rows": rewritten,
                "files_emptied_and_removed": removed,
                "staging_files_removed": staged}

    def _drop_rows(self, path: str, image_ids: set[str], run_id: str
                   ) -> Optional[str]:
        """Rewrite `path` without `image_ids`; delete it if nothing is left."""
        kind = ERRORS if f"/{ERRORS}/" in path.replace(os.sep, "/") else EMBEDDINGS
        with FileSystems.open(path) as f:
            table = pq.read_table(f)
        keep = pa.array([i not in image_ids
                         for i in table.column("image_id").to_pylist()])
        table = table.filter(keep)
        new_path = None
        if table.num_rows:
            out = self.open_part(kind, run_id, table.schema)
            for batch in table.to_batches():
                out.write(batch)
            new_path = out.commit()
        _delete([path])
        return new_path

    def write_summary(self, summary: dict) -> None:
        self.write_json(self.summary_json, summary)

    # --- small JSON files ---------------------------------------------------

    def write_json(self, path: str, payload: dict) -> None:
        write_file_atomically(path, (json.dumps(payload, indent=2) + "\n").encode())

    def read_json(self, path: str, missing_ok: bool = True) -> Optional[dict]:
        try:
            if not FileSystems.exists(path):
                return None
            with FileSystems.open(path) as f:
                value = json.loads(f.read().decode())
        except (OSError, ValueError, UnicodeDecodeError) as e:
            if missing_ok and isinstance(e, FileNotFoundError):
                return None
            raise DatasetError(f"{redact(path)} cannot be read as JSON "
                               f"({type(e).__name__}); delete it or use "
                               "another --output") from None
        if not isinstance(value, dict):
            raise DatasetError(f"{redact(path)} is not a JSON object; delete "
                               "it or use another --output")
        return value


class PartWriter:
    """One Parquet part being written, committed atomically by `commit`:
    locally written under _staging/, fsynced and renamed into place; a GCS
    object only becomes visible when its upload completes. A run killed
    with kill -9 leaves only whole files."""

    def __init__(self, dataset: Dataset, kind: str, run_id: str,
                 schema: pa.Schema):
        uid = uuid.uuid4().hex[:16]
        self.final_path = dataset.part_path(kind, run_id, uid)
        if is_local(dataset.root):
            os.makedirs(dataset.staging, exist_ok=True)
            os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
            self.temp_path = os.path.join(
                dataset.staging, f"{kind}-{run_id}-{uid}.parquet.inprogress")
            self._handle = open(self.temp_path, "wb")
        else:
            self.temp_path = None
            self._handle = FileSystems.create(self.final_path)
        self._writer = pq.ParquetWriter(self._handle, schema,
                                        compression="zstd")
        self.rows = 0

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def commit(self) -> str:
        self._writer.close()
        if self.temp_path:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self.temp_path, self.final_path)
        else:
            self._handle.close()
        return self.final_path

    def abandon(self) -> None:
        """Leave nothing half-written behind (an attempt that failed)."""
        try:
            self._handle.close()
        except Exception:  # pylint: disable=broad-except
            pass
        if self.temp_path:
            try:
                os.remove(self.temp_path)
            except OSError:
                pass


class FolderLock:
    """One writer at a time for a folder (a dataset, an index, an export
    target): `lock_path` is created exclusively (locally O_EXCL, on GCS an
    object with generation 0). A lock left by a process that died on this
    machine is taken over; any other holder is refused with a DatasetError
    saying who holds it and how to clear it."""

    def __init__(self, lock_path: str, shown: str):
        self.lock_path = lock_path
        self.shown = shown

    def acquire(self, run_id: str) -> None:
        record = {"run_id": run_id, "host": socket.gethostname(),
                  "pid": os.getpid(), "started_at": _utc_now()}
        data = (json.dumps(record) + "\n").encode()
        for _ in range(2):
            try:
                if _create_exclusive(self.lock_path, data):
                    return
            except OSError as e:
                raise DatasetError(
                    f"cannot write to {self.shown}: "
                    f"{e.strerror or type(e).__name__}") from None
            holder = self.holder() or {}
            if _is_dead_local_process(holder):
                LOG.warning("taking over the lock of run %s (process %s on "
                            "this machine has ended)", holder.get("run_id"),
                            holder.get("pid"))
                _delete([self.lock_path])
                continue
            raise DatasetError(
                f"{self.shown} is being written by another run "
                f"({holder.get('run_id', '?')}, process {holder.get('pid', '?')} "
                f"on {holder.get('host', '?')}, since "
                f"{holder.get('started_at', '?')}). Wait for it to end, or, if "
                f"no run is active, delete {redact(self.lock_path)}")
        raise DatasetError(f"could not take the lock {redact(self.lock_path)}")

    def holder(self) -> Optional[dict]:
        """The lock's record, or None where there is none (or it is unreadable)."""
        try:
            with FileSystems.open(self.lock_path) as f:
                return json.loads(f.read().decode("utf-8"))
        except Exception:  # absent, half-written or not JSON: no holder to name
            return None

    def release(self, run_id: str) -> None:
        holder = self.holder()
        if holder and holder.get("run_id") == run_id:
            _delete([self.lock_path])

    def __repr__(self) -> str:
        return f"FolderLock({redact(self.lock_path)})"


# --- helpers ---------------------------------------------------------------------

def write_file_atomically(path: str, data: bytes) -> None:
    """A whole file or none: locally a temp file, fsynced, renamed into
    place; on GCS an object appears only when its upload completes."""
    if not is_local(path):
        with FileSystems.create(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def _create_exclusive(path: str, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; False if it did."""
    if is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    if path.startswith("gs://"):
        return _gcs_create_exclusive(path, data)
    # Other filesystems have no create-if-absent: best effort.
    if FileSystems.exists(path):
        return False
    with FileSystems.create(path) as f:
        f.write(data)
    return True


def _gcs_create_exclusive(path: str, data: bytes) -> bool:
    """A GCS object created only where none exists (generation 0)."""
    from google.api_core import exceptions
    from google.cloud import storage

    bucket, _, name = path[len("gs://"):].partition("/")
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials
        client = storage.Client(project="emulator",
                                credentials=AnonymousCredentials())
    else:
        client = storage.Client()
    blob = client.bucket(bucket).blob(name)
    try:
        blob.upload_from_string(data, content_type="application/json",
                                if_generation_match=0)
    except exceptions.PreconditionFailed:
        return False
    return True


def _is_dead_local_process(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        pid = int(holder.get("pid"))
    except (TypeError, ValueError):
        return False
    return pid != os.getpid() and not psutil.pid_exists(pid)


def _delete(paths: Iterable[str]) -> None:
    paths = list(paths)
    if paths:
        FileSystems.delete(paths)


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else ""
