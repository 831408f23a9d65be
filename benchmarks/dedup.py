"""dedup at scale: the Beam pipeline on a synthetic dataset with planted
duplicates, one and two local worker processes.

    nice python -m benchmarks.dedup --rows 100000            # ~3 minutes on 2 cores
    python -m benchmarks.dedup --rows 20000 --workers 1        # quick

The dataset is written once (benchmarks/results/work/dedup-<rows>/, reused):
vectors drawn like benchmarks/search.py's (non-negative, clustered, like
MobileNetV2's pooled features) at --dim dimensions, 1% of rows replaced by
near copies of another row (small noise) and 0.5% by byte copies (same vector,
same content_sha256). Its index is built once by `build_dataset_index`
(timed). Then each configuration runs `mobilenet-embed dedup` in its own
process; the process tree's resident memory is sampled every 0.1 s (the
launcher, the largest worker, and all together). Figures: the summary's
seconds (estimate; the first pipeline: search, pairs, components and
clusters; the workers' summed read and search seconds), pairs, clusters and
peak memory, into benchmarks/results/dedup-<rows>-t<threshold>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def make_dataset(root: Path, rows: int, dim: int, seed: int = 0) -> dict:
    from benchmarks.search import SyntheticVectors
    from synthetic_dataset import write_dataset
    if (root / "planted.json").exists():
        return json.loads((root / "planted.json").read_text())
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    near = exact = 0
    pairs = []
    source = SyntheticVectors(rows, dim=dim, seed=seed, batch=10_000)
    for part, (ids, _, x) in enumerate(source.batches()):
        n = len(ids)
        digests = [f"sha-{i}" for i in ids]
        pixels = rng.integers(10_000, 1_000_000, n).tolist()
        picks = rng.permutation(n)
        k_near, k_exact = n // 100, n // 200
        for j in range(k_near):
            a, b = picks[2 * j], picks[2 * j + 1]
            x[b] = x[a] + 0.01 * rng.random(dim).astype(np.float32)
            pairs.append(sorted((ids[a], ids[b])))
        base = 2 * k_near
        for j in range(k_exact):
            a, b = picks[base + 2 * j], picks[base + 2 * j + 1]
            x[b] = x[a]
            digests[b] = digests[a]
            pairs.append(sorted((ids[a], ids[b])))
        near, exact = near + k_near, exact + k_exact
        write_dataset(root, x, ids, digests, pixels, rows_per_part=n, row_group=2048,
                      first_part=part)
    planted = {"near_copies": near, "exact_copies": exact, "pairs": pairs}
    (root / "planted.json").write_text(json.dumps(planted))
    return planted


class TreeMemory:
    """Peak RSS of a process and its children, sampled."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.launcher = self.worker = self.total = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.is_set():
            try:
                main = self.proc.memory_info().rss
                kids = [c.memory_info().rss for c in self.proc.children(recursive=True)]
            except psutil.Error:
                kids, main = [], 0
            self.launcher = max(self.launcher, main)
            self.worker = max([self.worker] + kids)
            self.total = max(self.total, main + sum(kids))
            time.sleep(0.1)

    def done(self) -> dict:
        self.stop.set()
        self.thread.join()
        return {"launcher_gib": round(self.launcher / 2**30, 3),
                "largest_worker_gib": round(self.worker / 2**30, 3),
                "all_processes_gib": round(self.total / 2**30, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dedup")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--shard_rows", type=int, default=10_000)
    parser.add_argument("--work", default=str(HERE / "results" / "work"))
    args = parser.parse_args(argv)
    root = Path(args.work) / f"dedup-{args.rows}-{args.dim}"
    started = time.perf_counter()
    planted = make_dataset(root, args.rows, args.dim)
    results = {"rows": args.rows, "dim": args.dim, "threshold": args.threshold,
               "cpu_count": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0],
               "planted": {k: v for k, v in planted.items() if k != "pairs"}, "dataset_s": round(time.perf_counter() - started, 1),
               "runs": []}
    if not (root / "index" / "index_infos.json").exists():
        from pipeline.search.api import build_dataset_index
        started = time.perf_counter()
        infos = build_dataset_index(str(root), to=str(root / "index"),
                                    progress=lambda m: print(m, file=sys.stderr))
        results["index"] = {"index_key": infos.get("index_key"),
                            "build_s": round(time.perf_counter() - started, 1)}
    for workers in args.workers:
        mode = (["--direct_running_mode", "in_memory"] if workers == 1 else
                ["--direct_running_mode", "multi_processing", "--direct_num_workers",
                 str(workers)])
        cmd = [sys.executable, "-m", "pipeline", "dedup", str(root), "--threshold",
               str(args.threshold), "--shard_rows", str(args.shard_rows), *mode]
        print(f"== {workers} worker(s): {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        memory = TreeMemory(proc.pid)
        out, _ = proc.communicate()
        wall = time.perf_counter() - t
        peak = memory.done()
        if proc.returncode != 0:
            results["runs"].append({"workers": workers, "failed": proc.returncode})
            continue
        summary = json.loads((root / "duplicates" / "dedup_summary.json").read_text())
        from pipeline.search.dedup_beam import read_table
        table = read_table(str(root / "duplicates"), "pairs")
        got = {tuple(sorted(p)) for p in zip(table.column("image_id_a").to_pylist(),
                                              table.column("image_id_b").to_pylist())}
        found_planted = sum(tuple(p) in got for p in planted["pairs"])
        run = {"workers": workers, "wall_s": round(wall, 1), "seconds": summary["seconds"],
               "pairs": summary["exact_pairs"] + summary["near_pairs"],
               "exact_pairs": summary["exact_pairs"], "near_pairs": summary["near_pairs"],
               "estimate": summary["estimate"], "clusters": summary["clusters"],
               "component_pipelines": summary["component_pipelines"],
               "planted_pairs_found": round(found_planted / max(1, len(planted["pairs"])), 4),
               "peak_memory": peak, "index_key": summary["index"]["index_key"]}
        results["runs"].append(run)
        print(f"   {out.strip()}\n   wall {wall:.1f} s, {run['seconds']}, peak {peak}",
              file=sys.stderr, flush=True)
    target = HERE / "results" / f"dedup-{args.rows}-t{args.threshold}.json"
    target.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {target}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
