"""Search at scale: build time, peak memory, recall@10 against exact search
and single-query latency for each index type `index --index_key auto` can
choose, on synthetic vectors of the real dimension.

    nice python -m benchmarks.search --rows 1000000            # the 1M run
    python -m benchmarks.search --rows 100000 --keys auto        # quick

Each index is built in its own process (so its peak RSS is its own) by the
same `build_index` the command runs, which measures recall and latency
itself. Results go to benchmarks/results/search-<rows>.json.

The vectors: 1280 non-negative dims like MobileNetV2's pooled ReLU6
features, drawn as a mixture. A photo's vector is
relu(shared + topic + subtopic + noise) + styles: `shared` is one profile
common to all, 1000 topics (the ImageNet classes) of 10 subtopics each, each
a sparse non-negative offset, Gaussian noise per image, and 8 sparse "style"
directions mixed in at random non-negative strengths (what makes unrelated
photos' features correlate: every channel is non-negative). Each batch is generated from its own seed, so every pass over the
"dataset" sees the same vectors without holding them in memory.
`--calibrate OUT` prints the same statistics for a real dataset to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DIM = 1280


class SyntheticVectors:
    """A `VectorSource` of clustered non-negative vectors, regenerated per pass.

    relu(shared + topic + subtopic + noise) + styles: see the module doc.
    The constants were fitted by hand to the statistics `stats` gives for the
    200 shared ImageNet photos (docs/search.md shows both)."""

    def __init__(self, rows: int, dim: int = DIM, seed: int = 0, topics: int = 1000,
                 subtopics: int = 10, styles: int = 8, batch: int = 8192):
        self.rows, self.dim, self.seed, self.batch = rows, dim, seed, batch
        rng = np.random.default_rng(seed)
        self.shared = np.maximum(rng.normal(0.05, 0.25, dim), 0).astype(np.float32)
        self.topics = ((rng.random((topics, dim)) < 0.12)
                       * rng.gamma(2.0, 0.7, (topics, dim))).astype(np.float32)
        self.subtopics = ((rng.random((topics * subtopics, dim)) < 0.06)
                          * rng.gamma(2.0, 0.5, (topics * subtopics, dim))).astype(np.float32)
        # A few directions every image mixes in at its own strength (lighting,
        # texture, background): what makes unrelated photos' features correlate.
        self.styles = ((rng.random((styles, dim)) < 0.1)
                       * rng.gamma(2.0, 0.2, (styles, dim))).astype(np.float32)
        self.subtopics_per_topic = subtopics

    def identity(self) -> dict:
        return {"source": "synthetic", "rows": str(self.rows), "seed": str(self.seed),
                "feature_dim": str(self.dim)}

    def num_rows(self) -> int:
        return self.rows

    def batches(self, batch_size: int = 8192):
        for b in range((self.rows + self.batch - 1) // self.batch):
            yield self._batch(b)

    # A parted source for the Beam build: parts of PART_ROWS rows, each
    # regenerated on the worker that reads it (nothing but the seed is sent).
    PART_ROWS = 65536

    def parts(self):
        return [(f"syn-{start:010d}", min(self.PART_ROWS, self.rows - start))
                for start in range(0, self.rows, self.PART_ROWS)]

    def read(self, part: str, lo: int, hi: int, batch_size: int = 8192):
        base = int(part.rsplit("-", 1)[1])
        first, last = (base + lo) // self.batch, (base + hi - 1) // self.batch
        for b in range(first, last + 1):
            ids, uris, x = self._batch(b)
            start = b * self.batch
            a, z = max(base + lo, start) - start, min(base + hi, start + len(ids)) - start
            yield ids[a:z], uris[a:z], x[a:z]

    def _batch(self, b: int):
        from pipeline.search.vectors import normalize
        start = b * self.batch
        n = min(self.batch, self.rows - start)
        rng = np.random.default_rng([self.seed, b])
        sub = rng.integers(0, len(self.subtopics), n)
        topic = sub // self.subtopics_per_topic
        x = self.shared + self.topics[topic] + self.subtopics[sub]
        x += rng.normal(0, 0.3, (n, self.dim)).astype(np.float32)
        np.maximum(x, 0, out=x)
        x += np.maximum(rng.normal(0, 1, (n, len(self.styles))), 0).astype(
            np.float32) @ self.styles
        return [f"img{start + i:08d}" for i in range(n)], [""] * n, normalize(x)

    def __getstate__(self):
        return {"rows": self.rows, "dim": self.dim, "seed": self.seed, "batch": self.batch}

    def __setstate__(self, state):
        self.__init__(state["rows"], state["dim"], state["seed"], batch=state["batch"])


def stats(vectors: np.ndarray) -> dict:
    """What decides how hard search is: value spread, sparsity, and how
    close a random pair and a nearest neighbour are (cosine)."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = v @ v.T
    np.fill_diagonal(sims, -1)
    iu = np.triu_indices(len(v), 1)
    return {"rows": len(v), "zero_fraction": round(float((vectors <= 1e-6).mean()), 3),
            "random_pair_cosine_mean": round(float(sims[iu].mean()), 3),
            "nearest_neighbour_cosine_p50": round(float(np.median(sims.max(axis=1))), 3),
            "nearest_neighbour_cosine_p10": round(float(np.percentile(sims.max(axis=1), 10)), 3)}


def one(args) -> dict:
    """Build one index in this process; print its measurements as JSON."""
    from pipeline.search.index import build_index
    source = SyntheticVectors(args.rows, seed=args.seed)
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        started = time.perf_counter()
        infos = build_index(source, folder, index_key=args.one,
                            max_memory=int(args.max_memory), target_recall=0.95,
                            recall_queries=args.queries,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
        wall = time.perf_counter() - started
    keep = ("index_key", "chosen_by", "search_parameters", "recall_at_1", "recall_at_10",
            "target_met", "tuning", "latency_ms", "build_seconds", "size_on_disk_bytes",
            "peak_memory_bytes", "estimated_index_memory_bytes", "rows", "rerank")
    result = {k: infos[k] for k in keep}
    result["wall_s"] = round(wall, 1)
    return result


def beam(args) -> dict:
    """The Beam build (pipeline/search/build.py) in this process as launcher,
    with --workers local worker processes; its infos hold the stage times
    and every worker's peak RSS."""
    from pipeline.search.build import build_index_beam
    source = SyntheticVectors(args.rows, seed=args.seed)
    argv = (["--direct_running_mode", "in_memory"] if args.workers == 1 else
            ["--direct_running_mode", "multi_processing", "--direct_num_workers",
             str(args.workers)])
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        started = time.perf_counter()
        infos = build_index_beam(source, folder, index_key=args.keys if args.keys != "auto"
                                 else "auto", max_memory=int(args.max_memory),
                                 recall_queries=args.queries, shards=args.shards,
                                 beam_argv=argv,
                                 progress=lambda m: print(m, file=sys.stderr, flush=True))
        wall = time.perf_counter() - started
    keep = ("engine", "runner", "index_key", "shards", "search_parameters", "recall_at_1",
            "recall_at_10", "target_met", "latency_ms", "build_seconds", "workers",
            "peak_memory_bytes", "peak_anonymous_memory_bytes", "size_on_disk_bytes", "rows")
    result = {k: infos.get(k) for k in keep}
    result["wall_s"] = round(wall, 1)
    result["workers_requested"] = args.workers
    result["load_average_after"] = os.getloadavg()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.search")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--keys", default="auto",
                        help="comma-separated: auto and/or faiss factory strings")
    parser.add_argument("--max_memory", default="8G")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the index files (temp)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--calibrate", metavar="OUT",
                        help="print statistics of a real dataset's vectors and of "
                             "the same number of synthetic ones")
    parser.add_argument("--beam", action="store_true",
                        help="the Beam build: --workers local worker processes")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--shards", type=int, default=None)
    args = parser.parse_args(argv)
    from pipeline.search.index import parse_size
    args.max_memory = parse_size(args.max_memory)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    if args.beam:
        result = beam(args)
        print(json.dumps(result))
        target = HERE / "results" / f"search-beam-{args.rows}-{args.workers}w.json"
        target.parent.mkdir(exist_ok=True)
        target.write_text(json.dumps(result, indent=1) + "\n")
        print(f"-> {target}", file=sys.stderr)
        return 0
    if args.calibrate:
        from pipeline.search.source import DatasetVectors
        real = np.concatenate([v for _, _, v in DatasetVectors(args.calibrate).batches()])
        synthetic = np.concatenate([v for _, _, v in SyntheticVectors(len(real) * 50).batches()])
        rng = np.random.default_rng(0)
        print(json.dumps({"real": stats(real), "synthetic_sample": stats(
            synthetic[rng.choice(len(synthetic), len(real), replace=False)])}, indent=1))
        return 0
    results = {"rows": args.rows, "dim": DIM, "max_memory_bytes": args.max_memory,
               "cpu_count": os.cpu_count(), "runs": []}
    for key in args.keys.split(";" if ";" in args.keys else ","):
        key = key.strip()
        cmd = [sys.executable, "-m", "benchmarks.search", "--one", key, "--rows",
               str(args.rows), "--max_memory", str(args.max_memory), "--queries",
               str(args.queries), "--seed", str(args.seed)]
        if args.work:
            cmd += ["--work", args.work]
        print(f"== {key} on {args.rows} x {DIM}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
        if done.returncode != 0:
            results["runs"].append({"key": key, "failed": done.returncode})
            continue
        run = json.loads(done.stdout.strip().splitlines()[-1])
        run["requested"] = key
        results["runs"].append(run)
        print(f"   {run['index_key']} {run['search_parameters']}: recall@1 "
              f"{run['recall_at_1']:.3f} @10 {run['recall_at_10']:.3f}, build "
              f"{run['build_seconds']['total_s']:.0f} s, peak RSS "
              f"{run['peak_memory_bytes'] / 2**30:.2f} GiB, p50 {run['latency_ms']['p50']:.2f} ms, "
              f"p95 {run['latency_ms']['p95']:.2f} ms", file=sys.stderr, flush=True)
    target = HERE / "results" / f"search-{args.rows}.json"
    target.parent.mkdir(exist_ok=True)
    target.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
