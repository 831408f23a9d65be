"""Export the vectors for stores that need more than a recipe.

vertex: Vertex AI Vector Search's JSON input, one object a line,
{"id": image_id, "embedding": [...]}, in files of at most ROWS_PER_FILE rows
(Vector Search reads every *.json file of a Cloud Storage folder). The
vectors are L2-normalized, so DOT_PRODUCT_DISTANCE gives the cosine
similarity `query` reports.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline.search.errors import SearchError
from pipeline.search.files import join, write_bytes
from pipeline.search.vectors import VectorSource

FORMATS = ("vertex",)
ROWS_PER_FILE = 50_000


def export(source: VectorSource, to: str, fmt: str = "vertex",
           rows_per_file: int = ROWS_PER_FILE) -> dict:
    if fmt not in FORMATS:
        raise SearchError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    files, rows, lines = [], 0, []

    def flush():
        if lines:
            path = join(to, f"embeddings-{len(files):05d}.json")
            write_bytes(path, ("\n".join(lines) + "\n").encode())
            files.append(path)
            lines.clear()

    for ids, _, vectors in source.batches(4096):
        rounded = np.round(vectors.astype(np.float64), 7)
        for image_id, vector in zip(ids, rounded):
            lines.append(json.dumps({"id": image_id, "embedding": vector.tolist()},
                                    separators=(",", ":")))
            rows += 1
            if len(lines) >= rows_per_file:
                flush()
    flush()
    return {"format": fmt, "rows": rows, "files": files,
            "dimensions": source.dim, "distance": "DOT_PRODUCT_DISTANCE on unit vectors"}
