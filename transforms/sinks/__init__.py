"""Sinks for the vectors: write them where users search them, from a Beam
pipeline (after `EmbedImages`, or from a dataset by `mobilenet-embed export`).

    out = uris | EmbedImages(spec)
    records = out["embedded"] | ToVectorRecords(metadata)      # unit vectors, top-1 label
    records | WriteToLanceDB("/data/lance", identity=store_identity(metadata))
    records | WriteToQdrant(QdrantTarget(url="http://qdrant:6333"), ...)
    records | WriteToMilvus("http://milvus:19530", ...)
    records | WriteVertexFiles("gs://bucket/vertex/embeddings", num_shards=8)
    records | WriteBigQueryFiles("gs://bucket/bq/rows", num_shards=8)
    records | WriteToBigQueryVectors("project.dataset.table")  # Beam's rag writer

Every sink takes `VectorRecord`s (transforms.sinks.records); the stores
upsert by id, so writing the same rows again adds nothing. The client
libraries are optional extras (`pip install .[lancedb,qdrant,milvus]`) and
are imported only by the sink that needs them.
"""
from transforms.sinks.records import (ToVectorRecords, VectorRecord,
                                      store_identity)

_LAZY = {
    "WriteToLanceDB": "transforms.sinks.lancedb_sink",
    "WriteToQdrant": "transforms.sinks.qdrant_sink",
    "QdrantTarget": "transforms.sinks.qdrant_sink",
    "WriteToMilvus": "transforms.sinks.milvus_sink",
    "WriteVertexFiles": "transforms.sinks.files",
    "WriteBigQueryFiles": "transforms.sinks.files",
    "WriteToBigQueryVectors": "transforms.sinks.bigquery",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)


__all__ = ["VectorRecord", "ToVectorRecords", "store_identity", *_LAZY]
