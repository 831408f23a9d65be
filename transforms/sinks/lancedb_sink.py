"""LanceDB: a Lance table of the vectors (FixedSizeList<float32> `vector`,
`id`, `uri`, top-1 `label`, `top5_labels`, `model`), the model it came from
in the table's schema metadata, optionally an IVF_PQ index (cosine).

`uri` is whatever `lancedb.connect` takes: a local folder (embedded), s3://,
gs://. Rows are upserted by id (`merge_insert`), so writing the same rows
twice adds nothing and a grown dataset adds only its new rows.
"""
from __future__ import annotations

import json
import logging
import random
import time
from typing import Iterable

import apache_beam as beam
import numpy as np
import pyarrow as pa

from transforms.sinks.base import StoreConfig, StoreMismatch, check_recorded, mismatch
from transforms.sinks.records import identity_json

LOG = logging.getLogger(__name__)
META_IDENTITY = b"mobilenet_embed.identity"
MIN_INDEX_ROWS = 256  # IVF_PQ trains 256 centroids per sub-vector


def lance_schema(identity: dict, restricts: Iterable[str] = (),
                 crowding: bool = False) -> pa.Schema:
    dims = int(identity["feature_dim"])
    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("uri", pa.string()),
              pa.field("vector", pa.list_(pa.float32(), dims)),
              pa.field("label", pa.string()),
              pa.field("top5_labels", pa.list_(pa.string())),
              pa.field("model", pa.string())]
    fields += [pa.field(name, pa.string()) for name in restricts]
    if crowding:
        fields.append(pa.field("crowding_tag", pa.string()))
    return pa.schema(fields, metadata={
        META_IDENTITY: identity_json(identity).encode(),
        b"dims": str(dims).encode(), b"model": identity["model"].encode()})


def to_arrow(records: list, schema: pa.Schema) -> pa.Table:
    dims = schema.field("vector").type.list_size
    vectors = np.stack([np.asarray(r.vector, np.float32) for r in records]) \
        if records else np.zeros((0, dims), np.float32)
    columns = {
        "id": pa.array([r.id for r in records], pa.string()),
        "uri": pa.array([r.uri for r in records], pa.string()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dims),
        "label": pa.array([r.label for r in records], pa.string()),
        "top5_labels": pa.array([list(r.top5_labels) for r in records],
                                pa.list_(pa.string())),
        "model": pa.array([r.model for r in records], pa.string())}
    for name in schema.names[6:]:
        if name == "crowding_tag":
            columns[name] = pa.array([r.crowding_tag for r in records], pa.string())
        else:
            columns[name] = pa.array([",".join(map(str, dict(r.restricts).get(name, ())))
                                      for r in records], pa.string())
    return pa.table(columns, schema=schema)


def recorded_identity(table) -> dict:
    metadata = table.schema.metadata or {}
    try:
        return json.loads(metadata.get(META_IDENTITY, b"{}"))
    except ValueError:
        return {}


def open_table(uri: str, name: str, identity: dict, restricts=(), crowding=False,
               overwrite: bool = False):
    """The table, created when absent; StoreMismatch where it holds another
    model's vectors (replaced with overwrite=True)."""
    import lancedb
    db = lancedb.connect(uri)
    schema = lance_schema(identity, restricts, crowding)
    if name in db.table_names():
        table = db.open_table(name)
        theirs = recorded_identity(table)
        differing = check_recorded(f"LanceDB table {name!r} at {uri}", identity, theirs)
        if not differing and table.schema.remove_metadata() != schema.remove_metadata():
            differing = ["columns " + ", ".join(table.schema.names) + " vs "
                         + ", ".join(schema.names)]
        if not differing:
            return table
        if not overwrite:
            raise mismatch(f"LanceDB table {name!r} at {uri}", differing)
        db.drop_table(name)
    try:
        return db.create_table(name, schema=schema)
    except (ValueError, OSError):  # created meanwhile by another writer
        return db.open_table(name)


def is_conflict(error: Exception) -> bool:
    text = str(error).lower()
    return "conflict" in text or "retryable" in text or "concurrent" in text


class _MergeBatch(beam.DoFn):
    def __init__(self, uri, name, schema):
        self._uri, self._name, self._schema = uri, name, schema
        self._table = None

    def setup(self):
        import lancedb
        self._table = lancedb.connect(self._uri).open_table(self._name)

    def process(self, batch, new_table):
        data = to_arrow(list(batch), self._schema)
        for attempt in range(20):
            try:
                if new_table:  # bulk append: no row exists to match
                    self._table.add(data)
                else:
                    (self._table.merge_insert("id").when_matched_update_all()
                     .when_not_matched_insert_all().execute(data))
                break
            except Exception as e:  # pylint: disable=broad-except
                if not is_conflict(e) or attempt == 19:
                    raise
                time.sleep(random.uniform(0.05, 0.3) * (attempt + 1))
                self._table.checkout_latest()
        yield len(batch)


def build_index(uri: str, name: str, rows: int) -> str:
    """IVF_PQ on the vectors (cosine), sized by the rows; skipped below
    MIN_INDEX_ROWS rows (a flat search is exact and fast there)."""
    import lancedb
    table = lancedb.connect(uri).open_table(name)
    rows = table.count_rows()
    if rows < MIN_INDEX_ROWS:
        LOG.warning("LanceDB: %d rows, fewer than %d: no IVF_PQ index (flat "
                    "search is exact)", rows, MIN_INDEX_ROWS)
        return "none"
    dims = table.schema.field("vector").type.list_size
    sub = next(s for s in (dims // 16, dims // 8, dims // 4, dims // 2, dims, 1)
               if s >= 1 and dims % s == 0)
    partitions = max(1, min(4096, int(np.sqrt(rows)), rows // MIN_INDEX_ROWS))
    table.create_index(metric="cosine", num_partitions=partitions,
                       num_sub_vectors=sub, vector_column_name="vector",
                       index_type="IVF_PQ", replace=True)
    return f"IVF_PQ(num_partitions={partitions}, num_sub_vectors={sub})"


class WriteToLanceDB(beam.PTransform):
    """VectorRecords -> the LanceDB table `table` at `uri`, upserted by id.

    `identity` is `store_identity(metadata)`: a table holding another model's
    vectors is refused (replaced with overwrite=True). The table is created
    by the pipeline's first step; batches are merged in parallel (Lance
    retries commits that conflict). index=True builds an IVF_PQ index at the
    end. Returns a PCollection of the rows written (one count)."""

    def __init__(self, uri: str, identity: dict, table: str = "images",
                 restricts: Iterable[str] = (), crowding: bool = False,
                 index: bool = False, overwrite: bool = False,
                 batch_size: int = 2000):
        super().__init__()
        self.uri, self.table, self.identity = uri, table, dict(identity)
        self.restricts, self.crowding = tuple(restricts), crowding
        self.index, self.overwrite, self.batch_size = index, overwrite, batch_size

    def expand(self, records):
        uri, name, identity = self.uri, self.table, self.identity
        restricts, crowding, overwrite = self.restricts, self.crowding, self.overwrite
        schema = lance_schema(identity, restricts, crowding)

        def prepare(_):  # True where the table is empty: append, no upsert
            return open_table(uri, name, identity, restricts, crowding,
                              overwrite).count_rows() == 0

        ready = (records.pipeline | "Start" >> beam.Create([None])
                 | "CreateTable" >> beam.Map(prepare))
        written = (records
                   | "Batch" >> beam.BatchElements(min_batch_size=min(100, self.batch_size),
                                                   max_batch_size=self.batch_size)
                   | "MergeInsert" >> beam.ParDo(_MergeBatch(uri, name, schema),  # appends if new
                                                 beam.pvalue.AsSingleton(ready))
                   | "Rows" >> beam.CombineGlobally(sum))
        if self.index:
            written | "Index" >> beam.Map(lambda rows: build_index(uri, name, rows))
        return written


class LanceDBConfig(StoreConfig):
    """The export's seam for a LanceDB table (see transforms.sinks.base)."""

    client_module = "lancedb"

    def __init__(self, uri: str, identity: dict, table: str = "images",
                 restricts: Iterable[str] = (), crowding: bool = False,
                 index: bool = False, batch_size: int = 2000):
        self.uri, self.identity, self.table = uri, dict(identity), table
        self.restricts, self.crowding, self.index = tuple(restricts), crowding, index
        self.batch_size = batch_size
        self.overwrite = False

    def _open(self):
        import lancedb
        return lancedb.connect(self.uri).open_table(self.table)

    def prepare(self, overwrite: bool = False) -> None:
        self.overwrite = overwrite
        open_table(self.uri, self.table, self.identity, self.restricts, self.crowding,
                   overwrite)

    def create_write_transform(self):
        # prepared already: the pipeline's own check sees the same table
        return WriteToLanceDB(self.uri, self.identity, self.table, self.restricts,
                              self.crowding, index=self.index, overwrite=False,
                              batch_size=self.batch_size)

    def count(self) -> int:
        return self._open().count_rows()

    def stored_ids(self):
        table = self._open()
        rows = table.count_rows()
        if rows == 0:
            return []
        return table.search().select(["id"]).limit(rows).to_arrow().column("id").to_pylist()

    def delete_ids(self, ids: list[str]) -> None:
        quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
        self._open().delete(f"id IN ({quoted})")
