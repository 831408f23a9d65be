"""The contract of the output: Arrow schemas of embeddings/ and errors/.

Defined once here and used by the writer, the tests and the docs
(`python -m pipeline schema` prints them).
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
NUM_CLASSES = 1001  # index 0 is "background"
TOP_K = 5

# Parquet key-value metadata written into every file (values are strings;
# `preprocessing` is JSON). Readers find them with
# pq.read_schema(path).metadata.
META_PREFIX = "mobilenet_embed."
META_KEYS = (
    "schema_version",
    "project_version",
    "model",  # catalog name, e.g. mobilenet_v2_100_224
    "model_source",  # tfhub | saved_model | random
    "model_handle",  # TF-Hub handle or path/URI; "random(seed=N)" for random
    "weights_sha256",  # digest of the weights actually loaded
    "heads",  # how logits and features were computed (one pass or two)
    "feature_dim",
    "preprocessing",  # JSON of the decode/resize settings
    "labels",  # the label set of `top5_labels`
)


def meta_key(name: str) -> bytes:
    return (META_PREFIX + name).encode()


def embeddings_schema(feature_dim: int) -> pa.Schema:
    """Schema of embeddings/: one row per embedded image."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("logits", pa.list_(pa.float32(), NUM_CLASSES), nullable=False),
        pa.field("feature_vector", pa.list_(pa.float32(), feature_dim),
                 nullable=False),
        pa.field("top5_class_ids", pa.list_(pa.int32(), TOP_K),
                 nullable=False),
        pa.field("top5_labels", pa.list_(pa.string(), TOP_K), nullable=False),
        pa.field("top5_probabilities", pa.list_(pa.float32(), TOP_K),
                 nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("content_bytes", pa.int64(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"),
                 nullable=False),
    ])


ERRORS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error_class", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=True),
    pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
])


def with_metadata(schema: pa.Schema, metadata: dict) -> pa.Schema:
    """The schema with the run's key-value metadata attached."""
    unknown = set(metadata) - set(META_KEYS)
    if unknown:
        raise ValueError(f"unknown metadata keys: {sorted(unknown)}")
    return schema.with_metadata(
        {meta_key(k): str(v).encode() for k, v in metadata.items()})


def read_metadata(schema: pa.Schema) -> dict:
    """The run metadata of a file's schema, keys without the prefix."""
    raw = schema.metadata or {}
    out = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            out[key[len(META_PREFIX):]] = v.decode()
    return out
