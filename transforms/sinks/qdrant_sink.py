"""Qdrant: points written through Beam's own writer
(`apache_beam.ml.rag.ingestion.qdrant`: VectorDatabaseWriteTransform with
QdrantWriteConfig), upserted, so writing the same rows twice adds nothing.

Qdrant point ids must be unsigned integers or UUIDs: each image's id is a
UUID derived from its image_id (`point_uuid`); the payload holds image_id,
uri, label, top5_labels, model and any restricts. The dense vector is named
"dense" (Beam's default) with COSINE distance. The model the vectors came
from is the collection's metadata.

`QdrantTarget(path=...)` is Qdrant's embedded local mode: one process at a
time may open the folder (Qdrant locks it), so a pipeline writing there must
run on one worker (`mobilenet-embed export` does); local mode is meant for
tests and small sets (Qdrant's docs), and is slow (see benchmarks/export.py).
A server (`url=`) takes writes from every worker.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import apache_beam as beam

from transforms.sinks.base import StoreConfig, StoreMismatch, check_recorded, mismatch
from transforms.sinks.records import VectorRecord, point_uuid

VECTOR_NAME = "dense"


class _BeamQdrantHintFilter:
    """Beam's own Qdrant writer annotates expand() with a PTransform where
    Beam expects a PCollection, and Beam logs "This output type hint will be
    ignored" each time it reads it (4 lines per export): this drops exactly
    that line, for the rag writers' types only."""

    def filter(self, record) -> bool:
        text = record.getMessage()
        return not (text.startswith("This output type hint will be ignored")
                    and "apache_beam.ml.rag" in text)


_HINT_FILTER = _BeamQdrantHintFilter()


def quiet_beam_type_hint_warning() -> None:
    import logging
    root = logging.getLogger()
    if _HINT_FILTER not in root.filters:
        root.addFilter(_HINT_FILTER)


@dataclasses.dataclass(frozen=True)
class QdrantTarget:
    """Where: path (embedded local folder), url (a server) or ":memory:"."""
    path: Optional[str] = None
    url: Optional[str] = None
    api_key: Optional[str] = None

    def connection(self):
        from apache_beam.ml.rag.ingestion.qdrant import QdrantConnectionParameters
        if self.path:
            return QdrantConnectionParameters(path=self.path)
        return QdrantConnectionParameters(url=self.url, api_key=self.api_key)

    def client(self):
        from qdrant_client import QdrantClient
        if self.path:
            return QdrantClient(path=self.path)
        return QdrantClient(url=self.url, api_key=self.api_key, check_compatibility=False)


def prepare_collection(target: QdrantTarget, name: str, identity: dict,
                       overwrite: bool = False) -> None:
    """Create the collection (COSINE, the model's dimensions, the identity as
    its metadata); StoreMismatch where it holds another model's vectors."""
    from qdrant_client import models
    client = target.client()
    try:
        dims = int(identity["feature_dim"])
        if client.collection_exists(name):
            info = client.get_collection(name)
            theirs = dict(info.config.metadata or {})
            vectors = info.config.params.vectors
            size = vectors[VECTOR_NAME].size if isinstance(vectors, dict) and \
                VECTOR_NAME in vectors else None
            theirs.setdefault("feature_dim", str(size))
            differing = check_recorded(f"Qdrant collection {name!r}", identity, theirs)
            if not differing:
                return
            if not overwrite:
                raise mismatch(f"Qdrant collection {name!r}", differing)
            client.delete_collection(name)
        client.create_collection(
            name, vectors_config={VECTOR_NAME: models.VectorParams(
                size=dims, distance=models.Distance.COSINE)},
            metadata={k: str(v) for k, v in identity.items()})
    finally:
        client.close()


def to_item(r: VectorRecord):
    from apache_beam.ml.rag.types import Content, EmbeddableItem, Embedding
    payload = {"image_id": r.id, "uri": r.uri, "label": r.label,
               "top5_labels": list(r.top5_labels), "model": r.model}
    for namespace, values in r.restricts:
        payload[namespace] = list(values)
    if r.crowding_tag is not None:
        payload["crowding_tag"] = r.crowding_tag
    return EmbeddableItem(content=Content(image=r.uri), id=point_uuid(r.id),
                          metadata=payload,
                          embedding=Embedding(dense_embedding=[float(v) for v in r.vector]))


class WriteToQdrant(beam.PTransform):
    """VectorRecords -> the Qdrant collection `collection`, through Beam's
    QdrantWriteConfig. The pipeline's first step creates the collection (or
    checks its model: another model's is refused unless overwrite=True)."""

    def __init__(self, target: QdrantTarget, identity: dict,
                 collection: str = "images", overwrite: bool = False,
                 batch_size: int = 1000):
        super().__init__()
        self.target, self.identity, self.collection = target, dict(identity), collection
        self.overwrite, self.batch_size = overwrite, batch_size

    def expand(self, records):
        quiet_beam_type_hint_warning()
        from apache_beam.ml.rag.ingestion.base import VectorDatabaseWriteTransform
        from apache_beam.ml.rag.ingestion.qdrant import QdrantWriteConfig
        target, name, identity, overwrite = (self.target, self.collection,
                                             self.identity, self.overwrite)

        def prepare(_):
            prepare_collection(target, name, identity, overwrite)
            return True

        ready = (records.pipeline | "Start" >> beam.Create([None])
                 | "CreateCollection" >> beam.Map(prepare))
        return (records
                | "ToEmbeddableItems" >> beam.Map(
                    lambda r, _ready: to_item(r), beam.pvalue.AsSingleton(ready))
                | "WriteToQdrant" >> VectorDatabaseWriteTransform(QdrantWriteConfig(
                    connection_params=target.connection(), collection_name=name,
                    batch_size=self.batch_size, dense_embedding_key=VECTOR_NAME)))


class QdrantConfig(StoreConfig):
    """The export's seam for a Qdrant collection (see transforms.sinks.base)."""

    client_module = "qdrant_client"

    def __init__(self, target: QdrantTarget, identity: dict, collection: str = "images",
                 batch_size: int = 1000):
        self.target, self.identity, self.collection = target, dict(identity), collection
        self.batch_size = batch_size

    def prepare(self, overwrite: bool = False) -> None:
        prepare_collection(self.target, self.collection, self.identity, overwrite)

    def create_write_transform(self):
        return WriteToQdrant(self.target, self.identity, self.collection,
                             batch_size=self.batch_size)

    def _call(self, fn):
        client = self.target.client()
        try:
            return fn(client)
        finally:
            client.close()

    def count(self) -> int:
        return self._call(lambda c: c.count(self.collection, exact=True).count)

    def stored_ids(self):
        def scroll(client):
            ids, offset = [], None
            while True:
                points, offset = client.scroll(self.collection, limit=2000, offset=offset,
                                               with_payload=["image_id"], with_vectors=False)
                ids += [p.payload.get("image_id") for p in points]
                if offset is None:
                    return [i for i in ids if i is not None]
        return self._call(scroll)

    def delete_ids(self, ids: list[str]) -> None:
        from qdrant_client import models
        self._call(lambda c: c.delete(self.collection, points_selector=models.PointIdsList(
            points=[point_uuid(i) for i in ids]), wait=True))
