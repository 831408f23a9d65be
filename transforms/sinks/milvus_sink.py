"""Milvus: rows written through Beam's own writer
(`apache_beam.ml.rag.ingestion.milvus_search`: VectorDatabaseWriteTransform
with MilvusVectorWriterConfig and this project's column specs), upserted by
primary key `id` (the image_id), so writing the same rows twice adds nothing.

The collection: id VARCHAR primary key, vector FLOAT_VECTOR(d) with a
COSINE AUTOINDEX, uri, label, model, top5_labels (JSON) and any restricts;
the model the vectors came from is the collection's properties. `uri` is a
server ("http://host:19530") or a Milvus Lite file ("x.db"): Milvus Lite runs
one server per file, so a pipeline writing there runs on one worker
(`mobilenet-embed export` does).
"""
from __future__ import annotations

import json
from typing import Iterable

import apache_beam as beam

from transforms.sinks.base import StoreConfig, StoreMismatch, check_recorded, mismatch
from transforms.sinks.records import VectorRecord, identity_json

PROPERTY = "mobilenet_embed.identity"
MAX_ID, MAX_TEXT = 1024, 8192


def import_pymilvus():
    """pymilvus runs logging.config.dictConfig at import, which shuts down
    every handler the process has (absl's among them, which then closes the
    stream it was made with: a test runner's captured stderr, for one).
    Import it without that clearing; its own loggers then write through the
    root logger, to stderr as it is when they write."""
    import logging
    import logging.config
    import sys
    if "pymilvus" in sys.modules:
        return
    clear = logging.config._clearExistingHandlers  # pylint: disable=protected-access
    logging.config._clearExistingHandlers = lambda: None  # pylint: disable=protected-access
    try:
        import pymilvus  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    finally:
        logging.config._clearExistingHandlers = clear  # pylint: disable=protected-access
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.bulk_writer"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


def prepare_collection(uri: str, name: str, identity: dict, restricts: Iterable[str] = (),
                       overwrite: bool = False, token: str = "") -> None:
    import_pymilvus()
    from pymilvus import DataType, MilvusClient
    client = MilvusClient(uri=uri, token=token)
    try:
        if client.has_collection(name):
            info = client.describe_collection(name)
            try:
                theirs = json.loads((info.get("properties") or {}).get(PROPERTY, "{}"))
            except ValueError:
                theirs = {}
            differing = check_recorded(f"Milvus collection {name!r}", identity, theirs)
            if not differing:
                return
            if not overwrite:
                raise mismatch(f"Milvus collection {name!r}", differing)
            client.drop_collection(name)
        schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(identity["feature_dim"]))
        schema.add_field("uri", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("label", DataType.VARCHAR, max_length=MAX_TEXT)
        schema.add_field("model", DataType.VARCHAR, max_length=256)
        schema.add_field("top5_labels", DataType.JSON)
        for column in restricts:
            schema.add_field(column, DataType.VARCHAR, max_length=MAX_TEXT)
        index = client.prepare_index_params()
        index.add_index("vector", metric_type="COSINE", index_type="AUTOINDEX")
        client.create_collection(name, schema=schema, index_params=index,
                                 properties={PROPERTY: identity_json(identity)})
    finally:
        client.close()


def to_item(r: VectorRecord):
    from apache_beam.ml.rag.types import Content, EmbeddableItem, Embedding
    metadata = {"label": r.label, "model": r.model, "top5_labels": list(r.top5_labels)}
    for namespace, values in r.restricts:
        metadata[namespace] = ",".join(str(v) for v in values)
    return EmbeddableItem(content=Content(image=r.uri), id=r.id, metadata=metadata,
                          embedding=Embedding(dense_embedding=[float(v) for v in r.vector]))


def column_specs(restricts: Iterable[str] = ()):
    """How an EmbeddableItem fills this collection's fields (Beam's ColumnSpec)."""
    from apache_beam.ml.rag.ingestion.postgres_common import ColumnSpec
    specs = [ColumnSpec("id", str, lambda it: it.id),
             ColumnSpec("vector", list, lambda it: list(it.dense_embedding)),
             ColumnSpec("uri", str, lambda it: it.content_string),
             ColumnSpec("label", str, lambda it: it.metadata["label"]),
             ColumnSpec("model", str, lambda it: it.metadata["model"]),
             ColumnSpec("top5_labels", list, lambda it: it.metadata["top5_labels"])]
    for column in restricts:
        specs.append(ColumnSpec(column, str,
                                lambda it, c=column: it.metadata.get(c, "")))
    return specs


class WriteToMilvus(beam.PTransform):
    """VectorRecords -> the Milvus collection `collection` at `uri`, through
    Beam's MilvusVectorWriterConfig. The pipeline's first step creates the
    collection (or checks its model: another model's is refused unless
    overwrite=True)."""

    def __init__(self, uri: str, identity: dict, collection: str = "images",
                 restricts: Iterable[str] = (), overwrite: bool = False,
                 token: str = "", batch_size: int = 1000):
        super().__init__()
        self.uri, self.identity, self.collection = uri, dict(identity), collection
        self.restricts, self.overwrite, self.token = tuple(restricts), overwrite, token
        self.batch_size = batch_size

    def expand(self, records):
        import_pymilvus()
        from apache_beam.ml.rag.ingestion.base import VectorDatabaseWriteTransform
        from apache_beam.ml.rag.ingestion.jdbc_common import WriteConfig
        from apache_beam.ml.rag.ingestion.milvus_search import (MilvusVectorWriterConfig,
                                                                MilvusWriteConfig)
        from apache_beam.ml.rag.utils import MilvusConnectionParameters
        uri, name, identity = self.uri, self.collection, self.identity
        restricts, overwrite, token = self.restricts, self.overwrite, self.token

        def prepare(_):
            prepare_collection(uri, name, identity, restricts, overwrite, token)
            return True

        ready = (records.pipeline | "Start" >> beam.Create([None])
                 | "CreateCollection" >> beam.Map(prepare))
        connection = (MilvusConnectionParameters(uri=uri, token=token) if token
                      else MilvusConnectionParameters(uri=uri))
        return (records
                | "ToEmbeddableItems" >> beam.Map(
                    lambda r, _ready: to_item(r), beam.pvalue.AsSingleton(ready))
                | "WriteToMilvus" >> VectorDatabaseWriteTransform(MilvusVectorWriterConfig(
                    connection_params=connection,
                    write_config=MilvusWriteConfig(
                        collection_name=name,
                        write_config=WriteConfig(write_batch_size=self.batch_size)),
                    column_specs=column_specs(restricts))))


class MilvusConfig(StoreConfig):
    """The export's seam for a Milvus collection (see transforms.sinks.base)."""

    def __init__(self, uri: str, identity: dict, collection: str = "images",
                 restricts: Iterable[str] = (), token: str = "", batch_size: int = 1000):
        self.uri, self.identity, self.collection = uri, dict(identity), collection
        self.restricts, self.token, self.batch_size = tuple(restricts), token, batch_size

    def check_client(self) -> None:
        import_pymilvus()

    def prepare(self, overwrite: bool = False) -> None:
        prepare_collection(self.uri, self.collection, self.identity, self.restricts,
                           overwrite, self.token)

    def create_write_transform(self):
        return WriteToMilvus(self.uri, self.identity, self.collection, self.restricts,
                             token=self.token, batch_size=self.batch_size)

    def _call(self, fn):
        import_pymilvus()
        from pymilvus import MilvusClient
        client = MilvusClient(uri=self.uri, token=self.token)
        try:
            return fn(client)
        finally:
            client.close()

    def count(self) -> int:
        def count(client):
            client.flush(self.collection)
            return int(client.query(self.collection, filter="",
                                    output_fields=["count(*)"])[0]["count(*)"])
        return self._call(count)

    def stored_ids(self):
        def ids(client):
            client.flush(self.collection)
            found = []
            it = client.query_iterator(self.collection, batch_size=2000, filter='id != ""',
                                       output_fields=["id"])
            try:
                while True:
                    rows = it.next()
                    if not rows:
                        return found
                    found += [r["id"] for r in rows]
            finally:
                it.close()
        return self._call(ids)

    def delete_ids(self, ids: list[str]) -> None:
        self._call(lambda c: c.delete(self.collection, ids=list(ids)))
