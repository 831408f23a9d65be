"""`dedup` as a Beam pipeline: exact copies, near duplicates and clusters of
a dataset of any size, locally (FnApiRunner, one process per core) or on
Dataflow with the embedding job's options.

Stages (each a named transform):

    plan shards      the dataset's part files cut into row ranges (workers read
                     the footers; the launcher reads nothing but metadata)
    near pairs       each worker opens the index once (DoFn.setup) and searches
                     its shard's rows against it: every pair at or above the
                     cosine threshold, k grown where all k neighbours pass
                     (with exact re-ranking where the index is compressed)
    exact copies     rows keyed by content_sha256, grouped: groups of two or
                     more are exact pairs (representative, copy)
    pairs            near pairs found from both ends kept once, those between
                     two copies of the same bytes dropped; a hard stop past
                     --max_pairs; written as Parquet parts
    components       connected components of the pairs as alternating
                     large-star / small-star rounds (Kiveris et al. 2014),
                     a few rounds per pipeline, each a GroupByKey: no process
                     ever holds the graph; a star check counts what is left,
                     and the launcher runs further rounds until none is
    clusters         each component's representative (most pixels, then the
                     smallest id) by a combine; members written as Parquet parts

Before the pass the number of pairs is estimated from a sample of rows
searched against the index; past --max_pairs the command stops with one
line. Results go into a fresh folder under --to, named by the summary, which
is written last (the commit): a failed or killed run leaves the previous
results in service.

    TO/dedup_summary.json        counts, threshold, index, estimate; "files"
    TO/<files>/pairs/part-*.parquet      image_id_a, image_id_b, similarity, kind
    TO/<files>/clusters/part-*.parquet   cluster_id, image_id, is_representative
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from typing import Callable, Iterator, Optional

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.runner import BeamRun, run_pipeline
from pipeline.search.dedup import (CLUSTERS_SCHEMA, DEFAULT_THRESHOLD, PAIRS_SCHEMA,
                                   START_K, check_threshold)
from pipeline.search.errors import SearchError, SearchJobFailed, check_local_target
from pipeline.search.files import join, write_json
from transforms.uris import is_local, redact

LOG = logging.getLogger("mobilenet_embed.search")

SUMMARY = "dedup_summary.json"
LEGACY_FILES = ("pairs.parquet", "clusters.parquet")  # before results were in parts
LOCK = "_lock.json"
SHARD_ROWS = 50_000
ROUNDS = 4  # large-star + small-star rounds per pipeline; most data converges in 2-3
SAMPLE_ROWS = 1_000
# Bytes a pair costs through the pipeline's shuffles where a local runner
# holds them in memory, all processes together (measured: benchmarks/dedup.py,
# 966k pairs: +0.55 GiB in one process, +1.25 GiB over 2 workers and the
# runner; docs/search.md "Dedup").
BYTES_PER_PAIR = 1400
DEFAULT_MAX_MEMORY = 8 * 2**30
# Dedup searches with 4x the effort (nprobe, efSearch, re-ranked candidates)
# the index was tuned to for queries: a pair the index misses is a duplicate
# left in. Measured on 100k synthetic rows through HNSW32,Flat tuned to
# recall@10 0.95: 1.9% of planted copies were missed at 1x (docs/search.md).
SEARCH_EFFORT = 4
MAX_SEARCH_CELLS = 1 << 22  # rows x k per search call: bounds a batch's result arrays
ROW_COLUMNS = ["image_id", "content_sha256", "original_width", "original_height"]


class PairsOverLimit(Exception):
    """More pairs than --max_pairs: the run stops, nothing is committed."""


# --- shards ----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shard:
    path: str
    start: int
    stop: int


def plan_shards(root: str, shard_rows: int = SHARD_ROWS) -> list[Shard]:
    """Row ranges of every embeddings part, at most `shard_rows` each
    (footers only)."""
    from transforms.dataset import Dataset
    shards = []
    for path in Dataset(root).parts():
        with FileSystems.open(path) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        shards.extend(Shard(path, s, min(n, s + shard_rows))
                      for s in range(0, n, shard_rows))
    return shards


def read_shard(shard: Shard, columns: list[str], batch_size: int = 4096
               ) -> Iterator[pa.RecordBatch]:
    """The shard's rows, `columns` only, a row group at a time."""
    with FileSystems.open(shard.path) as f:
        pf = pq.ParquetFile(f)
        offset = 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(shard.start, offset), min(shard.stop, offset + n)
            if lo < hi:
                at = offset
                for batch in pf.iter_batches(batch_size=batch_size, row_groups=[g],
                                             columns=columns):
                    b_lo, b_hi = max(lo, at), min(hi, at + batch.num_rows)
                    if b_lo < b_hi:
                        yield batch.slice(b_lo - at, b_hi - b_lo)
                    at += batch.num_rows
                    if at >= hi:
                        break
            offset += n
            if offset >= shard.stop:
                break


# --- near pairs of a batch of rows -----------------------------------------------

def rows_above(index, ids: list[str], vectors: np.ndarray, threshold: float,
               start_k: int = START_K) -> Iterator[tuple[str, str, float]]:
    """(a, b, similarity), a < b, for each row of `vectors` (normalized, ids
    `ids`) and each index row at or above `threshold` (itself excluded). A
    pair between two rows of the batch comes once from each end. k starts at
    `start_k` and grows 4x for the rows whose k-th neighbour still passes;
    rows x k per search call stays under MAX_SEARCH_CELLS."""
    ntotal = index.ntotal
    if not ntotal or not len(ids):
        return
    pending = np.arange(len(ids))
    k = min(start_k, ntotal)
    while len(pending):
        more = []
        step = max(1, MAX_SEARCH_CELLS // k)
        for s in range(0, len(pending), step):
            sub = pending[s:s + step]
            scores, rows = index.search_rows(vectors[sub], k)
            if k < ntotal:
                full = (scores[:, -1] >= threshold) & (rows[:, -1] >= 0)
                more.extend(sub[full].tolist())
            else:
                full = np.zeros(len(sub), bool)
            passing = (scores >= threshold) & (rows >= 0) & ~full[:, None]
            q, c = np.nonzero(passing)
            if not len(q):
                continue
            others = index.image_ids.take(pa.array(rows[q, c], pa.int64())).to_pylist()
            sims = np.minimum(scores[q, c], 1.0).tolist()
            for qi, other, sim in zip(q.tolist(), others, sims):
                me = ids[sub[qi]]
                if other == me:
                    continue
                yield (me, other, sim) if me < other else (other, me, sim)
        pending = np.array(more, dtype=np.int64)
        k = min(k * 4, ntotal)


def _pixels(width, height) -> int:
    return int(width or 0) * int(height or 0)


class _SearchShards(beam.DoFn):
    """A shard's rows searched against the index (opened once per worker):
    ((a, b), similarity) pairs, and every row as (image_id, sha, pixels) on
    the 'rows' output."""

    def __init__(self, index_dir: str, threshold: float, max_pairs: int,
                 threads: int = 1):
        self.index_dir, self.threshold, self.max_pairs = index_dir, threshold, max_pairs
        self.threads = threads
        self.index = None

    def setup(self):
        import faiss

        from pipeline.search.index import SearchIndex
        # One process per core (locally, and on Dataflow's workers): faiss's
        # own threads would only contend with the other processes'.
        faiss.omp_set_num_threads(self.threads)
        self.index = SearchIndex.open(self.index_dir)
        self.index.search_harder(SEARCH_EFFORT)

    def process(self, shard: Shard):
        from pipeline.search.source import fixed_list_to_numpy
        from pipeline.search.vectors import normalize
        found, read_s, search_s = 0, 0.0, 0.0
        t = time.perf_counter()
        for batch in read_shard(shard, ROW_COLUMNS + ["feature_vector"]):
            ids = batch.column(0).to_pylist()
            rows = list(zip(ids, batch.column(1).to_pylist(), batch.column(2).to_pylist(),
                            batch.column(3).to_pylist()))
            vectors = normalize(fixed_list_to_numpy(batch.column(4)))
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            pairs = []
            for a, b, sim in rows_above(self.index, ids, vectors, self.threshold):
                pairs.append(((a, b), sim))
                if found + len(pairs) > 2 * self.max_pairs:  # found from both ends
                    raise PairsOverLimit(
                        f"rows {shard.start}-{shard.stop} of {redact(shard.path)} alone "
                        f"pair up more than --max_pairs {self.max_pairs} times at "
                        f"--threshold {self.threshold}: raise the threshold or --max_pairs")
            found += len(pairs)
            search_s += time.perf_counter() - t
            for image_id, sha, w, h in rows:
                yield beam.pvalue.TaggedOutput("rows", (image_id, sha, _pixels(w, h)))
            yield from pairs
            t = time.perf_counter()
        yield beam.pvalue.TaggedOutput("seconds", (read_s, search_s))


def _read_rows(shard: Shard):
    for batch in read_shard(shard, ROW_COLUMNS):
        for image_id, sha, w, h in zip(*(batch.column(i).to_pylist() for i in range(4))):
            yield image_id, sha, _pixels(w, h)


def _exact_group(item):
    """A digest's rows: (representative, copy) pairs, and each member's
    (image_id, digest) on the 'members' output."""
    digest, rows = item
    rows = sorted(rows, key=lambda r: (-r[1], r[0]))
    rep = rows[0][0]
    for image_id, _ in rows if len(rows) > 1 else ():
        yield beam.pvalue.TaggedOutput("members", (image_id, digest))
        if image_id != rep:
            yield {"image_id_a": rep, "image_id_b": image_id, "similarity": 1.0,
                   "kind": "exact"}


def _by_b_with_digest_of_a(item):
    """Near pairs keyed by `a`, joined with a's digest where a is in an exact
    group: re-keyed by `b`."""
    _, grouped = item
    digest = next(iter(grouped["digest"]), None)
    for (a, b), sim in grouped["pair"]:
        yield b, ((a, b), sim, digest)


def _near_rows(item):
    """Near pairs keyed by `b` with b's digest: those between two copies of
    the same bytes are dropped (already exact pairs of their group)."""
    _, grouped = item
    digest = next(iter(grouped["digest"]), None)
    for (a, b), sim, digest_a in grouped["pair"]:
        if digest is None or digest != digest_a:
            yield {"image_id_a": a, "image_id_b": b, "similarity": float(sim),
                   "kind": "near"}


def _within_limit(row, count, max_pairs):
    if count > max_pairs:
        raise PairsOverLimit(f"{count} near-duplicate pairs, over --max_pairs {max_pairs}: "
                             "raise --threshold or --max_pairs")
    return row


# --- connected components ------------------------------------------------------------

def _large_star(item):
    u, neighbours = item
    neighbours = set(neighbours)
    m = min(min(neighbours), u)
    for v in neighbours:
        if v > u:
            yield v, m


def _small_star(item):
    u, smaller = item
    smaller = set(smaller)
    m = min(smaller)
    for v in smaller | {u}:
        if v != m:
            yield v, m


def _both_ways(edge):
    yield edge[0], edge[1]
    yield edge[1], edge[0]


def _down(edge):
    return (edge[0], edge[1]) if edge[0] > edge[1] else (edge[1], edge[0])


def _star_violations(item):
    """1 for a node that is not a leaf with one root or a root: a component
    that more rounds would still change."""
    _, marks = item
    down, up = set(), False
    for kind, other in marks:
        if kind == "d":
            down.add(other)
        else:
            up = True
    return 1 if len(down) > 1 or (down and up) else 0


def _marks(edge):
    hi, lo = _down(edge)
    yield hi, ("d", lo)
    yield lo, ("u", hi)


class Components(beam.PTransform):
    """Undirected edges (u, v) -> edges (node, root) after `rounds` rounds of
    large-star then small-star, and the star check's count of nodes still
    out of place (0: every edge is (member, component minimum))."""

    def __init__(self, rounds: int):
        super().__init__()
        self.rounds = rounds

    def expand(self, edges):
        for r in range(1, self.rounds + 1):
            edges = (edges
                     | f"LargeStar{r}/Both" >> beam.FlatMap(_both_ways)
                     | f"LargeStar{r}/Group" >> beam.GroupByKey()
                     | f"LargeStar{r}/Link" >> beam.FlatMap(_large_star)
                     | f"SmallStar{r}/Down" >> beam.Map(_down)
                     | f"SmallStar{r}/Group" >> beam.GroupByKey()
                     | f"SmallStar{r}/Link" >> beam.FlatMap(_small_star))
        edges = edges | "Edges" >> beam.Map(_down) | "Distinct" >> beam.Distinct()
        violations = (edges
                      | "Check/Marks" >> beam.FlatMap(_marks)
                      | "Check/Group" >> beam.GroupByKey()
                      | "Check/Nodes" >> beam.Map(_star_violations)
                      | "Check/Sum" >> beam.CombineGlobally(sum))
        return edges, violations


def _cluster_id(representative: str) -> int:
    """Stable across runs: 63 bits of the representative's id digest."""
    return int.from_bytes(hashlib.blake2b(representative.encode(), digest_size=8).digest(),
                          "big") & ((1 << 63) - 1)


def _members(edge):
    node, root = edge
    yield node, root
    yield root, root


def _with_pixels(item):
    image_id, grouped = item
    for root in grouped["root"]:  # one, for a member of a cluster
        pixels = next(iter(grouped["pixels"]), 0)
        yield root, (-pixels, image_id)


def _cluster_rows(item, violations):
    _, grouped = item
    reps = [] if violations else list(grouped["rep"])  # not converged: more rounds
    for rep in [min(reps)[1]] if reps else []:
        cid = _cluster_id(rep)
        size = 0
        for image_id in grouped["member"]:
            size += 1
            yield {"cluster_id": cid, "image_id": image_id,
                   "is_representative": image_id == rep}
        yield beam.pvalue.TaggedOutput("sizes", size)


EDGES_SCHEMA = pa.schema([("u", pa.string()), ("v", pa.string())])


def _edge_row(edge):
    return {"u": edge[0], "v": edge[1]}


def _unless_converged(edge, violations):
    if violations:
        yield _edge_row(edge)


def clusters_of(edges, pixels, plan: "DedupPlan", step: int):
    """Components of `edges` with representatives: (violations, sizes).
    Cluster rows are written only when the components converged; otherwise
    the edges are, for the next pipeline's rounds."""
    star, violations = edges | "Components" >> Components(plan.rounds)
    (star | "KeepEdges" >> beam.FlatMap(
        _unless_converged, violations=beam.pvalue.AsSingleton(violations))
     | "WriteEdges" >> beam.io.WriteToParquet(
         join(plan.work, "_cc", f"edges-{step}", "part"), EDGES_SCHEMA,
         file_name_suffix=".parquet", codec="snappy"))
    members = star | "Members" >> beam.FlatMap(_members) | "DistinctMembers" >> beam.Distinct()
    reps = ({"root": members, "pixels": pixels}
            | "JoinPixels" >> beam.CoGroupByKey()
            | "Candidates" >> beam.FlatMap(_with_pixels)
            | "Representative" >> beam.CombinePerKey(min))
    rows = ({"member": members | "MemberOfRoot" >> beam.Map(lambda e: (e[1], e[0])),
             "rep": reps}
            | "JoinRepresentative" >> beam.CoGroupByKey()
            | "ClusterRows" >> beam.FlatMap(
                _cluster_rows, violations=beam.pvalue.AsSingleton(violations))
            .with_outputs("sizes", main="rows"))
    rows.rows | "WriteClusters" >> beam.io.WriteToParquet(
        join(plan.work, "clusters", f"part-s{step}"), CLUSTERS_SCHEMA,
        file_name_suffix=".parquet", codec="snappy")
    return violations, rows.sizes


# --- the pipelines -----------------------------------------------------------------

def _write_stat(value, path):
    write_json(path, {"value": value})


def _stat(pcoll, name: str, combine, folder: str):
    (pcoll | f"Stat/{name}" >> beam.CombineGlobally(combine)
     | f"Stat/{name}/Write" >> beam.Map(_write_stat, join(folder, "_stats", f"{name}.json")))


def _round_sum(values):
    return round(sum(values), 3)


def _max_or_zero(values):
    return max(values, default=0)


@dataclasses.dataclass
class DedupPlan:
    output: str
    index_dir: str
    work: str  # TO/<run id>
    threshold: float
    max_pairs: int
    shard_rows: int = SHARD_ROWS
    rounds: int = ROUNDS
    threads: int = 1  # faiss threads per worker process


def build_pairs_pipeline(p, plan: DedupPlan) -> None:
    """The first pipeline: shards, near and exact pairs (written), and the
    first rounds of components with clusters (written if they converged)."""
    shards = (p | "Dataset" >> beam.Create([plan.output])
              | "PlanShards" >> beam.FlatMap(plan_shards, plan.shard_rows)
              | "Spread" >> beam.Reshuffle())
    searched = shards | "NearPairs" >> beam.ParDo(
        _SearchShards(plan.index_dir, plan.threshold, plan.max_pairs,
                      plan.threads)).with_outputs(
        "rows", "seconds", main="pairs")
    rows = searched.rows
    exact = (rows | "ByDigest" >> beam.FlatMap(
        lambda r: [(r[1], (r[0], r[2]))] if r[1] else [])
             | "GroupDigests" >> beam.GroupByKey()
             | "ExactGroups" >> beam.FlatMap(_exact_group).with_outputs("members", main="pairs"))
    # Near pairs between two copies of the same bytes are dropped by joining
    # them (by a, then by b) with the members of exact groups: a shuffle, not
    # a side input every worker would hold whole.
    once = (searched.pairs | "OncePerPair" >> beam.CombinePerKey(max)
            | "KeyByA" >> beam.Map(lambda kv: (kv[0][0], kv)))
    near = ({"pair": once, "digest": exact.members}
            | "JoinDigestA" >> beam.CoGroupByKey()
            | "KeyByB" >> beam.FlatMap(_by_b_with_digest_of_a))
    near = ({"pair": near, "digest": exact.members}
            | "JoinDigestB" >> beam.CoGroupByKey()
            | "DropExactCopies" >> beam.FlatMap(_near_rows))
    near_count = near | "CountNear" >> beam.combiners.Count.Globally()
    pairs = ((exact.pairs, near | "HardStop" >> beam.Map(
        _within_limit, count=beam.pvalue.AsSingleton(near_count), max_pairs=plan.max_pairs))
             | "AllPairs" >> beam.Flatten())
    pairs | "WritePairs" >> beam.io.WriteToParquet(
        join(plan.work, "pairs", "part"), PAIRS_SCHEMA, file_name_suffix=".parquet",
        codec="snappy")
    edges = pairs | "PairEdges" >> beam.Map(lambda r: (r["image_id_a"], r["image_id_b"]))
    pixels = rows | "Pixels" >> beam.Map(lambda r: (r[0], r[2]))
    violations, sizes = clusters_of(edges, pixels, plan, 1)
    _stages_after(violations, sizes, plan, 1)
    _stat(rows, "images", beam.combiners.CountCombineFn(), plan.work)
    _stat(exact.pairs, "exact_pairs", beam.combiners.CountCombineFn(), plan.work)
    _stat(near_count, "near_pairs", sum, plan.work)
    _stat(searched.seconds | "ReadSeconds" >> beam.Map(lambda s: s[0]), "read_s",
          _round_sum, plan.work)
    _stat(searched.seconds | "SearchSeconds" >> beam.Map(lambda s: s[1]), "search_s",
          _round_sum, plan.work)


def _stages_after(violations, sizes, plan: "DedupPlan", step: int) -> None:
    (violations | "Stat/violations" >> beam.Map(
        _write_stat, join(plan.work, "_stats", f"violations-{step}.json")))
    _stat(sizes, "clusters", beam.combiners.CountCombineFn(), plan.work)
    _stat(sizes, "images_in_clusters", sum, plan.work)
    _stat(sizes, "largest_cluster", _max_or_zero, plan.work)


def build_rounds_pipeline(p, plan: DedupPlan, step: int) -> None:
    """A later pipeline: more rounds on the edges the last one left."""
    edges = (p | "ReadEdges" >> beam.io.ReadFromParquet(
        join(plan.work, "_cc", f"edges-{step - 1}", "part*"))
             | "Edge" >> beam.Map(lambda r: (r["u"], r["v"])))
    pixels = (p | "Dataset" >> beam.Create([plan.output])
              | "PlanShards" >> beam.FlatMap(plan_shards, plan.shard_rows)
              | "Spread" >> beam.Reshuffle()
              | "ReadRows" >> beam.FlatMap(_read_rows)
              | "Pixels" >> beam.Map(lambda r: (r[0], r[2])))
    violations, sizes = clusters_of(edges, pixels, plan, step)
    _stages_after(violations, sizes, plan, step)


# --- the launcher ------------------------------------------------------------------

def default_max_pairs(max_memory: int) -> int:
    return max(1, int(max_memory // BYTES_PER_PAIR))


def estimate_pairs(index, root: str, threshold: float, rows: int,
                   sample: int = SAMPLE_ROWS, seed: int = 0) -> dict:
    """Pairs expected at `threshold`: about `sample` rows, runs of rows from
    up to 16 random parts, searched against the index, their neighbours
    above the threshold counted (each pair has two ends)."""
    from pipeline.search.source import fixed_list_to_numpy
    from pipeline.search.vectors import normalize
    from transforms.dataset import Dataset
    parts = Dataset(root).parts()
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(len(parts), min(len(parts), 16), replace=False)) \
        if parts else []
    per = max(1, math.ceil(sample / max(1, len(picked))))
    counts, seen = 0, 0
    for i in picked:  # a run of rows at a random place of each of 16 random parts
        with FileSystems.open(parts[i]) as f:
            n = pq.ParquetFile(f).metadata.num_rows
        start = int(rng.integers(0, max(1, n - per + 1)))
        for batch in read_shard(Shard(parts[i], start, min(n, start + per)),
                                ["image_id", "feature_vector"]):
            ids = batch.column(0).to_pylist()
            vectors = normalize(fixed_list_to_numpy(batch.column(1)))
            counts += sum(1 for _ in rows_above(index, ids, vectors, threshold))
            seen += len(ids)
    # rows_above returns a pair within the sample once per end as well.
    expected = int(round(counts / max(1, seen) * rows / 2)) if seen else 0
    return {"sampled_rows": seen, "expected_pairs": expected}


def _delete_tree(folder: str) -> None:
    if is_local(folder):
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        found = FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list
        if found:
            FileSystems.delete([m.path for m in found])
    except Exception:  # pylint: disable=broad-except
        LOG.warning("could not remove %s", redact(folder))


def _read_stat(work: str, name: str):
    with FileSystems.open(join(work, "_stats", f"{name}.json")) as f:
        return json.loads(f.read().decode())["value"]


def _children(folder: str) -> list[str]:
    """Names directly under `folder` (local or gs://)."""
    if is_local(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    try:
        found = FileSystems.match([folder.rstrip("/") + "/**"])[0].metadata_list
    except Exception:  # pylint: disable=broad-except
        return []
    prefix = folder.rstrip("/") + "/"
    return sorted({m.path[len(prefix):].split("/", 1)[0] for m in found})


def read_summary(folder: str) -> Optional[dict]:
    path = join(folder, SUMMARY)
    if not FileSystems.exists(path):
        return None
    with FileSystems.open(path) as f:
        return json.loads(f.read().decode())


def part_files(folder: str, what: str) -> list[str]:
    """The Parquet parts of `what` ('pairs' or 'clusters') of the committed
    dedup results in `folder`; a single `what`.parquet of older versions."""
    summary = read_summary(folder)
    if summary and summary.get("files"):
        pattern = join(folder, summary["files"], what, "part*.parquet")
        try:
            return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        except Exception:  # pylint: disable=broad-except
            return []
    legacy = join(folder, f"{what}.parquet")
    return [legacy] if FileSystems.exists(legacy) else []


def read_table(folder: str, what: str) -> pa.Table:
    """All of `what` ('pairs' or 'clusters') in one table (small results)."""
    schema = PAIRS_SCHEMA if what == "pairs" else CLUSTERS_SCHEMA
    tables = []
    for path in part_files(folder, what):
        with FileSystems.open(path) as f:
            tables.append(pq.read_table(f).select(schema.names).cast(schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _index_exists(index_dir: str) -> bool:
    from pipeline.search import index as index_lib
    name = getattr(index_lib, "INDEX_INFOS", "index_infos.json")
    return FileSystems.exists(join(index_dir, name))


def check_target(to: str) -> None:
    """A local --to that is a file, or under one, is refused before any work."""
    if not is_local(to):
        return
    check_local_target(to)


def dedup_dataset(output: str, beam_run: BeamRun, to: Optional[str] = None,
                  threshold: float = DEFAULT_THRESHOLD, index_dir: Optional[str] = None,
                  max_pairs: Optional[int] = None, max_memory: int = DEFAULT_MAX_MEMORY,
                  estimate: bool = True, shard_rows: int = SHARD_ROWS,
                  rounds: int = ROUNDS, say: Callable[[str], None] = LOG.info
                  ) -> Optional[dict]:
    """Run dedup on `output`; the committed summary, or None on a dry run."""
    threshold = check_threshold(threshold)
    if max_pairs is not None and max_pairs < 1:
        raise SearchError(f"--max_pairs must be at least 1, got {max_pairs}")
    if rounds < 1 or shard_rows < 1:
        raise SearchError("--rounds and --shard_rows must be at least 1")
    limit = max_pairs or default_max_pairs(max_memory)
    output = output if not is_local(output) else os.path.abspath(output)
    index_dir = index_dir or join(output, "index")
    to = to or join(output, "duplicates")
    if not beam_run.is_local:
        local = [name for name, path in (("OUT", output), ("--index", index_dir),
                                         ("--to", to)) if is_local(path)]
        if local:
            raise SearchError(f"{beam_run.runner} workers cannot read local paths "
                              f"({', '.join(local)}): use gs:// folders")
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + \
        uuid.uuid4().hex[:6]
    threads = max(1, (os.cpu_count() or 1) // beam_run.local_workers) \
        if beam_run.local_workers else 1
    plan = DedupPlan(output, index_dir, join(to, f"run-{run_id}"), threshold, limit,
                     shard_rows, rounds, threads)
    if beam_run.dry_run:
        run_pipeline(lambda p: build_pairs_pipeline(p, plan), beam_run, "dedup")
        return None

    check_target(to)
    from pipeline.search.source import DatasetVectors
    source = DatasetVectors(output)  # the dataset's checks, one line each
    source.check_parts()
    rows = source.num_rows()
    from transforms.dataset import FolderLock
    existed = FileSystems.exists(to) if is_local(to) else True
    lock = FolderLock(join(to, LOCK), redact(to))
    lock.acquire(run_id)  # a second writer is refused before any work
    try:
        return _dedup_locked(plan, beam_run, to, run_id, rows, estimate, say)
    except BaseException:
        _delete_tree(plan.work)
        raise
    finally:
        lock.release(run_id)
        if not existed and not _children(to):
            _delete_tree(to)  # made only for the lock: nothing half-made stays


def _dedup_locked(plan: DedupPlan, beam_run: BeamRun, to: str, run_id: str, rows: int,
                  estimate: bool, say: Callable[[str], None]) -> dict:
    from pipeline.search.query import open_search
    output, index_dir, threshold, limit = (plan.output, plan.index_dir, plan.threshold,
                                           plan.max_pairs)
    built_index = False
    if not _index_exists(index_dir):
        say(f"no index in {redact(index_dir)}: building one first "
            "(as `mobilenet-embed index OUT` does)")
        from pipeline.search.api import build_dataset_index
        build_dataset_index(output, to=index_dir, progress=LOG.info)
        built_index = True
    searcher = open_search(output, index_dir)
    if searcher.stale:
        raise SearchError(searcher.stale)
    index_infos = searcher.index.infos
    started = time.monotonic()
    guess = None
    if estimate:
        searcher.index.search_harder(SEARCH_EFFORT)  # as the workers will search
        guess = estimate_pairs(searcher.index, output, threshold, rows)
        if guess["expected_pairs"] > limit:
            raise SearchError(
                f"about {guess['expected_pairs']:,} pairs expected at --threshold "
                f"{threshold} (from {guess['sampled_rows']} sampled rows of {rows:,}), "
                f"over --max_pairs {limit:,}: raise --threshold or --max_pairs "
                "(or --max_memory)")
    del searcher
    seconds = {"estimate_s": round(time.monotonic() - started, 3)}
    try:
        t = time.monotonic()
        run_pipeline(lambda p: build_pairs_pipeline(p, plan), beam_run, "dedup")
        seconds["pairs_and_rounds_1_s"] = round(time.monotonic() - t, 3)
        step = 1
        while _read_stat(plan.work, f"violations-{step}"):
            step += 1
            t = time.monotonic()
            run_pipeline(lambda p, s=step: build_rounds_pipeline(p, plan, s),
                         beam_run, "dedup")
            seconds[f"rounds_{step}_s"] = round(time.monotonic() - t, 3)
    except PairsOverLimit as e:  # raised in this process by an in-memory runner
        raise SearchJobFailed(str(e)) from None
    stats = {name: _read_stat(plan.work, name) for name in (
        "images", "exact_pairs", "near_pairs", "clusters", "images_in_clusters",
        "largest_cluster")}
    seconds["workers_read_s"] = _read_stat(plan.work, "read_s")
    seconds["workers_search_s"] = _read_stat(plan.work, "search_s")
    summary = {
        "images": stats["images"], "threshold": threshold,
        "exact_pairs": stats["exact_pairs"], "near_pairs": stats["near_pairs"],
        "clusters": stats["clusters"],
        "images_in_clusters": stats["images_in_clusters"],
        "largest_cluster": stats["largest_cluster"],
        "removable_duplicates": stats["images_in_clusters"] - stats["clusters"],
        "files": f"run-{run_id}",
        "engine": "beam", "runner": beam_run.describe(),
        "max_pairs": limit,
        "estimate": guess,
        "component_pipelines": step, "rounds_per_pipeline": plan.rounds,
        "shard_rows": plan.shard_rows,
        "index": {"folder": redact(index_dir), "built_now": built_index,
                  "index_key": index_infos.get("index_key"),
                  "rows": index_infos.get("rows"),
                  "tuned_search_parameters": index_infos.get("search_parameters"),
                  "search_effort": SEARCH_EFFORT},
        "seconds": seconds,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for name in ("_stats", "_cc"):
        _delete_tree(join(plan.work, name))
    write_json(join(to, SUMMARY), summary)  # the commit
    # Then what earlier runs left: their folders (a killed run's too) and the
    # single files of older versions. Nothing else in --to is touched.
    for name in _children(to):
        if name.startswith("run-") and name != f"run-{run_id}":
            _delete_tree(join(to, name))
        elif name in LEGACY_FILES:
            FileSystems.delete([join(to, name)])
    return summary
