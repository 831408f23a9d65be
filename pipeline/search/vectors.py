"""Vectors as the index sees them: L2-normalized float32 rows, streamed.

A `VectorSource` is anything that can say how many rows it has, what made
them (the identity an index records and checks) and stream them in batches
of (image_ids, uris, vectors). The dataset reader (`source.DatasetVectors`)
and the benchmark's synthetic vectors (`benchmarks/search.py`) are two;
`ArrayVectors` wraps arrays already in memory (a notebook, a test).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Protocol, Sequence

import numpy as np

from pipeline.search.errors import SearchError

Batch = tuple[list[str], list[str], np.ndarray]  # image_ids, uris, float32 [n, d]


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, float32, C-contiguous. Inner product is
    then cosine similarity. An all-zero row stays zero (similarity 0 to
    everything) rather than becoming NaN."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if x.ndim != 2:
        raise SearchError(f"vectors must be a 2-D array [n, d], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise SearchError("vectors contain NaN or infinite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.maximum(norms, np.float32(1e-12), out=norms)
    return np.ascontiguousarray(x / norms, dtype=np.float32)


class VectorSource(Protocol):
    dim: int

    def identity(self) -> dict[str, str]: ...

    def num_rows(self) -> int: ...

    def batches(self, batch_size: int = 8192) -> Iterator[Batch]: ...


@dataclasses.dataclass
class ArrayVectors:
    """Vectors already in memory, as a source (normalized when streamed)."""
    vectors: np.ndarray
    image_ids: Optional[Sequence[str]] = None
    uris: Optional[Sequence[str]] = None
    made_by: Optional[dict] = None  # identity; defaults to "arrays, dim d"
    part_rows: int = 4096  # rows per part, as a parted source (Beam builds)

    def __post_init__(self):
        self.vectors = np.asarray(self.vectors, dtype=np.float32)
        if self.vectors.ndim != 2:
            raise SearchError(f"vectors must be [n, d], got shape {self.vectors.shape}")
        n = len(self.vectors)
        if self.image_ids is None:
            self.image_ids = [str(i) for i in range(n)]
        if self.uris is None:
            self.uris = [""] * n
        if len(self.image_ids) != n or len(self.uris) != n:
            raise SearchError("image_ids and uris must have one entry per vector")

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def identity(self) -> dict[str, str]:
        return dict(self.made_by or {"source": "arrays", "feature_dim": str(self.dim)})

    def num_rows(self) -> int:
        return len(self.vectors)

    def batches(self, batch_size: int = 8192) -> Iterator[Batch]:
        for start in range(0, len(self.vectors), batch_size):
            stop = start + batch_size
            yield (list(self.image_ids[start:stop]), list(self.uris[start:stop]),
                   normalize(self.vectors[start:stop]))

    def parts(self) -> list[tuple[str, int]]:
        n = len(self.vectors)
        return [(f"rows-{start:010d}", min(self.part_rows, n - start))
                for start in range(0, n, self.part_rows)]

    def read(self, part: str, lo: int, hi: int, batch_size: int = 8192) -> Iterator[Batch]:
        base = int(part.rsplit("-", 1)[1])
        for start in range(base + lo, base + hi, batch_size):
            stop = min(start + batch_size, base + hi)
            yield (list(self.image_ids[start:stop]), list(self.uris[start:stop]),
                   normalize(self.vectors[start:stop]))
