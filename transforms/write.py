"""Write stage: rows -> Parquet files that appear whole or not at all.

Layout under --output (local path or gs://):
  embeddings/part-<run>-<uid>.parquet   one row per embedded image
  errors/part-<run>-<uid>.parquet       one row per image that failed
  _dataset.json                         what the dataset was made with
  run_summary.json                      the last run's accounting
  _staging/                             files being written (local only)

Each writer keeps one file open per bundle, writes a row group every
`rows_per_row_group` rows and commits the file every `rows_per_file` rows
and at the end of the bundle. Committing is atomic: a local file is written
under _staging/, fsynced and renamed into place; a GCS object only becomes
visible when its upload completes. A run killed with kill -9 therefore leaves
only whole files that readers can use and the next run resumes from.

Files committed by a bundle attempt that later failed are removed by
`finalize_outputs` (the runner drops that attempt's outputs, so they are not
in the list of committed files it receives), as Beam's own file sinks do.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import uuid
from collections import Counter
from typing import Iterable, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from schemas import (ERRORS_SCHEMA, NUM_CLASSES, TOP_K, Embedding, FailedImage,
                     embeddings_schema)
from transforms.uris import is_local, redact

LOG = logging.getLogger(__name__)
NAMESPACE = "mobilenet_embed"
EMBEDDINGS, ERRORS = "embeddings", "errors"



@dataclasses.dataclass(frozen=True)
class OutputLayout:
    root: str

    def join(self, *parts: str) -> str:
        if is_local(self.root):
            return os.path.join(os.path.abspath(self.root), *parts)
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def dataset_json(self) -> str:
        return self.join("_dataset.json")

    @property
    def summary_json(self) -> str:
        return self.join("run_summary.json")

    @property
    def staging(self) -> str:
        return self.join("_staging")

    def part(self, kind: str, run_id: str, uid: str) -> str:
        return self.join(kind, f"part-{run_id}-{uid}.parquet")

    def parts(self, kind: str) -> list[str]:
        """The committed Parquet files of `kind`, sorted."""
        pattern = self.join(kind, "part-*.parquet")
        try:
            found = FileSystems.match([pattern])[0].metadata_list
        except Exception:  # no such directory yet
            return []
        return sorted(m.path for m in found)


@dataclasses.dataclass(frozen=True)
class CommittedFile:
    kind: str
    path: str
    rows: int
    failures: tuple = ()  # ((stage, error_class), count) pairs, errors only


# --- rows to Arrow --------------------------------------------------------------

def _fixed_list(matrix: np.ndarray, dtype) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(matrix, dtype=dtype).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, matrix.shape[1])


class EmbeddingRows:
    """Embedding records -> record batches of embeddings_schema."""

    def __init__(self, model: str, feature_dim: int, labels: tuple[str, ...]):
        self.model = model
        self.schema = embeddings_schema(feature_dim)
        self._labels = np.array(labels, dtype=object)

    def to_batch(self, rows: list[Embedding], times: list[int]) -> pa.RecordBatch:
        n = len(rows)
        top_ids = np.stack([r.top_class_ids for r in rows]).astype(np.int32)
        label_matrix = self._labels[top_ids]
        columns = [
            pa.array([r.image_id for r in rows], pa.string()),
            pa.array([redact(r.uri) for r in rows], pa.string()),
            pa.array([self.model] * n, pa.string()),
            _fixed_list(np.stack([r.logits for r in rows]), np.float32),
            _fixed_list(np.stack([r.feature_vector for r in rows]), np.float32),
            _fixed_list(top_ids, np.int32),
            pa.FixedSizeListArray.from_arrays(
                pa.array(label_matrix.ravel().tolist(), pa.string()), TOP_K),
            _fixed_list(np.stack([r.top_probabilities for r in rows]),
                        np.float32),
            pa.array([r.original_width for r in rows], pa.int32()),
            pa.array([r.original_height for r in rows], pa.int32()),
            pa.array([r.content_sha256 for r in rows], pa.string()),
            pa.array([r.content_bytes for r in rows], pa.int64()),
            pa.array(times, pa.timestamp("us", tz="UTC")),
        ]
        assert columns[3].type.list_size == NUM_CLASSES
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def failure_key(self, row) -> Optional[tuple]:
        return None


class ErrorRows:
    """FailedImage records -> record batches of ERRORS_SCHEMA."""
    schema = ERRORS_SCHEMA

    def to_batch(self, rows: list[FailedImage], times: list[int]) -> pa.RecordBatch:
        # Error rows must always be writable: any text goes in as valid UTF-8.
        return pa.RecordBatch.from_arrays([
            pa.array([_text(r.image_id) for r in rows], pa.string()),
            pa.array([_text(redact(r.uri)) for r in rows], pa.string()),
            pa.array([r.stage for r in rows], pa.string()),
            pa.array([_text(r.error_class) for r in rows], pa.string()),
            pa.array([_text(r.message) for r in rows], pa.string()),
            pa.array([r.content_sha256 for r in rows], pa.string()),
            pa.array(times, pa.timestamp("us", tz="UTC")),
        ], schema=self.schema)

    def failure_key(self, row: FailedImage) -> tuple:
        return (row.stage, row.error_class)


def _text(value) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


# --- the writer -----------------------------------------------------------------

class _OpenFile:
    """One Parquet file being written, committed atomically by `commit`."""

    def __init__(self, layout: OutputLayout, kind: str, run_id: str,
                 schema: pa.Schema):
        uid = uuid.uuid4().hex[:16]
        self.final_path = layout.part(kind, run_id, uid)
        if is_local(layout.root):
            os.makedirs(layout.staging, exist_ok=True)
            os.makedirs(os.path.dirname(self.final_path), exist_ok=True)
            self.temp_path = os.path.join(
                layout.staging, f"{kind}-{run_id}-{uid}.parquet.inprogress")
            self._handle = open(self.temp_path, "wb")
        else:
            self.temp_path = None  # a GCS object appears only when complete
            self._handle = FileSystems.create(self.final_path)
        self._writer = pq.ParquetWriter(self._handle, schema,
                                        compression="zstd")
        self.rows = 0
        self.failures: Counter = Counter()

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


class WriteParquetFiles(beam.DoFn):
    """Records -> committed Parquet files; outputs one CommittedFile per file.

    A row that cannot be converted fails alone: it leaves on the "failed"
    output as a FailedImage of stage "write" and its batch is written
    without it.
    """
    FAILED = "failed"

    def __init__(self, layout: OutputLayout, kind: str, run_id: str,
                 rows, metadata: dict, rows_per_file: int = 4096,
                 rows_per_row_group: int = 512):
        self._layout = layout
        self._kind = kind
        self._run_id = run_id
        self._rows = rows
        self._metadata = metadata
        self._rows_per_file = rows_per_file
        self._rows_per_group = min(rows_per_row_group, rows_per_file)

    def setup(self):
        from schemas import with_metadata
        self._schema = with_metadata(self._rows.schema, self._metadata)
        self._written = Metrics.counter(NAMESPACE, f"{self._kind}_rows_written")
        self._files = Metrics.counter(NAMESPACE, f"{self._kind}_files_committed")

    def start_bundle(self):
        self._file: Optional[_OpenFile] = None
        self._buffer: list = []
        self._times: list[int] = []

    def process(self, row):
        self._buffer.append(row)
        self._times.append(int(time.time() * 1e6))
        if len(self._buffer) >= self._rows_per_group:
            for tag, value in self._flush():
                yield value if tag is None else beam.pvalue.TaggedOutput(tag, value)

    def finish_bundle(self):
        for tag, value in self._flush(final=True):
            windowed = WindowedValue(value, GlobalWindow().max_timestamp(),
                                     [GlobalWindow()])
            yield windowed if tag is None else beam.pvalue.TaggedOutput(tag, windowed)

    def _flush(self, final: bool = False):
        """Write the buffer; commit the file when full or at the bundle's end.

        Yields (tag, value): (None, CommittedFile) or (FAILED, FailedImage).
        """
        if self._buffer:
            batch, good, failed = self._convert(self._buffer, self._times)
            self._buffer, self._times = [], []
            for failure in failed:
                yield self.FAILED, failure
            if good:
                if self._file is None:
                    self._file = _OpenFile(self._layout, self._kind,
                                           self._run_id, self._schema)
                self._file.write(batch)
                for row in good:
                    key = self._rows.failure_key(row)
                    if key:
                        self._file.failures[key] += 1
                self._written.inc(len(good))
        if self._file and (final or self._file.rows >= self._rows_per_file):
            path = self._file.commit()
            self._files.inc()
            yield None, CommittedFile(self._kind, path, self._file.rows,
                                      tuple(sorted(self._file.failures.items())))
            self._file = None

    def _convert(self, rows: list, times: list[int]):
        """(record batch, rows in it, FailedImages of rows that cannot be)."""
        try:
            return self._rows.to_batch(rows, times), rows, []
        except Exception:  # find the guilty rows; the others are written
            good, good_times, failed = [], [], []
            for row, stamp in zip(rows, times):
                try:
                    self._rows.to_batch([row], [stamp])
                    good.append(row)
                    good_times.append(stamp)
                except Exception as e:  # pylint: disable=broad-except
                    failed.append(FailedImage(
                        _text(row.image_id), _text(row.uri), "write",
                        type(e).__name__, _text(e)[:300],
                        getattr(row, "content_sha256", None)))
            batch = self._rows.to_batch(good, good_times) if good else None
            return batch, good, failed

    def teardown(self):
        # An abandoned attempt: leave nothing half-written in _staging/.
        current = getattr(self, "_file", None)
        if current and current.temp_path:
            try:
                os.remove(current.temp_path)
            except OSError:
                pass


# --- after the last file ----------------------------------------------------------

def _delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def drop_rows(path: str, image_ids: set[str], layout: OutputLayout,
              run_id: str) -> Optional[str]:
    """Rewrite `path` without `image_ids`; delete it if nothing is left."""
    with FileSystems.open(path) as f:
        table = pq.read_table(f)
    keep = pa.array([i not in image_ids for i in table.column("image_id").to_pylist()])
    table = table.filter(keep)
    new_path = None
    if table.num_rows:
        out = _OpenFile(layout, EMBEDDINGS, run_id, table.schema)
        for batch in table.to_batches():
            out.write(batch)
        new_path = out.commit()
    _delete([path])
    return new_path


def finalize_outputs(layout: OutputLayout, run_id: str,
                     committed: list[CommittedFile],
                     redundant: dict[str, set[str]]) -> dict:
    """Make the dataset exactly what this run's successful bundles wrote.

    Removes files of failed bundle attempts, rows that a killed earlier run
    left twice, the error files of earlier runs (every image they list was
    listed and retried by this run) and the staging area. Returns what was
    done, for the summary.
    """
    kept = {c.path for c in committed}
    orphans = [p for kind in (EMBEDDINGS, ERRORS) for p in layout.parts(kind)
               if f"/part-{run_id}-" in p.replace(os.sep, "/")
               and p not in kept]
    _delete(orphans)
    rewritten = [drop_rows(path, ids, layout, run_id)
                 for path, ids in sorted(redundant.items())]
    old_errors = [p for p in layout.parts(ERRORS)
                  if f"/part-{run_id}-" not in p.replace(os.sep, "/")]
    _delete(old_errors)
    if is_local(layout.root) and os.path.isdir(layout.staging):
        for name in os.listdir(layout.staging):
            if f"-{run_id}-" in name:
                os.remove(os.path.join(layout.staging, name))
        if not os.listdir(layout.staging):
            os.rmdir(layout.staging)
    return {"orphan_files_removed": len(orphans),
            "files_rewritten_without_duplicates": len(rewritten),
            "previous_error_files_removed": len(old_errors)}


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temp file then rename where local)."""
    data = (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode()
    if is_local(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(temp, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    else:
        with FileSystems.create(path, mime_type="application/json") as f:
            f.write(data)


def read_json(path: str) -> Optional[dict]:
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode())
