"""Writing result files atomically, local or gs:// (the search outputs)."""
from __future__ import annotations

import io
import json
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def join(folder: str, *names: str) -> str:
    if is_remote(folder):
        return "/".join([folder.rstrip("/"), *names])
    return os.path.join(folder, *names)


def write_bytes(path: str, data: bytes) -> None:
    """Local: temp file, fsync, rename. gs://: an object appears whole when
    its upload completes."""
    if is_remote(path):
        with FileSystems.create(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


def write_parquet(table: pa.Table, path: str) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    write_bytes(path, buffer.getvalue())


def write_json(path: str, payload: dict) -> None:
    write_bytes(path, (json.dumps(payload, indent=2) + "\n").encode())
