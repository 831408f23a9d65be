"""Writing search results (index files, pairs, pages, exports) whole or not
at all, local or gs://, with the dataset's own atomic writer."""
from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from transforms.dataset import write_file_atomically as write_bytes
from transforms.uris import join

__all__ = ["join", "write_bytes", "write_json", "write_parquet"]


def write_parquet(table: pa.Table, path: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes(path, buffer.getvalue())


def write_json(path: str, payload: dict) -> None:
    write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
