"""The export pipeline: a dataset's rows -> VectorRecords -> a sink.

    parts' row groups (listed from the footers in the launcher)
      | Reshuffle                       spread over the workers
      | ReadRecords                     read one row group's few columns,
                                        normalize, one VectorRecord per row
      | sink                            transforms.sinks: vertex / bigquery
                                        files (one file per shard), LanceDB,
                                        Qdrant, Milvus, BigQuery table

The launcher reads only Parquet footers and the target's small files; the
rows flow through the workers. See target.py for the lock, the manifest and
the atomic replace of a file export.
"""
from __future__ import annotations

import logging
import math
import uuid
from typing import Callable, Optional, Sequence

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.export import target as targets
from pipeline.runner import BeamRun, run_pipeline
from pipeline.search.errors import SearchError
from pipeline.search.source import DatasetVectors
from transforms.dataset import Dataset, DatasetError
from transforms.sinks.records import VectorRecord, folder_of, store_identity
from transforms.uris import join

LOG = logging.getLogger("mobilenet_embed.search")
FORMATS = ("vertex", "bigquery", "lancedb", "qdrant", "milvus")
ROWS_PER_FILE = 50_000
BASE_COLUMNS = ("image_id", "uri", "feature_vector", "top5_labels")


def work_items(dataset: Dataset) -> tuple[list[tuple[str, int]], int]:
    """(part path, row group) per row group, and the rows in all: footers only."""
    items, rows = [], 0
    for path in dataset.parts():
        with FileSystems.open(path) as f:
            meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        items += [(path, i) for i in range(meta.num_row_groups)]
    return items, rows


def _values(value) -> tuple:
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return (str(value),)


class ReadRecords(beam.DoFn):
    """(part, row group) -> VectorRecords (unit vectors, top-1 label)."""

    def __init__(self, model: str, restricts: Sequence[str] = (),
                 crowding: Optional[str] = None):
        self._model, self._restricts, self._crowding = model, tuple(restricts), crowding

    def process(self, item):
        path, group = item
        columns = list(BASE_COLUMNS) + [c for c in self._restricts if c not in BASE_COLUMNS]
        if self._crowding not in (None, "folder") and self._crowding not in columns:
            columns.append(self._crowding)
        with FileSystems.open(path) as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=columns)
        vectors = table.column("feature_vector").combine_chunks()
        x = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(
            len(vectors), vectors.type.list_size)
        norms = np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        x = x / norms
        plain = {c: table.column(c).to_pylist() for c in columns if c != "feature_vector"}
        for i, image_id in enumerate(plain["image_id"]):
            top5 = tuple(plain["top5_labels"][i])
            uri = plain["uri"][i]
            restricts = tuple((c, _values(plain[c][i])) for c in self._restricts)
            crowd = (folder_of(uri) if self._crowding == "folder" else
                     None if self._crowding is None else
                     ",".join(_values(plain[self._crowding][i])))
            yield VectorRecord(image_id, uri, x[i], top5[0], top5, self._model,
                               restricts, crowd)


def _check_columns(dataset: Dataset, restricts: Sequence[str], crowding: Optional[str]) -> None:
    with FileSystems.open(dataset.parts()[0]) as f:
        names = pq.read_schema(f).names
    wanted = list(restricts) + ([crowding] if crowding not in (None, "folder") else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise SearchError(f"no column {', '.join(missing)} in the dataset (columns: "
                          f"{', '.join(n for n in names if n not in ('logits', 'feature_vector'))})")
    bad = [c for c in restricts if c in ("label", "id", "uri", "embedding", "vector")]
    if bad:
        raise SearchError(f"--restrict {bad[0]} is written already; name another column")


def _lancedb(target, identity, table, restricts, crowding, index):
    from transforms.sinks.lancedb_sink import LanceDBConfig
    return LanceDBConfig(target.to, identity, table, restricts, crowding is not None, index)


def _qdrant(target, identity, table, restricts, crowding, index):
    from transforms.sinks.qdrant_sink import QdrantConfig, QdrantTarget
    where = (QdrantTarget(path=target.to) if target.kind == "qdrant-local"
             else QdrantTarget(url=target.to))
    return QdrantConfig(where, identity, table)


def _milvus(target, identity, table, restricts, crowding, index):
    from transforms.sinks.milvus_sink import MilvusConfig
    return MilvusConfig(target.to, identity, table, restricts)


# format -> its store's write config (transforms.sinks.base.StoreConfig)
STORES = {"lancedb": _lancedb, "qdrant": _qdrant, "milvus": _milvus}


def _file_sink(target: targets.Target, restricts, crowding, staging: Optional[str],
               shards: int):
    if target.kind == "bigquery-table":
        from transforms.sinks.bigquery import WriteToBigQueryVectors
        return WriteToBigQueryVectors(target.to, restricts, crowding is not None)
    from transforms.sinks.files import WriteBigQueryFiles, WriteVertexFiles
    writer, stem = {"vertex": (WriteVertexFiles, "embeddings"),
                    "bigquery": (WriteBigQueryFiles, "rows")}[target.fmt]
    return writer(join(staging, stem), shards)


def _store(target, identity, table, restricts, crowding, index):
    """The store's config, its client library checked (one line naming the
    extra where it is missing); None for file formats."""
    if target.fmt not in STORES:
        return None
    config = STORES[target.fmt](target, identity, table, restricts, crowding, index)
    try:
        config.check_client()
    except ImportError as e:
        raise SearchError(f"--format {target.fmt} needs its client library: pip install "
                          f"'mobilenet-embed[{target.fmt}]' ({e})") from None
    return config


def _store_step(target: targets.Target, step: str, call):
    """A store call in the launcher as one line: StoreMismatch and bad names
    exit 2 with their own line, anything else names the store."""
    try:
        return call()
    except ValueError as e:  # StoreMismatch, bad names
        raise SearchError(str(e).splitlines()[0]) from None
    except Exception as e:  # pylint: disable=broad-except
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise SearchError(f"cannot {step} {target.fmt} at {target.shown}: "
                          f"{type(e).__name__}: {text}") from None


def dataset_ids(dataset: Dataset) -> set:
    """Every image_id of the dataset (one column of each part)."""
    ids = set()
    for path in dataset.parts():
        with FileSystems.open(path) as f:
            ids.update(pq.read_table(f, columns=["image_id"]).column("image_id").to_pylist())
    return ids


def dataset_identity(dataset: Dataset) -> str:
    """What tells datasets apart: its creation stamp (kept by a copy and by
    runs that grow it), else its folder."""
    try:
        recorded = dataset.read_json(dataset.dataset_json) or {}
    except Exception:  # pylint: disable=broad-except
        recorded = {}
    return str(recorded.get("created_at") or dataset.root)


def export(output: str, fmt: str, to: str, beam_argv: Sequence[str] = (),
           restricts: Sequence[str] = (), crowding: Optional[str] = None,
           overwrite: bool = False, shards: Optional[int] = None,
           rows_per_file: int = ROWS_PER_FILE, table: str = "images",
           index: bool = False, progress: Callable[[str], None] = LOG.info) -> dict:
    """Export the dataset at `output` to `to` as `fmt`. Returns what was
    done: format, rows, files, dimensions, the store's row count."""
    if fmt not in FORMATS:
        raise SearchError(f"--format {fmt!r} is not known; use one of {', '.join(FORMATS)}")
    target = targets.classify(fmt, to)
    targets.check_writable(target)
    dataset = Dataset(output)
    try:
        metadata = dataset.metadata()
    except DatasetError as e:
        raise SearchError(str(e)) from None
    restricts = list(dict.fromkeys(restricts))
    # Every part's footer holds the vectors (a foreign part: one line naming it).
    DatasetVectors(output).check_parts()
    _check_columns(dataset, restricts, crowding)
    identity = store_identity(metadata, dataset.root, dataset_identity(dataset))
    store = _store(target, identity, table, restricts, crowding, index)
    argv = list(beam_argv)
    if target.embedded_single_process and not any(
            a.split("=")[0] in ("--direct_running_mode", "--direct_num_workers") for a in argv):
        argv += ["--direct_running_mode", "in_memory", "--direct_num_workers", "1"]
    beam_run = BeamRun.from_argv(argv, memory_per_worker=1 * 2**30)
    items, rows = work_items(dataset)
    if shards is None:
        shards = max(beam_run.local_workers or 1, math.ceil(rows / max(1, rows_per_file)))
    shards = max(1, min(shards, targets_max_files(), max(1, rows)))
    run_id = uuid.uuid4().hex[:12]
    result = {"format": fmt, "to": target.to, "rows": rows, "dimensions": metadata.feature_dim,
              "model": metadata.model.model, "distance": "cosine (unit vectors)",
              "files": [], "store_rows": None, "runner": beam_run.describe()}
    if beam_run.dry_run:
        staging = join(target.to, f"{targets.STAGING}{run_id}") if target.kind == "files" else None
        sink = (store.create_write_transform() if store is not None
                else _file_sink(target, restricts, crowding, staging, shards))
        run_pipeline(lambda p: _graph(p, items, metadata.model.model, restricts,
                                      crowding, sink), beam_run, "export")
        result["dry_run"] = True
        return result
    held = targets.acquire(target, run_id)
    staging = None
    try:
        previous = targets.check_previous(target, identity, overwrite)
        if store is not None:
            _store_step(target, "open", lambda: store.prepare(overwrite))
        if target.kind == "files":
            targets.remove_stale_staging(target)
            staging = join(target.to, f"{targets.STAGING}{run_id}")
        sink = (store.create_write_transform() if store is not None
                else _file_sink(target, restricts, crowding, staging, shards))
        progress(f"exporting {rows} rows of {dataset.shown} ({len(items)} row groups) "
                 f"to {target.shown} as {fmt} on {beam_run.describe()}")
        run_pipeline(lambda p: _graph(p, items, metadata.model.model, restricts,
                                      crowding, sink), beam_run, "export")
        payload = {"format": fmt, "identity": identity, "rows": rows, "run_id": run_id,
                   "restricts": restricts, "crowding_tag": crowding}
        if target.kind == "files":
            if fmt == "bigquery":
                _write_bigquery_extras(staging, metadata.feature_dim, restricts, crowding)
            result["files"] = targets.commit_files(target, staging, run_id, payload,
                                                   previous, overwrite)
            staging = None
        elif store is not None:
            # the store equals the dataset: rows of images it no longer holds go
            keep = dataset_ids(dataset)
            result["stale_deleted"] = _store_step(target, "delete stale rows in",
                                                  lambda: store.delete_stale(keep))
            if result["stale_deleted"]:
                progress(f"deleted {result['stale_deleted']} rows of images no longer "
                         f"in {dataset.shown} from {target.shown}")
            result["store_rows"] = _count(store, target)
            targets.write_manifest(target, {**payload, "table": table,
                                            "store_rows": result["store_rows"]})
    finally:
        if staging is not None:
            targets.remove_staging(staging)
        if held is not None:
            held.release(run_id)
    return result


def _count(store, target) -> Optional[int]:
    """Rows in the store after the export (None where not countable here)."""
    try:
        return store.count()
    except Exception:  # pylint: disable=broad-except
        LOG.debug("could not count the rows of %s", target.shown, exc_info=True)
        return None


def targets_max_files() -> int:
    from transforms.sinks.files import MAX_VERTEX_FILES
    return MAX_VERTEX_FILES


def _write_bigquery_extras(staging: str, dims: int, restricts, crowding) -> None:
    import json

    from transforms.dataset import write_file_atomically
    from transforms.sinks.files import bigquery_schema, vector_search_sql
    schema = bigquery_schema(tuple(restricts), crowding is not None)
    write_file_atomically(join(staging, "schema.json"),
                          (json.dumps(schema["fields"], indent=2) + "\n").encode())
    write_file_atomically(join(staging, "vector_search.sql"),
                          vector_search_sql("PROJECT.DATASET.TABLE", dims).encode())


def _graph(p: beam.Pipeline, items, model: str, restricts, crowding, sink) -> None:
    (p
     | "RowGroups" >> beam.Create(items, reshuffle=False)
     | "Spread" >> beam.Reshuffle()
     | "ReadRecords" >> beam.ParDo(ReadRecords(model, restricts, crowding))
     | "Write" >> sink)


__all__ = ["FORMATS", "export", "ReadRecords", "work_items"]
