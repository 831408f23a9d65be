"""Write stage: rows -> Parquet part files that appear whole or not at all.

Each writer keeps one part open per bundle, writes a row group every
`rows_per_row_group` rows and commits the part every `rows_per_file` rows
and at the end of the bundle, through the dataset's `PartWriter` (atomic
commit; see transforms/dataset.py, which owns the output folder). It outputs
one `CommittedFile` per part for the report stage, which has the dataset
finalize the run.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from schemas import (ERRORS_SCHEMA, METRICS_NAMESPACE, NUM_CLASSES, TOP_K,
                     DatasetMetadata, Embedding, FailedImage,
                     embeddings_schema, with_metadata)
from transforms.dataset import (CommittedFile, Dataset,
                                PartWriter)
from transforms.uris import redact, redact_text


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
            pa.array([_text(redact_text(r.message)) for r in rows], pa.string()),
            pa.array([r.content_sha256 for r in rows], pa.string()),
            pa.array(times, pa.timestamp("us", tz="UTC")),
        ], schema=self.schema)

    def failure_key(self, row: FailedImage) -> tuple:
        return (row.stage, row.error_class)


def _text(value) -> str:
    return str(value).encode("utf-8", "backslashreplace").decode("utf-8")


# --- the writer -----------------------------------------------------------------

class WriteParquetFiles(beam.DoFn):
    """Records -> committed Parquet files; outputs one CommittedFile per file.

    A row that cannot be converted fails alone: it leaves on the "failed"
    output as a FailedImage of stage "write" and its batch is written
    without it.
    """
    FAILED = "failed"

    def __init__(self, dataset: Dataset, kind: str, run_id: str,
                 rows, metadata: DatasetMetadata, rows_per_file: int = 4096,
                 rows_per_row_group: int = 512):
        self._dataset = dataset
        self._kind = kind
        self._run_id = run_id
        self._rows = rows
        self._metadata = metadata
        self._rows_per_file = rows_per_file
        self._rows_per_group = min(rows_per_row_group, rows_per_file)

    def setup(self):
        self._schema = with_metadata(self._rows.schema, self._metadata)
        self._written = Metrics.counter(METRICS_NAMESPACE,
                                        f"{self._kind}_rows_written")
        self._files = Metrics.counter(METRICS_NAMESPACE,
                                      f"{self._kind}_files_committed")
        self._file: Optional[PartWriter] = None

    def start_bundle(self):
        self._file = None
        self._failures: Counter = Counter()
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
                    self._file = self._dataset.open_part(
                        self._kind, self._run_id, self._schema)
                self._file.write(batch)
                for row in good:
                    key = self._rows.failure_key(row)
                    if key:
                        self._failures[key] += 1
                self._written.inc(len(good))
        if self._file and (final or self._file.rows >= self._rows_per_file):
            path = self._file.commit()
            self._files.inc()
            yield None, CommittedFile(self._kind, path, self._file.rows,
                                      tuple(sorted(self._failures.items())))
            self._file = None
            self._failures = Counter()

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
        if current:
            current.abandon()
