"""Export speed: rows/s of `mobilenet-embed export` per format, on a
synthetic dataset of the real layout (1280-dim feature vectors, 1001
logits, 4 part files), run as a user runs the command (its own process,
the default local runner: one worker process per core).

    nice python -m benchmarks.export --rows 20000
    python -m benchmarks.export --rows 2000 --formats vertex lancedb   # quick

Qdrant's local mode (a folder, no server) is slow by design (Qdrant's docs:
for tests and small sets) and admits one process: it is measured on
--qdrant_rows rows. Milvus Lite and Qdrant local run on one worker (each
locks its files); the others on every core. Beside each, a bare
write of the same rows in the same run (no Beam, one process: orjson lines
into one file; one LanceDB create_table), and the ratio export/bare.
Results go to benchmarks/results/export-<rows>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
DIM = 1280


def make_dataset(folder: Path, rows: int, parts: int = 4, seed: int = 0) -> None:
    """A dataset folder of `rows` synthetic rows, as the job writes them."""
    from schemas import DatasetMetadata, ModelInfo
    from schemas.output import NUM_CLASSES, embeddings_schema, with_metadata
    metadata = DatasetMetadata(
        model=ModelInfo("mobilenet_v2_100_224", "random", "random(seed=0)", "0" * 64,
                        "one pass", DIM),
        preprocessing={"height": 224, "width": 224}, labels="imagenet-1001")
    schema = with_metadata(embeddings_schema(DIM), metadata)
    (folder / "embeddings").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    labels = ["tabby", "tiger cat", "Egyptian cat", "lynx", "cougar"]
    now = int(time.time() * 1e6)
    for part, ids in enumerate(np.array_split(np.arange(rows), parts)):
        n = len(ids)
        feats = np.maximum(rng.normal(size=(n, DIM)), 0).astype(np.float32)
        cols = [
            pa.array([f"gs://bucket/photos/{i // 1000:04d}/{i:08d}.jpg" for i in ids]),
            pa.array([f"gs://bucket/photos/{i // 1000:04d}/{i:08d}.jpg" for i in ids]),
            pa.array(["mobilenet_v2_100_224"] * n),
            pa.FixedSizeListArray.from_arrays(pa.array(
                rng.normal(size=n * NUM_CLASSES).astype(np.float32)), NUM_CLASSES),
            pa.FixedSizeListArray.from_arrays(pa.array(feats.ravel()), DIM),
            pa.FixedSizeListArray.from_arrays(pa.array(np.tile(np.arange(5, dtype=np.int32), n)), 5),
            pa.FixedSizeListArray.from_arrays(pa.array(labels * n), 5),
            pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * 5, 0.2, np.float32)), 5),
            pa.array(np.full(n, 640, np.int32)), pa.array(np.full(n, 480, np.int32)),
            pa.array([f"{i:064x}" for i in ids]), pa.array(np.full(n, 100_000, np.int64)),
            pa.array(np.full(n, now, np.int64)).cast(pa.timestamp("us", tz="UTC")),
        ]
        pq.write_table(pa.Table.from_arrays(cols, schema=schema),
                       folder / "embeddings" / f"part-bench-{part:04d}.parquet",
                       row_group_size=4096)


def run_export(dataset: Path, fmt: str, to: Path, extra=()) -> dict:
    cmd = [sys.executable, "-m", "pipeline", "export", str(dataset), "--format", fmt,
           "--to", str(to), *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{fmt} failed: {done.stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "message": done.stdout.strip().splitlines()[-1]}


def bare_write(dataset: Path, fmt: str, to: Path) -> float:
    """Seconds for the same rows written without Beam, in this process: the
    parts read whole, the vectors normalized, then (vertex, bigquery) one
    orjson line per row into one file, (lancedb) one create_table of them
    all; milvus, qdrant: one insert / upsert call per 2000 rows."""
    from transforms.sinks.files import bigquery_line, vertex_line
    from transforms.sinks.records import VectorRecord
    start = time.perf_counter()
    table = pa.concat_tables(pq.read_table(p, columns=["image_id", "uri", "feature_vector",
                                                       "top5_labels"])
                             for p in sorted((dataset / "embeddings").glob("*.parquet")))
    x = table.column("feature_vector").combine_chunks()
    x = x.flatten().to_numpy().reshape(len(x), DIM)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    ids, uris = table.column("image_id").to_pylist(), table.column("uri").to_pylist()
    top5 = table.column("top5_labels").to_pylist()
    if fmt in ("vertex", "bigquery"):
        line = vertex_line if fmt == "vertex" else bigquery_line
        with open(to, "w", encoding="utf-8") as f:
            for i, image_id in enumerate(ids):
                f.write(line(VectorRecord(image_id, uris[i], x[i], top5[i][0], tuple(top5[i]),
                                          "m")) + "\n")
    elif fmt == "lancedb":
        import lancedb
        data = pa.table({"id": ids, "uri": uris, "vector": pa.FixedSizeListArray.from_arrays(
            pa.array(x.astype(np.float32).ravel()), DIM), "label": [t[0] for t in top5]})
        lancedb.connect(str(to)).create_table("images", data)
    else:
        return float("nan")
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.export")
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--qdrant_rows", type=int, default=1000)
    parser.add_argument("--formats", nargs="+",
                        default=["vertex", "bigquery", "lancedb", "milvus", "qdrant"])
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="export-bench-"))
    results = {"rows": args.rows, "dim": DIM, "cpus": os.cpu_count(),
               "machine": platform.platform(), "load_1min_before": os.getloadavg()[0],
               "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "formats": {}}
    try:
        make_dataset(work / "ds", args.rows)
        make_dataset(work / "small", args.qdrant_rows)
        for fmt in args.formats:
            dataset, rows = (work / "small", args.qdrant_rows) if fmt == "qdrant" \
                else (work / "ds", args.rows)
            to = work / ("m.db" if fmt == "milvus" else fmt)
            first = run_export(dataset, fmt, to)
            again = run_export(dataset, fmt, to)  # idempotent: upserts / replaced set
            bare = bare_write(dataset, fmt, work / f"bare-{fmt}")
            results["formats"][fmt] = {
                "rows": rows, "seconds": first["seconds"],
                "rows_per_s": round(rows / first["seconds"], 1),
                "rows_per_s_per_core": round(rows / first["seconds"] / (os.cpu_count() or 1), 1),
                "bare_seconds": round(bare, 2),
                "bare_rows_per_s": round(rows / bare, 1) if bare == bare else None,
                "vs_bare": round(bare / first["seconds"], 3) if bare == bare else None,
                "again_seconds": again["seconds"], "message": again["message"]}
            print(f"{fmt:9s} {rows:7d} rows {first['seconds']:7.1f} s "
                  f"{rows / first['seconds']:9.1f} rows/s (again {again['seconds']:.1f} s); "
                  f"bare write {bare:.1f} s {rows / bare:9.1f} rows/s, "
                  f"export/bare {bare / first['seconds']:.2f}x", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = HERE / "results" / f"export-{args.rows}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
