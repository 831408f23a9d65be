"""Inverted-file indexes built as Beam pipelines, shard by shard.

`build_index_beam` runs these named stages (each timed in index_infos.json):

  measure  the launcher reads only the parts' row counts (Parquet footers)
           and draws the training sample and the recall queries by position
  sample   Beam: each part's worker reads the drawn rows of its part
           (`SampleRows`); the launcher gets only those rows
  train    Beam, one element: the quantizer is trained once, on one worker,
           from the sample files, and written to the build area
           (`<to>/_work/<plan>/trained.faiss`); the launcher never holds
           the training sample
  add      Beam: one element per shard (a range of rows of one or more
           parts); each worker reads only its shard's vectors, adds them to
           an empty copy of the trained index and writes the shard's
           .faiss, rows and (re-ranked keys) exact vectors. Alongside, the
           exact top-k of the recall queries over the shard's rows, merged
           into the global exact top-k by a CombineGlobally (`AddShards`)
  merge    the shards' inverted lists are merged into one on-disk index
           (faiss.contrib.ondisk.merge_ondisk: lists.ivfdata is memory
           mapped when searched, never loaded whole)
  tune     nprobe to the target recall@10, then single-query latency
  commit   the build folder is complete first, then index_infos.json names
           it (written atomically), then older builds and the build area go;
           all of it under the folder's lock (index.locked_target)

A grown dataset adds only its new parts as new shards with the trained
quantizer; rows of parts no longer in the dataset are removed from their
shards with remove_ids. A killed run leaves its build area: the next run
with the same plan reuses the shards that finished (each is written whole,
then its done-record) and does the rest.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import io
import json
import math
import os
import resource
import shutil
import tempfile
import time
import uuid
from typing import Callable, Iterator, Optional, Protocol

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.search.errors import SearchError, SearchJobFailed
from pipeline.search.index import (DEFAULT_MAX_MEMORY, GIB, INDEX_INFOS,
                                   LOG, RECALL_K, RECALL_QUERIES, Choice,
                                   RowReader, SearchIndex, _candidates_per_k,
                                   _checked_key, _family, _identity_differences,
                                   _is_compressed, _is_remote, _join, _latency, _tune,
                                   _training_points, _build_in_process, build_infos,
                                   choose_index,
                                   faiss_quiet, read_faiss, check_trainable,
                                   estimate_bytes, locked_target, read_infos_or_none,
                                   unbuildable)
from pipeline.search.vectors import Batch

WORK = "_work"
# Memory one add worker may use for its shard's codes (the trained index and
# a batch come on top). The default number of shards keeps every shard
# under it and gives each local worker at least two.
SHARD_BUDGET = 1 * GIB
MEMORY_PER_WORKER = 3 * GIB


class PartedSource(Protocol):
    """Vectors in named parts that workers can read on their own."""
    dim: int

    def identity(self) -> dict[str, str]: ...

    def parts(self) -> list[tuple[str, int]]: ...  # (name, rows), names stable

    def read(self, part: str, lo: int, hi: int, batch_size: int = 8192
             ) -> Iterator[Batch]: ...


def is_beam_key(key: str, d: int) -> bool:
    """Inverted files are built by shards; Flat and HNSW in one process."""
    if key == "auto":
        return False
    return faiss.try_extract_index_ivf(_checked_key(key, d)) is not None


# --- files in the build area (local or gs://) ----------------------------------

def _put(data: bytes, uri: str) -> None:
    from transforms.dataset import write_file_atomically
    write_file_atomically(uri, data)


def _put_file(local: str, uri: str) -> None:
    """A local file moved to `uri` whole (renamed locally, streamed to GCS)."""
    if not _is_remote(uri):
        os.makedirs(os.path.dirname(uri), exist_ok=True)
        shutil.move(local, uri + ".tmp")
        os.replace(uri + ".tmp", uri)
        return
    from apache_beam.io.filesystems import FileSystems
    with open(local, "rb") as src, FileSystems.create(uri) as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
    os.unlink(local)


def _copy_to_local(uri: str, local: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(uri) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)


def _get(uri: str) -> bytes:
    from apache_beam.io.filesystems import FileSystems
    with FileSystems.open(uri) as f:
        return f.read()


def _exists(uri: str) -> bool:
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.exists(uri)


def _index_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def _index_from(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, np.uint8))


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class AnonymousMemoryPeak:
    """The highest anonymous resident memory (heap, arrays; /proc's RssAnon)
    of this process while the block runs, sampled every 0.2 s. The peak RSS
    the kernel keeps also counts pages of memory-mapped files (the merged
    on-disk lists, the re-ranking vectors), which the kernel can drop at
    any time: this is the part that must fit. 0 where /proc is absent."""

    def __init__(self, every_s: float = 0.2):
        import threading
        self.every_s, self.peak = every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def now() -> int:
        try:
            with open("/proc/self/status", encoding="ascii") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.now())
            if self._stop.wait(self.every_s):
                return

    def __enter__(self) -> "AnonymousMemoryPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --- the exact top-k, merged ----------------------------------------------------

def exact_topk(queries: np.ndarray, vectors: np.ndarray, labels: np.ndarray, k: int
               ) -> tuple[np.ndarray, np.ndarray]:
    scores = queries @ vectors.T
    lab = np.broadcast_to(labels, scores.shape)
    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, keep, axis=1)
        lab = np.take_along_axis(lab, keep, axis=1)
    return scores.astype(np.float32), np.ascontiguousarray(lab, np.int64)


def merge_topk(a, b, k: int):
    scores = np.concatenate([a[0], b[0]], axis=1)
    labels = np.concatenate([a[1], b[1]], axis=1)
    if scores.shape[1] > k:
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        scores = np.take_along_axis(scores, keep, axis=1)
        labels = np.take_along_axis(labels, keep, axis=1)
    return scores, labels


def _sorted_topk(scores, labels):
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.take_along_axis(labels, order, 1)


# --- the Beam stages --------------------------------------------------------------

class _SampleDoFn:
    """Reads the drawn rows of one part; writes them to the build area."""

    def __init__(self, source, work: str):
        self.source, self.work = source, work

    def __call__(self, element):
        index, part, rows = element
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.source.dim), np.float32)
        pos = int(rows[0])
        for batch_ids, _, vecs in self.source.read(part, int(rows[0]), int(rows[-1]) + 1):
            lo, hi = np.searchsorted(rows, [pos, pos + len(batch_ids)])
            out[lo:hi] = vecs[rows[lo:hi] - pos]
            pos += len(batch_ids)
        _put(_npz(vectors=out), f"{self.work}/sample/{index:06d}.npz")
        return index


@dataclasses.dataclass
class Shard:
    name: str
    segments: list  # [part, lo, hi, label_start]: rows lo..hi of part, labels from label_start
    add: bool  # False: only the exact top-k over these rows (rows already indexed)

    @property
    def rows(self) -> int:
        return sum(hi - lo for _, lo, hi, _ in self.segments)


class _AddDoFn:
    """One shard: add its rows to an empty copy of the trained index, write
    the shard's files, and compute the exact top-k of the recall queries
    over its rows. A shard whose done-record exists is not done again."""

    def __init__(self, source, work: str, rerank: bool, k: int, key: str, n: int):
        self.source, self.work, self.rerank, self.k = source, work, rerank, k
        self.key, self.n = key, n
        self.trained = None
        self.queries = None

    def _setup(self):
        if self.trained is None:
            self.trained = _get(f"{self.work}/trained.faiss")
            self.queries = np.load(io.BytesIO(_get(f"{self.work}/queries.npz")))["vectors"]

    def __call__(self, shard: Shard):
        done = f"{self.work}/done/{shard.name}.npz"
        if _exists(done):
            record = np.load(io.BytesIO(_get(done)))
            return (record["scores"], record["labels"])
        self._setup()
        started = time.perf_counter()
        index = _index_from(self.trained) if shard.add else None
        scores = np.full((len(self.queries), 0), -np.inf, np.float32)
        labels = np.full((len(self.queries), 0), -1, np.int64)
        ids, uris, row_labels = [], [], []
        vectors_out = tempfile.NamedTemporaryFile(prefix="shard-", suffix=".f32", delete=False) \
            if shard.add and self.rerank else None
        try:
            for part, lo, hi, label_start in shard.segments:
                pos = lo
                for batch_ids, batch_uris, vecs in self.source.read(part, lo, hi):
                    lab = np.arange(label_start + pos - lo,
                                    label_start + pos - lo + len(batch_ids), dtype=np.int64)
                    pos += len(batch_ids)
                    if shard.add:
                        with unbuildable(self.key, self.n, self.source.dim):
                            index.add_with_ids(vecs, lab)
                        ids.extend(batch_ids)
                        uris.extend(batch_uris)
                        row_labels.append(lab)
                        if vectors_out is not None:
                            vectors_out.write(vecs.tobytes())
                    scores, labels = merge_topk((scores, labels),
                                                exact_topk(self.queries, vecs, lab, self.k),
                                                self.k)
                if pos != hi:
                    raise RuntimeError(f"part {part} has {pos} rows, {hi} expected: "
                                       "the dataset changed while it was indexed")
            if shard.add:
                base = f"{self.work}/shards/{shard.name}"
                local = tempfile.mktemp(prefix="shard-", suffix=".faiss")
                faiss.write_index(index, local)
                del index
                _put_file(local, base + ".faiss")
                table = pa.table({"label": pa.array(np.concatenate(row_labels) if row_labels
                                                    else np.empty(0, np.int64)),
                                  "image_id": pa.array(ids, pa.string()),
                                  "uri": pa.array(uris, pa.string())})
                buf = io.BytesIO()
                pq.write_table(table, buf)
                _put(buf.getvalue(), base + ".rows.parquet")
                if vectors_out is not None:
                    vectors_out.close()
                    _put_file(vectors_out.name, base + ".f32")
        finally:
            if vectors_out is not None:
                vectors_out.close()
                if os.path.exists(vectors_out.name):
                    os.unlink(vectors_out.name)
        stats = {"shard": shard.name, "rows": shard.rows, "added": shard.add,
                 "seconds": round(time.perf_counter() - started, 3),
                 "peak_rss_bytes": _peak_rss(), "pid": os.getpid()}
        _put(_npz(scores=scores, labels=labels, stats=np.frombuffer(
            json.dumps(stats).encode(), np.uint8)), done)
        return (scores, labels)


class _MergeTopK:
    def __init__(self, k: int):
        self.k = k

    def __call__(self, values):
        result = None
        for value in values:
            result = value if result is None else merge_topk(result, value, self.k)
        return result


def _write_gt(work: str):
    def write(value):
        scores, labels = value
        _put(_npz(scores=scores, labels=labels), f"{work}/gt.npz")
    return write


class _TrainDoFn:
    """Trains the quantizer once, on one worker, from the sample files: the
    launcher never holds the training sample."""

    def __init__(self, work: str, key: str, d: int, n: int, picks: list):
        self.work, self.key, self.d, self.n, self.picks = work, key, d, n, picks

    def __call__(self, _):
        started = time.perf_counter()
        train = np.concatenate(
            [np.load(io.BytesIO(_get(f"{self.work}/sample/{e:06d}.npz")))["vectors"][idx]
             for e, idx in self.picks]) if self.picks else np.empty((0, self.d), np.float32)
        index = _checked_key(self.key, self.d)
        with unbuildable(self.key, self.n, self.d):
            index.train(train)
        _put(_index_bytes(index), f"{self.work}/trained.faiss")
        stats = {"seconds": round(time.perf_counter() - started, 3),
                 "peak_rss_bytes": _peak_rss(), "pid": os.getpid(), "points": len(train)}
        _put(json.dumps(stats).encode(), f"{self.work}/train-stats.json")
        return 0


def train_graph(work: str, key: str, d: int, n: int, picks: list):
    import apache_beam as beam

    def build(p):
        (p | "Quantizer" >> beam.Create([0])
         | "TrainQuantizer" >> beam.Map(_TrainDoFn(work, key, d, n, picks)))
    return build


def sample_graph(source, work: str, elements: list):
    import apache_beam as beam

    def build(p):
        (p | "PartsToSample" >> beam.Create(elements, reshuffle=False)
         | "Spread" >> beam.Reshuffle()
         | "SampleRows" >> beam.Map(_SampleDoFn(source, work)))
    return build


def add_graph(source, work: str, shards: list, rerank: bool, k: int, key: str, n: int):
    import apache_beam as beam

    def build(p):
        (p | "Shards" >> beam.Create(shards, reshuffle=False)
         | "SpreadShards" >> beam.Reshuffle()
         | "AddShards" >> beam.Map(_AddDoFn(source, work, rerank, k, key, n))
         | "MergeExactTopK" >> beam.CombineGlobally(_MergeTopK(k))
         | "WriteExactTopK" >> beam.Map(_write_gt(work)))
    return build


# --- planning ---------------------------------------------------------------------

def default_shards(rows: int, bytes_per_row: int, workers: Optional[int]) -> int:
    """Every shard's codes within SHARD_BUDGET; at least two per local worker
    (one per remote worker slot is left to the runner's autoscaling)."""
    by_memory = math.ceil(rows * bytes_per_row / SHARD_BUDGET)
    return max(1, min(rows, max(by_memory, 2 * (workers or 4))))


def plan_shards(parts: list[tuple[str, int, int]], count: int, add: bool, prefix: str
                ) -> list[Shard]:
    """Rows of `parts` ((name, rows, label_start)) cut into `count` shards of
    about equal size, in order."""
    total = sum(r for _, r, _ in parts)
    if total == 0:
        return []
    count = max(1, min(count, total))
    bounds = [round(total * i / count) for i in range(count + 1)]
    shards, pos = [], 0
    spans = []
    for name, rows, label_start in parts:
        spans.append((pos, pos + rows, name, label_start))
        pos += rows
    for i in range(count):
        lo, hi = bounds[i], bounds[i + 1]
        segments = []
        for start, stop, name, label_start in spans:
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                segments.append([name, a - start, b - start, label_start + a - start])
        shards.append(Shard(f"{prefix}{i:05d}", segments, add))
    return shards


LAYOUTS = {
    "merged": "one index: the shards' inverted lists merged into lists.ivfdata "
              "(on disk, memory-mapped when searched)",
    "stacked": "no merge: the shards' inverted lists (shards/*.faiss, memory-mapped) "
               "searched as one through the trained quantizer (faiss HStackInvertedLists)",
}


def open_stacked(index_path: str, shard_names: list) -> faiss.Index:
    """The trained (empty) index of `index_path` searching the lists of the
    shards next to it (shards/<name>.faiss, memory-mapped) as one: list i
    is every shard's list i. Nothing is merged or copied; one quantizer."""
    folder = os.path.dirname(index_path)
    index = faiss.read_index(index_path)
    ivf = faiss.extract_index_ivf(index)
    shards = [faiss.read_index(os.path.join(folder, "shards", name + ".faiss"),
                               faiss.IO_FLAG_MMAP) for name in shard_names]
    lists = [faiss.extract_index_ivf(shard).invlists for shard in shards]
    if not lists:
        return index
    vector = faiss.InvertedListsPtrVector()
    for invlists in lists:
        vector.push_back(invlists)
    stacked = faiss.HStackInvertedLists(len(lists), vector.data())
    ivf.replace_invlists(stacked, False)
    total = sum(shard.ntotal for shard in shards)
    index.ntotal = ivf.ntotal = total
    # The Python objects own the shards and the stack: kept with the index.
    index.referenced_objects = [shards, lists, vector, stacked, ivf]
    return index


THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def threads_per_worker(beam_run) -> Optional[int]:
    """Local worker processes share the machine's cores: each gets its share
    for faiss (OpenMP) and NumPy (BLAS), not all of them each. None on a
    remote runner (its workers have their own cores) or where the caller
    set the thread count."""
    if not beam_run.local_workers or any(v in os.environ for v in THREAD_VARIABLES):
        return None
    return max(1, (os.cpu_count() or 1) // beam_run.local_workers)


def _run(build, beam_run, what: str) -> bool:
    """run_pipeline with the worker processes' thread share in their
    environment (they are started with it; this process keeps its own)."""
    from pipeline.runner import run_pipeline
    threads = threads_per_worker(beam_run) if (beam_run.local_workers or 0) > 1 else None
    if threads is None:
        return run_pipeline(build, beam_run, what)
    saved = {v: os.environ.get(v) for v in THREAD_VARIABLES}
    os.environ.update({v: str(threads) for v in THREAD_VARIABLES})
    try:
        return run_pipeline(build, beam_run, what)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _plan_id(*things) -> str:
    return hashlib.sha256(json.dumps(things, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


# --- the build -------------------------------------------------------------------

def build_index_beam(source: PartedSource, to: str, index_key: str = "auto",
                     max_memory: int = DEFAULT_MAX_MEMORY, target_recall: float = 0.95,
                     rebuild: bool = False, recall_queries: int = RECALL_QUERIES,
                     seed: int = 0, shards: Optional[int] = None,
                     beam_argv: Optional[list] = None, batch_size: int = 8192,
                     layout: str = "merged",
                     progress: Callable[[str], None] = LOG.info) -> dict:
    """Index every row of `source` into `to`: inverted files on Beam, Flat
    and HNSW in this process (index_infos.json's `engine` says which).
    With --dry_run the graphs are built and nothing is run or written;
    the returned dict then has "dry_run": True."""
    from pipeline.runner import BeamRun
    if not 0 < target_recall <= 1:
        raise SearchError(f"--target_recall must be in (0, 1], got {target_recall}")
    if layout not in LAYOUTS:
        raise SearchError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if shards is not None and shards < 1:
        raise SearchError(f"--shards must be at least 1, got {shards}")
    if index_key != "auto":
        _checked_key(index_key, source.dim)
    beam_run = BeamRun.from_argv(list(beam_argv or []), memory_per_worker=MEMORY_PER_WORKER)
    if beam_run.dry_run:
        return _dry_run(source, to, index_key, max_memory, shards, beam_run, progress)
    with locked_target(to, progress), AnonymousMemoryPeak() as anonymous:
        return _build(source, to, index_key, max_memory, target_recall, rebuild,
                      recall_queries, seed, shards, beam_run, batch_size, progress, layout,
                      anonymous)


def _choose(source, n: int, d: int, index_key: str, max_memory: int,
            existing: Optional[dict]) -> Choice:
    if index_key == "auto":
        choice = choose_index(n, d, max_memory)
        if existing is not None and _family(existing["index_key"]) == _family(choice.key):
            choice = dataclasses.replace(choice, key=existing["index_key"])
        return choice
    return Choice(index_key, _is_compressed(index_key), "--index_key",
                  estimate_bytes(index_key, n, d))


def _dry_run(source, to, index_key, max_memory, shards, beam_run, progress) -> dict:
    from pipeline.runner import run_pipeline
    parts = source.parts()
    n, d = sum(r for _, r in parts), source.dim
    if n == 0:
        raise SearchError("the dataset has no rows to index")
    choice = _choose(source, n, d, index_key, max_memory, None)
    if not is_beam_key(choice.key, d):
        progress(f"dry run: {choice.key} is built in one process; nothing to run on Beam")
        return {"dry_run": True, "engine": "in-process", "index_key": choice.key}
    work = _join(to, f"{WORK}/dry-run")
    labelled = [(name, rows, 0) for name, rows in parts]
    count = shards or default_shards(n, _code_bytes(choice.key, d), beam_run.local_workers)
    planned = plan_shards(labelled, count, True, "shard-")
    run_pipeline(sample_graph(source, work, [(0, parts[0][0], [0])]), beam_run, "index sample")
    run_pipeline(train_graph(work, choice.key, d, n, [(0, [0])]), beam_run, "index train")
    run_pipeline(add_graph(source, work, planned, choice.rerank, RECALL_K + 1, choice.key, n),
                 beam_run, "index add")
    progress(f"dry run: {choice.key} in {len(planned)} shards on {beam_run.describe()}; "
             "the graphs were built, nothing was run")
    return {"dry_run": True, "engine": "beam", "runner": beam_run.runner,
            "index_key": choice.key, "shards": len(planned)}


def _code_bytes(key: str, d: int) -> int:
    return max(1, estimate_bytes(key, 1 << 20, d) // (1 << 20))


def _build(source, to, index_key, max_memory, target_recall, rebuild, recall_queries,
           seed, shards, beam_run, batch_size, progress, layout="merged",
           anonymous: Optional[AnonymousMemoryPeak] = None) -> dict:
    started = time.perf_counter()
    times: dict[str, float] = {}
    # measure: row counts and names only.
    t = time.perf_counter()
    parts = source.parts()
    n, d = sum(r for _, r in parts), source.dim
    if n == 0:
        raise SearchError("the dataset has no rows to index")
    identity = source.identity()
    existing = None if rebuild else read_infos_or_none(to, progress)
    if existing is not None and existing.get("identity") != identity:
        raise SearchError(
            f"the index in {to} was built from other vectors "
            f"({_identity_differences(existing.get('identity') or {}, identity)}); "
            "pass --rebuild to replace it, or --to another folder")
    choice = _choose(source, n, d, index_key, max_memory, existing)
    if not is_beam_key(choice.key, d):
        progress(f"{choice.key}: built in this process (Flat and HNSW are not sharded)")
        infos = _build_in_process(source, to, choice.key if index_key != "auto" else "auto",
                                  max_memory, target_recall, rebuild, recall_queries,
                                  batch_size, seed, progress)
        return infos

    remote = _is_remote(to)
    local_to = tempfile.mkdtemp(prefix="mobilenet-embed-index-") if remote else to
    old = _old_build(existing, choice, to, local_to, progress)
    old_parts = old["parts"] if old else {}
    current = dict(parts)
    removed = {p: v for p, v in old_parts.items() if current.get(p) != v["rows"]}
    kept = {p: v for p, v in old_parts.items() if p not in removed}
    next_label = old["next_label"] if old else 0
    new_parts = []
    for name, rows in parts:
        if name not in kept:
            new_parts.append((name, rows, next_label))
            next_label += rows
    n_new = sum(r for _, r, _ in new_parts)
    count = shards or default_shards(max(n_new, 1), _code_bytes(choice.key, d),
                                     beam_run.local_workers)
    generation = (old["generation"] + 1) if old else 0
    add_shards = plan_shards(new_parts, count, True, f"g{generation:03d}-")
    exact_shards = plan_shards([(p, v["rows"], v["label_start"]) for p, v in kept.items()],
                               max(1, count), False, f"exact{generation:03d}-")
    all_labelled = [(p, v["rows"], v["label_start"]) for p, v in kept.items()] + new_parts

    rng = np.random.default_rng(seed)
    num_queries = min(recall_queries, n)
    query_pos = np.sort(rng.choice(n, num_queries, replace=False))
    if not old:
        check_trainable(choice.key, n, d)
    ntrain = 0 if old else min(n, _training_points(choice.key, n))
    train_pos = np.sort(rng.choice(n, ntrain, replace=False)) if ntrain else np.empty(0, np.int64)
    elements, query_labels, pos = [], [], 0
    wanted_all = np.union1d(query_pos, train_pos)
    for i, (name, rows, label_start) in enumerate(all_labelled):
        lo, hi = np.searchsorted(wanted_all, [pos, pos + rows])
        if hi > lo:
            elements.append((len(elements), name, (wanted_all[lo:hi] - pos).tolist()))
        qlo, qhi = np.searchsorted(query_pos, [pos, pos + rows])
        query_labels.extend((query_pos[qlo:qhi] - pos + label_start).tolist())
        pos += rows
    plan = _plan_id(identity, choice.key, all_labelled, [dataclasses.asdict(s) for s in
                                                         add_shards + exact_shards],
                    seed, num_queries, ntrain, old["files"] if old else None)
    work = _join(to, f"{WORK}/{plan}")
    _clean_work(to, plan)
    times["measure_s"] = time.perf_counter() - t
    progress(f"{choice.key}: {n} rows in {len(parts)} parts, {n_new} to add in "
             f"{len(add_shards)} shards on {beam_run.describe()}"
             + (f", {sum(v['rows'] for v in removed.values())} to remove" if removed else ""))

    # sample
    t = time.perf_counter()
    train_stats = None
    if not _exists(f"{work}/queries.npz"):
        _run(sample_graph(source, work, elements), beam_run, "index sample")
        # Which of each part's sampled rows are queries / training points.
        query_parts, picks, start = [], [], 0
        for e, _, rows in elements:
            stop = start + len(rows)
            chosen = wanted_all[start:stop]
            q = np.nonzero(np.isin(chosen, query_pos))[0]
            if len(q):
                query_parts.append((e, q))
            tr = np.nonzero(np.isin(chosen, train_pos))[0]
            if len(tr):
                picks.append((e, tr))
            start = stop
        queries = np.concatenate(
            [np.load(io.BytesIO(_get(f"{work}/sample/{e:06d}.npz")))["vectors"][q]
             for e, q in query_parts])
        times["sample_s"] = time.perf_counter() - t
        # train: once, on one worker (never the launcher's memory)
        t = time.perf_counter()
        if old:
            _put(_index_bytes(faiss.read_index(os.path.join(old["local_files"],
                                                            "trained.faiss"))),
                 f"{work}/trained.faiss")
        else:
            progress(f"training {choice.key} on {ntrain} vectors (one worker)")
            try:
                _run(train_graph(work, choice.key, d, n, picks), beam_run, "index train")
            except SearchJobFailed as e:
                text = str(e)
                if "cannot be built on" not in text:
                    raise
                # The key cannot be trained on this data: the user's to fix (exit 2).
                raise SearchError(text.split("SearchError: ", 1)[-1]
                                  .split(" (--verbose", 1)[0]) from None
            train_stats = json.loads(_get(f"{work}/train-stats.json"))
        _put(_npz(vectors=queries, labels=np.asarray(query_labels, np.int64)),
             f"{work}/queries.npz")
        times["train_s"] = time.perf_counter() - t
    else:
        progress("resuming: the sample and the trained quantizer of the run that ended "
                 "early are reused")
        times["sample_s"] = times["train_s"] = 0.0
    record = np.load(io.BytesIO(_get(f"{work}/queries.npz")))
    queries, query_labels = record["vectors"], record["labels"]
    trained = _index_from(_get(f"{work}/trained.faiss"))

    # add (+ exact top-k)
    t = time.perf_counter()
    _forget_incomplete(work, add_shards, choice.rerank)
    resumed = sum(_exists(f"{work}/done/{s.name}.npz") for s in add_shards)
    if resumed:
        progress(f"resuming: {resumed} of {len(add_shards)} shards were done before")
    progress(f"adding {n_new} rows in {len(add_shards)} shards, exact search of "
             f"{num_queries} recall queries alongside")
    _run(add_graph(source, work, add_shards + exact_shards, choice.rerank,
                   RECALL_K + 1, choice.key, n), beam_run, "index add")
    gt = np.load(io.BytesIO(_get(f"{work}/gt.npz")))
    gt_scores, gt_rows = _sorted_topk(gt["scores"], gt["labels"])
    worker_stats = []
    for s in add_shards + exact_shards:
        rec = np.load(io.BytesIO(_get(f"{work}/done/{s.name}.npz")))
        worker_stats.append(json.loads(rec["stats"].tobytes().decode()))
    times["add_s"] = time.perf_counter() - t

    # merge
    t = time.perf_counter()
    build_id = f"build-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    files = os.path.join(local_to, build_id)
    os.makedirs(os.path.join(files, "shards"))
    try:
        shard_records = _gather_shards(old, removed, add_shards, work, files, progress)
        with open(os.path.join(files, "trained.faiss"), "wb") as f:
            f.write(_index_bytes(trained))
        merged = _index_from(_index_bytes(trained))
        shard_paths = [os.path.join(files, "shards", r["name"] + ".faiss")
                       for r in shard_records if r["rows"]]
        if layout == "stacked":
            # No merge: the shards' lists are searched as one (open_stacked).
            faiss.write_index(merged, os.path.join(files, "index.faiss"))
            merged = open_stacked(os.path.join(files, "index.faiss"),
                                  [r["name"] for r in shard_records if r["rows"]])
        else:
            if shard_paths:
                from faiss.contrib.ondisk import merge_ondisk
                with faiss_quiet():
                    merge_ondisk(merged, shard_paths, os.path.join(files, "lists.ivfdata"))
            faiss.write_index(merged, os.path.join(files, "index.faiss"))
        rows_table = _gather_rows(old, removed, add_shards, work, next_label)
        pq.write_table(rows_table, os.path.join(files, "rows.parquet"))
        if choice.rerank:
            _gather_vectors(old, add_shards, work, files, d, next_label)
        indexed = merged.ntotal
        if indexed != n:
            raise SearchError(f"the dataset changed while it was indexed ({indexed} rows "
                              f"indexed, {n} expected); run index again")
        del merged
        times["merge_s"] = time.perf_counter() - t

        # tune
        t = time.perf_counter()
        rerank = ({"exact": True, "candidates_per_k": _candidates_per_k(choice.key)}
                  if choice.rerank else None)
        opened = SearchIndex(read_faiss(os.path.join(files, "index.faiss"))
                             if layout == "merged" else
                             open_stacked(os.path.join(files, "index.faiss"),
                                          [r["name"] for r in shard_records if r["rows"]]),
                             rows_table.column("image_id").combine_chunks(),
                             rows_table.column("uri").combine_chunks(),
                             {"rerank": rerank, "index_key": choice.key},
                             RowReader(os.path.join(files, "vectors.f32"), d)
                             if choice.rerank else None)
        progress(f"measuring recall@10 against exact search; tuning to {target_recall}")
        params, tuning, recall = _tune(opened, queries, query_labels, gt_scores, gt_rows,
                                       target_recall)
        latency = _latency(opened, queries)
        del opened
        times["tune_s"] = time.perf_counter() - t
        times["total_s"] = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(root, f))
                   for root, _, names in os.walk(files) for f in names)
        added = [w for w in worker_stats if w["added"]]
        infos = build_infos(
            build_id=build_id, choice=choice, index_key=index_key, rerank=rerank,
            params=params, target_recall=target_recall, recall=recall,
            num_queries=num_queries, tuning=tuning, latency=latency, rows=n, dim=d,
            identity=identity, times=times, size=size, max_memory=max_memory,
            recall_method=("rows of the dataset drawn at random as queries (each "
                           "excluded from its own results), against exact "
                           "inner-product search over every row, computed per shard "
                           "on the workers and merged by a Beam combine"))
        infos.update({
            "engine": "beam",
            "runner": beam_run.describe(),
            "threads_per_worker": threads_per_worker(beam_run)
            if (beam_run.local_workers or 0) > 1 else None,
            "layout": layout,
            "layout_note": LAYOUTS[layout],
            "stacked_shards": [r["name"] for r in shard_records if r["rows"]]
            if layout == "stacked" else None,
            "rows_added": n_new,
            "rows_removed": sum(v["rows"] for v in removed.values()),
            "incremental": old is not None,
            "shards": len(shard_records),
            "shards_added": len(add_shards),
            "shard_list": shard_records,
            "parts": {name: {"rows": rows, "label_start": ls}
                      for name, rows, ls in all_labelled},
            "next_label": next_label,
            "generation": generation,
            "workers": {
                "shard_seconds_p50": _p(added, "seconds", 50),
                "shard_seconds_max": _p(added, "seconds", 100),
                "rows_per_second_per_worker": round(sum(w["rows"] for w in added) /
                                                    max(1e-9, sum(w["seconds"] for w in added)), 1)
                if added else None,
                "peak_rss_bytes_by_process": _peaks(worker_stats),
                "train": train_stats,
            },
            # of peak_memory_bytes, what is not file pages the kernel can
            # drop (see AnonymousMemoryPeak)
            "peak_anonymous_memory_bytes": anonymous.peak if anonymous else None,
        })
        with open(os.path.join(files, INDEX_INFOS), "w", encoding="utf-8") as f:
            json.dump(infos, f, indent=1)
        from pipeline.search.index import _commit
        _commit(local_to, to, build_id, infos)
    except BaseException:
        shutil.rmtree(files, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(local_to, ignore_errors=True)
    _clean_work(to, None)
    if not infos["target_met"]:
        progress(f"warning: recall@10 {infos['recall_at_10']:.3f} is below the "
                 f"target {target_recall} at the largest search parameters tried")
    return infos


def _p(stats: list, key: str, q: float):
    return round(float(np.percentile([s[key] for s in stats], q)), 3) if stats else None


def _peaks(stats: list) -> dict:
    peaks: dict[str, int] = {}
    for s in stats:
        peaks[str(s["pid"])] = max(peaks.get(str(s["pid"]), 0), s["peak_rss_bytes"])
    return peaks


def _forget_incomplete(work: str, shards: list, rerank: bool) -> None:
    """A shard counts as done when its done-record and all its files are
    there (a run that ended after moving some of them into a build folder
    has them redone)."""
    from apache_beam.io.filesystems import FileSystems
    for shard in shards:
        done = f"{work}/done/{shard.name}.npz"
        if not _exists(done):
            continue
        base = f"{work}/shards/{shard.name}"
        needed = [base + ".faiss", base + ".rows.parquet"] + ([base + ".f32"] if rerank else [])
        if not all(_exists(p) for p in needed):
            FileSystems.delete([done])


def _take(uri: str, local: str) -> None:
    """A work-area file into the build folder: moved when both are local."""
    if _is_remote(uri):
        _copy_to_local(uri, local)
    else:
        os.replace(uri, local)


def _clean_work(to: str, keep: Optional[str]) -> None:
    """Build areas of other plans (and, after a commit, all of them)."""
    base = _join(to, WORK)
    if _is_remote(to):
        from apache_beam.io.filesystems import FileSystems
        stale = [m.path for m in FileSystems.match([f"{base}/**"])[0].metadata_list
                 if keep is None or f"/{WORK}/{keep}/" not in m.path]
        if stale:
            FileSystems.delete(stale)
        return
    if not os.path.isdir(base):
        return
    for name in os.listdir(base):
        if name != keep:
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    if keep is None:
        shutil.rmtree(base, ignore_errors=True)


def _old_build(existing, choice, to, local_to, progress) -> Optional[dict]:
    """The committed Beam build to grow, or None (build anew)."""
    if existing is None or existing.get("engine") != "beam" \
            or existing.get("index_key") != choice.key:
        return None
    try:
        files = existing["files"]
        if _is_remote(to):
            from apache_beam.io.filesystems import FileSystems
            local = os.path.join(local_to, "_old", files)
            os.makedirs(os.path.join(local, "shards"))
            base = f"{to.rstrip('/')}/{files}/"
            for m in FileSystems.match([base + "**"])[0].metadata_list:
                rel = m.path[len(base):]
                if rel in ("index.faiss", "lists.ivfdata"):
                    continue
                with open(os.path.join(local, rel), "wb") as f:
                    f.write(_get(m.path))
        else:
            local = os.path.join(to, files)
        faiss.read_index(os.path.join(local, "trained.faiss"))
        for record in existing["shard_list"]:
            if record["rows"] and not os.path.getsize(
                    os.path.join(local, "shards", record["name"] + ".faiss")):
                raise ValueError(f"shard {record['name']} is empty")
        pq.read_metadata(os.path.join(local, "rows.parquet"))
        return {"files": files, "local_files": local, "parts": existing["parts"],
                "next_label": existing["next_label"], "generation": existing["generation"],
                "shards": existing["shard_list"]}
    except Exception as e:  # pylint: disable=broad-except
        progress(f"the index in {to} cannot be grown ({str(e)[:120]}): building it again")
        return None


def _gather_shards(old, removed, add_shards, work, files, progress) -> list:
    """The new build's shards: the old ones (rows of removed parts taken out
    with remove_ids) and the ones just added."""
    records = []
    if old:
        for record in old["shards"]:
            src = os.path.join(old["local_files"], "shards", record["name"] + ".faiss")
            dst = os.path.join(files, "shards", record["name"] + ".faiss")
            gone = [s for s in record["segments"] if s[0] in removed]
            if gone:
                index = faiss.read_index(src)
                for _, lo, hi, label_start in gone:
                    index.remove_ids(faiss.IDSelectorRange(label_start, label_start + hi - lo))
                faiss.write_index(index, dst)
                segments = [s for s in record["segments"] if s[0] not in removed]
                record = {"name": record["name"], "rows": int(index.ntotal),
                          "segments": segments}
            else:
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copyfile(src, dst)
            records.append(record)
    for shard in add_shards:
        _take(f"{work}/shards/{shard.name}.faiss",
              os.path.join(files, "shards", shard.name + ".faiss"))
        records.append({"name": shard.name, "rows": shard.rows, "segments": shard.segments})
    return records


def _gather_rows(old, removed, add_shards, work, next_label) -> pa.Table:
    """rows.parquet: row `label` -> image_id, uri (null where removed)."""
    ids = np.full(next_label, None, dtype=object)
    uris = np.full(next_label, None, dtype=object)
    if old:
        table = pq.read_table(os.path.join(old["local_files"], "rows.parquet"))
        m = table.num_rows
        ids[:m] = table.column("image_id").to_numpy(zero_copy_only=False)
        uris[:m] = table.column("uri").to_numpy(zero_copy_only=False)
        for name, part in old["parts"].items():
            if name in removed:
                ids[part["label_start"]:part["label_start"] + part["rows"]] = None
    for shard in add_shards:
        t = pq.read_table(io.BytesIO(_get(f"{work}/shards/{shard.name}.rows.parquet")))
        labels = t.column("label").to_numpy()
        ids[labels] = t.column("image_id").to_numpy(zero_copy_only=False)
        uris[labels] = t.column("uri").to_numpy(zero_copy_only=False)
    return pa.table({"image_id": pa.array(ids, pa.string()),
                     "uri": pa.array(uris, pa.string())})


def _gather_vectors(old, add_shards, work, files, d, next_label) -> None:
    """vectors.f32 by label: the old file, then each new shard's rows at
    their labels (a shard's labels are contiguous per segment)."""
    path = os.path.join(files, "vectors.f32")
    if old:
        shutil.copyfile(os.path.join(old["local_files"], "vectors.f32"), path)
    with open(path, "ab" if old else "wb") as out:
        out.truncate(4 * d * next_label)
    with open(path, "r+b") as out:
        from apache_beam.io.filesystems import FileSystems
        for shard in add_shards:
            shard_vectors = f"{work}/shards/{shard.name}.f32"
            with FileSystems.open(shard_vectors) as data:
                for _, lo, hi, label_start in shard.segments:
                    out.seek(4 * d * label_start)
                    left = 4 * d * (hi - lo)
                    while left:
                        chunk = data.read(min(left, 1 << 24))
                        if not chunk:
                            raise SearchError(f"shard {shard.name}'s vectors are short")
                        out.write(chunk)
                        left -= len(chunk)
            FileSystems.delete([shard_vectors])  # the disk holds one copy, not two
