"""Data contracts: the pipeline's element types and the output's Arrow schemas."""
from schemas.output import (ERRORS_SCHEMA, META_KEYS, METRICS_NAMESPACE,
                            NUM_CLASSES, SCHEMA_VERSION, TOP_K,
                            DatasetMetadata, ModelInfo, embeddings_schema,
                            read_metadata, with_metadata)
from schemas.records import (STAGES, DecodedImage, Embedding, FailedImage,
                             ImageRef)

__all__ = [
    "ERRORS_SCHEMA", "META_KEYS", "METRICS_NAMESPACE", "DatasetMetadata",
    "ModelInfo", "NUM_CLASSES", "SCHEMA_VERSION", "TOP_K",
    "embeddings_schema", "read_metadata", "with_metadata", "STAGES",
    "DecodedImage", "Embedding", "FailedImage", "ImageRef",
]
