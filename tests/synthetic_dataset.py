"""A dataset folder written directly (no model run): the embeddings schema
and metadata of a real run, with vectors and digests chosen by the caller.
For dedup tests and benchmarks that need thousands of rows with planted
duplicates in seconds."""
from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import DatasetMetadata
from schemas.output import NUM_CLASSES, TOP_K, embeddings_schema, with_metadata
from schemas.output import ModelInfo


def metadata(dim: int) -> DatasetMetadata:
    return DatasetMetadata(
        model=ModelInfo(model="mobilenet_v2_100_224", model_source="random",
                        model_handle="random(seed=0)", weights_sha256="0" * 64,
                        heads="synthetic", feature_dim=dim),
        preprocessing={"synthetic": True}, labels="synthetic")


def write_dataset(root: Path, vectors: np.ndarray, ids: Sequence[str],
                  digests: Optional[Sequence[str]] = None,
                  pixels: Optional[Sequence[int]] = None, rows_per_part: int = 1000,
                  row_group: int = 256, first_part: int = 0) -> Path:
    """OUT/embeddings/part-*.parquet and OUT/_dataset.json for `vectors`."""
    n, dim = vectors.shape
    meta = metadata(dim)
    schema = with_metadata(embeddings_schema(dim), meta)
    digests = list(digests) if digests is not None else [f"sha-{i}" for i in ids]
    pixels = list(pixels) if pixels is not None else [100 * 100] * n
    os.makedirs(root / "embeddings", exist_ok=True)
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    zeros = np.zeros(NUM_CLASSES, np.float32)
    for part, start in enumerate(range(0, n, rows_per_part)):
        stop = min(n, start + rows_per_part)
        m = stop - start
        flat = pa.array(np.ascontiguousarray(vectors[start:stop], np.float32).ravel())
        columns = {
            "image_id": pa.array(list(ids[start:stop]), pa.string()),
            "uri": pa.array([f"/synthetic/{i}" for i in ids[start:stop]], pa.string()),
            "model": pa.array(["mobilenet_v2_100_224"] * m, pa.string()),
            "logits": pa.FixedSizeListArray.from_arrays(
                pa.array(np.tile(zeros, m)), NUM_CLASSES),
            "feature_vector": pa.FixedSizeListArray.from_arrays(flat, dim),
            "top5_class_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(m * TOP_K, np.int32)), TOP_K),
            "top5_labels": pa.FixedSizeListArray.from_arrays(
                pa.array(["x"] * (m * TOP_K)), TOP_K),
            "top5_probabilities": pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(m * TOP_K, np.float32)), TOP_K),
            "original_width": pa.array([int(p) for p in pixels[start:stop]], pa.int32()),
            "original_height": pa.array([1] * m, pa.int32()),
            "content_sha256": pa.array(list(digests[start:stop]), pa.string()),
            "content_bytes": pa.array([1000] * m, pa.int64()),
            "event_timestamp": pa.array([now] * m, pa.timestamp("us", tz="UTC")),
        }
        table = pa.table([columns[f.name] for f in schema], schema=schema)
        pq.write_table(table, root / "embeddings" / f"part-synthetic-{first_part + part:05d}.parquet",
                       row_group_size=row_group)
    (root / "_dataset.json").write_text(json.dumps(meta.to_strings(), indent=2))
    return root


def planted(n: int, dim: int = 32, groups: int = 20, copies: int = 3,
            noise: float = 0.02, exact: int = 10, seed: int = 0):
    """(vectors, ids, digests, pixels): `n` non-negative clustered rows with
    `groups` near-duplicate groups of 1 + `copies` rows (small noise) and
    `exact` byte copies (same vector, same digest)."""
    rng = np.random.default_rng(seed)
    centers = np.maximum(rng.normal(size=(max(8, n // 4), dim)), 0)
    x = centers[rng.integers(0, len(centers), n)] + 0.6 * rng.normal(size=(n, dim))
    x = np.maximum(x, 0).astype(np.float32)
    ids = [f"img{i:06d}" for i in range(n)]
    digests = [f"sha-{i}" for i in range(n)]
    pixels = rng.integers(50, 5000, n).tolist()
    order = rng.permutation(n)
    at = 0
    for _ in range(groups):
        base = order[at]
        for c in order[at + 1:at + 1 + copies]:
            x[c] = x[base] + noise * rng.random(dim).astype(np.float32)
        at += 1 + copies
    for _ in range(exact):
        a, b = order[at], order[at + 1]
        x[b] = x[a]
        digests[b] = digests[a]
        at += 2
    return x, ids, digests, pixels
