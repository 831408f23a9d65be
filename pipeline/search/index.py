"""Build, tune, measure and open a faiss index of a dataset's feature vectors.

Vectors are L2-normalized and searched by inner product, so every score is a
cosine similarity in [-1, 1]. `build_index` picks the index type from the
row count and a memory budget (`choose_index`), streams the vectors in twice
(a sample for training and recall queries, then everything), measures
recall@1 and recall@10 against exact search on held-out queries, tunes
nprobe / efSearch until recall@10 reaches the target, times single queries,
and commits the files atomically: they go into a fresh folder and
`index_infos.json`, written last, names it.

Layout of DIR (default OUT/index):
    index_infos.json      what was built, how, and what it measured
    <build_id>/index.faiss
    <build_id>/rows.parquet   row -> image_id, uri (faiss labels are rows)
    <build_id>/vectors.f32    float32 [rows, d], only for compressed indexes:
                              candidates are re-ranked on the exact vectors
  and for inverted files built on Beam (pipeline/search/build.py):
    <build_id>/lists.ivfdata  the merged inverted lists, on disk (layout merged)
    <build_id>/shards/*.faiss the shards as added (kept to grow the index;
                              searched as one with layout stacked)
    <build_id>/trained.faiss  the trained, empty index (the quantizer)
    _index.lock               held by the one run writing DIR
    _work/<plan>/             a running (or killed) Beam build's area
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import re
import resource
import shutil
import tempfile
import time
import uuid
from typing import Callable, Optional

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.search.errors import SearchError, check_local_target
from pipeline.search.vectors import VectorSource, normalize
from transforms.uris import is_local

LOG = logging.getLogger(__name__)

INDEX_INFOS = "index_infos.json"
FORMAT_VERSION = 1
METRIC = "inner product on L2-normalized float32 vectors (cosine similarity)"

# auto's thresholds. Exact search over 20k x 1280 floats is a few ms a
# query; HNSW beyond ~200k rows takes too long to build on a small machine
# (measured: benchmarks/search.py, docs/search.md).
FLAT_MAX_ROWS = 20_000
HNSW_MAX_ROWS = 200_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
GIB = 1 << 30
# Share of --max_memory for the index itself; the rest covers building it
# (training sample, a batch, recall queries) and the process (the benchmark
# records the peak: docs/search.md).
INDEX_SHARE = 0.7
DEFAULT_MAX_MEMORY = 8 * GIB
RECALL_K = 10
RECALL_QUERIES = 1000
LATENCY_QUERIES = 200
TRAIN_POINTS_PER_LIST = 40  # faiss warns under 39 training points per list
# Steps of about 25%: the cost of a search grows with nprobe/efSearch, so the
# first value that reaches the target should not overshoot it by much.
NPROBE_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96,
               128, 160, 192, 256, 320, 384, 512, 768, 1024, 2048, 4096, 8192)
EF_SEARCH_GRID = (16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 384,
                  512, 1024, 2048)


# --- choosing ------------------------------------------------------------------

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'8G', '8GiB', '512M', '1.5g', '1000000' -> bytes (powers of 1024)."""
    match = _SIZE.match(str(text))
    if not match:
        raise SearchError(f"--max_memory {text!r} is not a size (e.g. 8G, 512M)")
    value = float(match.group(1)) * 1024 ** "_kmgt".index(
        (match.group(2) or "_").lower())
    if value < 1:
        raise SearchError(f"--max_memory {text!r} must be positive")
    return int(value)


@dataclasses.dataclass(frozen=True)
class Choice:
    key: str  # a faiss index_factory string
    rerank: bool  # compressed codes: re-rank candidates on the exact vectors
    reason: str
    estimated_bytes: int


def ivf_lists(n: int) -> int:
    """About 2 sqrt(n) lists (a power of two), at least 40 training points
    each. Measured on 1M x 1280 in one run: 2048 lists reached recall@10
    0.995 at nprobe 2 with a single-query p50 of 1.7 ms, where 1024 lists
    needed nprobe 5 for 0.963 (docs/search.md)."""
    nlist = 1 << max(4, round(math.log2(max(1.0, 2 * math.sqrt(n)))))
    while nlist > 16 and nlist * TRAIN_POINTS_PER_LIST > n:
        nlist //= 2
    return nlist


def estimate_bytes(key: str, n: int, d: int) -> int:
    """Memory the index holds once built (the part that grows with n)."""
    ids = 8 * n  # IVF list ids / HNSW levels, roughly
    if key == "Flat":
        return 4 * d * n
    if key.startswith("HNSW"):
        m = int(re.match(r"HNSW(\d+)", key).group(1))
        return 4 * d * n + 2 * m * 4 * n + ids
    nlist = int(re.match(r"IVF(\d+)", key).group(1)) if key.startswith("IVF") else 0
    centroids = 4 * d * nlist
    if key.endswith(",Flat"):
        return 4 * d * n + ids + centroids
    if key.endswith(",SQ8"):
        return d * n + ids + centroids
    pq_match = re.search(r",PQ(\d+)", key)
    if pq_match:
        m = int(pq_match.group(1))
        return m * n + ids + centroids + 4 * d * 256
    return 4 * d * n  # unknown: assume full vectors


def choose_index(n: int, d: int, max_memory: int = DEFAULT_MAX_MEMORY) -> Choice:
    """auto: exact search while it is cheap, a graph while it builds fast
    enough, then inverted lists over 8-bit codes whose candidates are
    re-ranked on the exact vectors (kept on disk), and product-quantized
    codes when even 8-bit codes do not fit `max_memory`.

    Inverted lists over the full float vectors (IVF…,Flat) are not chosen:
    measured on 1M x 1280 (benchmarks/search.py, docs/search.md), 8-bit codes
    with exact re-ranking reached the same recall with half the single-query
    latency and a third of the peak memory, in about the same build time.
    INDEX_SHARE of the budget goes to the index; the rest covers building it
    (training sample, a batch, recall queries) and the process itself."""
    budget = int(max_memory * INDEX_SHARE)
    need = estimate_bytes("Flat", n, d)
    if n <= FLAT_MAX_ROWS and need <= budget:
        return Choice("Flat", False, f"{n} rows <= {FLAT_MAX_ROWS}: exact search", need)
    key = f"HNSW{HNSW_M},Flat"
    need = estimate_bytes(key, n, d)
    if n <= HNSW_MAX_ROWS and need <= budget:
        return Choice(key, False, f"{n} rows <= {HNSW_MAX_ROWS}: graph (HNSW)", need)
    nlist = ivf_lists(n)
    key = f"IVF{nlist},SQ8"
    need = estimate_bytes(key, n, d)
    if need <= budget:
        return Choice(key, True, f"{n} rows: inverted lists of 8-bit codes, re-ranked "
                      f"on the exact vectors on disk ({_gib(need)} of a {_gib(budget)} "
                      "index budget)", need)
    m = _pq_subquantizers(d)
    key = f"IVF{nlist},PQ{m}"
    need = estimate_bytes(key, n, d)
    if need <= budget:
        return Choice(key, True, f"8-bit codes exceed the index budget {_gib(budget)}: "
                      f"{m}-byte product-quantized codes, re-ranked on the exact "
                      "vectors on disk", need)
    raise SearchError(f"{n} vectors of {d} dims do not fit --max_memory "
                      f"{_gib(max_memory)} even as {m}-byte codes ({_gib(need)} "
                      f"for the index, {INDEX_SHARE:.0%} of the budget); raise --max_memory")


def _pq_subquantizers(d: int) -> int:
    for m in (d // 8, d // 10, d // 16, 64, 32, 16, 8):
        if m and d % m == 0:
            return m
    return 8


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _is_compressed(key: str) -> bool:
    return bool(re.search(r"(^|,)(PQ|SQ|LSH|OPQ|RQ|LSQ)", key))


def _checked_key(key: str, d: int) -> faiss.Index:
    if re.search(r"(^|,)IDMap", key):
        raise SearchError(f"--index_key {key!r}: IDMap is not needed and not "
                          "supported (the index numbers its rows itself)")
    try:
        index = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    except Exception as e:  # faiss raises RuntimeError with a C++ trace
        raise SearchError(f"--index_key {key!r} is not a faiss index factory "
                          f"string for {d} dims ({_first_line(e)})") from None
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None and ivf.nlist < 1:
        raise SearchError(f"--index_key {key!r}: an inverted file needs at least one list")
    return index


@contextlib.contextmanager
def faiss_quiet():
    """faiss's on-disk inverted lists print progress with printf (to fd 1):
    kept off stdout, which carries the commands' JSON."""
    import sys
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def read_faiss(path: str) -> faiss.Index:
    """An index file; a Beam build's inverted lists (lists.ivfdata) are
    found next to it wherever the folder was copied to."""
    with faiss_quiet():
        return faiss.read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR)


def _first_line(e: BaseException) -> str:
    """faiss's errors carry a C++ location first; the reason is the last line."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(e).__name__
    text = re.sub(r"^Error in .*? at \S+: ", "", text)
    return re.sub(r"^Error: '.*?' failed: ", "", text)[:200]


def check_trainable(key: str, n: int, d: int) -> None:
    """k-means needs at least as many points as centroids: inverted lists
    (nlist) and product quantizers (256 per sub-quantizer). Said before
    minutes of training find it out."""
    ivf = re.search(r"IVF(\d+)", key)
    need = int(ivf.group(1)) if ivf else 0
    if re.search(r"(^|,)(OPQ|PQ)\d+", key):
        need = max(need, 256)
    pca = re.search(r"(^|,)PCAW?R?(\d+)", key)
    if pca:  # a projection to m dims is estimated from at least m points
        need = max(need, int(pca.group(2)))
    if n < need:
        raise SearchError(f"--index_key {key!r} cannot be built on {n} vectors of {d} "
                          f"dims: its training needs at least {need} vectors")


@contextlib.contextmanager
def unbuildable(key: str, n: int, d: int):
    """A faiss error while training or adding: the key cannot be built on
    this data (too few training points, a projection larger than the
    input...): one SearchError."""
    try:
        yield
    except RuntimeError as e:
        raise SearchError(f"--index_key {key!r} cannot be built on {n} vectors of "
                          f"{d} dims: {_first_line(e)}") from None


# --- the opened index ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Neighbor:
    image_id: str
    uri: str
    score: float  # cosine similarity
    row: int


class SearchIndex:
    """An index opened for search: `search(vectors, k)` returns the k best
    rows per query with cosine similarities, best first."""

    def __init__(self, index: faiss.Index, image_ids: pa.Array, uris: pa.Array,
                 infos: dict, rerank_vectors: Optional["RowReader"] = None):
        self.index = index
        self.image_ids = image_ids
        self.uris = uris
        self.infos = infos
        self.rerank_vectors = rerank_vectors
        self.params = dict(infos.get("search_parameters") or {})
        self.candidates_per_k = (infos.get("rerank") or {}).get("candidates_per_k", 1)
        self._apply(self.params)

    @property
    def ntotal(self) -> int:
        return self.index.ntotal

    @property
    def dim(self) -> int:
        return self.index.d

    @classmethod
    def open(cls, folder: str) -> "SearchIndex":
        """The index committed in `folder` (local or gs://)."""
        local = _local_folder(folder)
        infos = read_infos(local)
        if infos is None:
            raise SearchError(f"no index in {folder} ({INDEX_INFOS} is missing); "
                              "build one with `mobilenet-embed index OUT`")
        files = os.path.join(local, infos["files"])
        try:
            if infos.get("layout") == "stacked":
                from pipeline.search.build import open_stacked
                index = open_stacked(os.path.join(files, "index.faiss"),
                                     infos.get("stacked_shards") or [])
            else:
                index = read_faiss(os.path.join(files, "index.faiss"))
            rows = pq.read_table(os.path.join(files, "rows.parquet"))
        except Exception as e:  # pylint: disable=broad-except
            raise SearchError(f"the index in {folder} cannot be read "
                              f"({type(e).__name__}: {str(e).strip()[:200]}); "
                              "build it again with `mobilenet-embed index`") from None
        vectors = None
        if infos.get("rerank"):
            vectors = RowReader(os.path.join(files, "vectors.f32"), index.d)
        return cls(index, rows.column("image_id").combine_chunks(),
                   rows.column("uri").combine_chunks(), infos, vectors)

    def _apply(self, params: dict) -> None:
        space = faiss.ParameterSpace()
        for name, value in params.items():
            if name == "candidates_per_k":
                self.candidates_per_k = int(value)
            else:
                space.set_index_parameter(self.index, name, value)

    def search_harder(self, factor: int) -> dict:
        """Multiply the tuned search effort (nprobe, capped at the number of
        lists; efSearch; re-ranked candidates) by `factor`: for a pass that
        must miss less than queries tuned to --target_recall do (dedup).
        Returns the parameters now in force."""
        params = dict(self.params)
        if "nprobe" in params:
            ivf = faiss.try_extract_index_ivf(self.index)
            limit = ivf.nlist if ivf is not None else int(params["nprobe"]) * factor
            params["nprobe"] = min(limit, int(params["nprobe"]) * factor)
        if "efSearch" in params:
            params["efSearch"] = int(params["efSearch"]) * factor
        if self.rerank_vectors is not None:
            params["candidates_per_k"] = max(1, self.candidates_per_k) * factor
        self.params = params
        self._apply(params)
        return params

    def search_rows(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each [n, k']: k' = min(k, rows in the index);
        rows are -1 where fewer were found (an IVF probing empty lists)."""
        if k < 1:
            raise SearchError(f"k must be at least 1, got {k}")
        queries = normalize(vectors)
        if queries.shape[1] != self.dim:
            raise SearchError(f"query vectors have {queries.shape[1]} dims, the "
                              f"index has {self.dim}")
        k = min(k, self.ntotal)
        if "efSearch" in self.params:
            faiss.ParameterSpace().set_index_parameter(
                self.index, "efSearch", max(int(self.params["efSearch"]), k))
        if self.rerank_vectors is None:
            scores, rows = self.index.search(queries, k)
            return scores, rows
        candidates = min(self.ntotal, k * max(1, self.candidates_per_k))
        _, found = self.index.search(queries, candidates)
        return _rerank(queries, found, self.rerank_vectors, k)

    def search_rows_full(self, vectors: np.ndarray, k: int, max_factor: int = 1024
                         ) -> tuple[np.ndarray, np.ndarray]:
        """search_rows, and for each query that got fewer than min(k, ntotal)
        rows (an IVF probing too few lists, too few re-ranked candidates) the
        search again with the effort doubled, up to `max_factor` times the
        tuned one (an IVF then probes every list). The tuned parameters are
        restored afterwards."""
        scores, rows = self.search_rows(vectors, k)
        want = min(k, self.ntotal)
        short = np.flatnonzero((rows >= 0).sum(axis=1) < want)
        if not len(short):
            return scores, rows
        tuned, per_k = dict(self.params), self.candidates_per_k
        factor = 2
        try:
            while len(short) and factor <= max_factor:
                self.params, self.candidates_per_k = dict(tuned), per_k
                self.search_harder(factor)
                s2, r2 = self.search_rows(np.asarray(vectors)[short], k)
                scores[short], rows[short] = s2, r2
                short = short[(r2 >= 0).sum(axis=1) < want]
                factor *= 2
        finally:
            self.params, self.candidates_per_k = tuned, per_k
            self._apply(tuned)
        return scores, rows

    def search(self, vectors: np.ndarray, k: int = 10) -> list[list[Neighbor]]:
        """The k best rows of each query; where the tuned search finds fewer
        than min(k, ntotal), it searches harder (search_rows_full)."""
        scores, rows = self.search_rows_full(vectors, k)
        return [[Neighbor(self.image_ids[r].as_py(), self.uris[r].as_py(),
                          float(s), int(r)) for s, r in zip(srow, rrow) if r >= 0]
                for srow, rrow in zip(scores, rows)]

    def row_of(self, image_ids: list[str]) -> dict[str, int]:
        wanted = set(image_ids)
        return {v: i for i, v in enumerate(self.image_ids.to_pylist()) if v in wanted}


class RowReader:
    """Rows of a float32 [n, d] file on disk, read with pread: re-ranking
    touches a few rows per query, and (unlike a memory map, whose read-ahead
    maps whole neighbourhoods into the process) only those are read."""

    def __init__(self, path: str, dim: int):
        self.path, self.dim = path, dim
        self.row_bytes = 4 * dim
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.dim), np.float32)
        for i, r in enumerate(rows):
            out[i] = np.frombuffer(os.pread(self.fd, self.row_bytes, int(r) * self.row_bytes),
                                   np.float32)
        return out

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


def _rerank(queries: np.ndarray, found: np.ndarray, vectors: RowReader, k: int
            ) -> tuple[np.ndarray, np.ndarray]:
    """Exact scores for the candidates (read from the vectors on disk), best k."""
    n = len(queries)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    rows = np.full((n, k), -1, dtype=np.int64)
    for i in range(n):
        cand = np.unique(found[i][found[i] >= 0])  # sorted: sequential reads
        if not len(cand):
            continue
        exact = vectors.rows(cand) @ queries[i]
        best = np.argsort(-exact, kind="stable")[:k]
        scores[i, :len(best)] = exact[best]
        rows[i, :len(best)] = cand[best]
    return scores, rows


# --- files ---------------------------------------------------------------------

def read_infos(folder: str) -> Optional[dict]:
    path = os.path.join(folder, INDEX_INFOS)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            infos = json.load(f)
        infos["files"]  # pylint: disable=pointless-statement
        return infos
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SearchError(f"{path} cannot be read ({type(e).__name__}); delete "
                          f"{folder} and build the index again") from None


def _write_json(path: str, payload: dict) -> None:
    # The dataset's atomic writer; imported here, as it brings in Beam.
    from pipeline.search.files import write_json
    write_json(path, payload)


def _is_remote(path: str) -> bool:
    return not is_local(path)


_DOWNLOADED: dict[str, str] = {}


def _local_folder(folder: str) -> str:
    """A local copy of a gs:// index folder (downloaded once per process)."""
    if not _is_remote(folder):
        return folder
    if folder not in _DOWNLOADED:
        _DOWNLOADED[folder] = download_index(folder)
    return _DOWNLOADED[folder]


class _BuildVanished(Exception):
    """A build's files went away while they were copied (a rebuild's commit)."""


def download_index(folder: str, infos: Optional[dict] = None, attempts: int = 5) -> str:
    """A local copy of the build a gs:// index folder names. A reader never
    sees a half-deleted build: when the build named by `infos` (default: the
    pointer read now) vanishes while it is copied, because an `index
    --rebuild` committed another, the pointer is read again and the build it
    names now is copied (up to `attempts` times)."""
    for _ in range(attempts):
        if infos is None:
            infos = _read_pointer(folder)
        local = tempfile.mkdtemp(prefix="mobilenet-embed-index-")
        try:
            _download_build(folder, infos, local)
            return local
        except _BuildVanished:
            shutil.rmtree(local, ignore_errors=True)
            infos = None
    raise SearchError(f"the index in {folder} was replaced {attempts} times while it was "
                      "read (an `index` run committing builds); try again when it is done")


def _read_pointer(folder: str) -> dict:
    from apache_beam.io.filesystems import FileSystems
    infos_uri = _join(folder, INDEX_INFOS)
    if not FileSystems.exists(infos_uri):
        raise SearchError(f"no index in {folder} ({INDEX_INFOS} is missing); "
                          "build one with `mobilenet-embed index OUT`")
    probe = tempfile.mkdtemp(prefix="mobilenet-embed-index-")
    try:
        _copy_uri(infos_uri, os.path.join(probe, INDEX_INFOS))
        return read_infos(probe)
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _download_build(folder: str, infos: dict, local: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    files = infos["files"]
    base = folder.rstrip("/")
    os.makedirs(os.path.join(local, files))
    found = FileSystems.match([f"{base}/{files}/**"])[0].metadata_list
    if not any(m.path.endswith("/index.faiss") for m in found):
        raise _BuildVanished(files)
    for m in found:
        if "/shards/" in m.path and infos.get("layout") != "stacked":
            continue  # a merged Beam build's shards: only for growing it
        parts = [local, files] + (["shards"] if "/shards/" in m.path else [])
        os.makedirs(os.path.join(*parts), exist_ok=True)
        try:
            _copy_uri(m.path, os.path.join(*parts, m.path.rsplit("/", 1)[-1]))
        except Exception as e:  # pylint: disable=broad-except
            if FileSystems.exists(m.path):
                raise
            raise _BuildVanished(files) from e
    # The pointer this copy answers to (the build's own infos, if present).
    with open(os.path.join(local, INDEX_INFOS), "w", encoding="utf-8") as f:
        json.dump(infos, f)


def _copy_uri(source: str, target: str) -> None:
    from apache_beam.io.filesystems import FileSystems
    if _is_remote(target):
        with open(source, "rb") as src, FileSystems.create(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    else:
        with FileSystems.open(source) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)



# --- the index folder: one writer, checked, nothing half-made ---------------------

LOCK = "_index.lock"


def check_target(to: str) -> bool:
    """A folder an index can be written to; True when this call created it.
    A file, a path under a file or a place that cannot be written is one
    SearchError naming `to`."""
    if _is_remote(to):
        return False
    check_local_target(to)
    created = not os.path.exists(to)
    try:
        os.makedirs(to, exist_ok=True)
        probe = os.path.join(to, f".write-test-{uuid.uuid4().hex[:8]}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        if created:
            shutil.rmtree(to, ignore_errors=True)
        raise SearchError(f"cannot write the index to {to}: "
                          f"{e.strerror or type(e).__name__}") from None
    return created


@contextlib.contextmanager
def locked_target(to: str, progress: Callable[[str], None] = LOG.info):
    """One writer per index folder (`<to>/_index.lock`, the dataset's lock
    semantics: a second run is refused, a dead run's lock taken over).
    Build folders no committed index names (a killed run's) are removed.
    A folder this run created is removed again if the run fails."""
    from transforms.dataset import DatasetError, FolderLock
    created = check_target(to)
    lock = FolderLock(_join(to, LOCK), to)
    run_id = uuid.uuid4().hex
    try:
        lock.acquire(run_id)
    except DatasetError as e:
        if created:
            shutil.rmtree(to, ignore_errors=True)
        raise SearchError(str(e)) from None
    done = False
    try:
        _remove_orphans(to, progress)
        yield
        done = True
    finally:
        lock.release(run_id)
        if not done and created and read_infos_or_none(to) is None:
            shutil.rmtree(to, ignore_errors=True)


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if _is_remote(folder) else os.path.join(folder, name)


def read_infos_or_none(to: str, progress: Optional[Callable[[str], None]] = None
                       ) -> Optional[dict]:
    """The committed infos of `to`, or None where there are none or they
    cannot be read (then the index is built again, said through progress)."""
    try:
        if _is_remote(to):
            from apache_beam.io.filesystems import FileSystems
            uri = _join(to, INDEX_INFOS)
            if not FileSystems.exists(uri):
                return None
            with FileSystems.open(uri) as f:
                infos = json.loads(f.read().decode("utf-8"))
            infos["files"]  # pylint: disable=pointless-statement
            return infos
        return read_infos(to)
    except (SearchError, OSError, ValueError, KeyError, TypeError) as e:
        if progress:
            progress(f"the index in {to} cannot be read ({str(e)[:120]}): "
                     "building it again")
        return None


def _remove_orphans(to: str, progress: Callable[[str], None]) -> None:
    """Build folders that no committed index_infos.json names: left by a
    run that was killed. Only called under the folder's lock."""
    infos = read_infos_or_none(to)
    keep = infos["files"] if infos else None
    if _is_remote(to):
        from apache_beam.io.filesystems import FileSystems
        base = to.rstrip("/")
        stale = [m.path for m in FileSystems.match([f"{base}/build-*/**"])[0].metadata_list
                 if keep is None or f"/{keep}/" not in m.path]
        if stale:
            FileSystems.delete(stale)
        return
    for name in os.listdir(to):
        if name.startswith("build-") and name != keep:
            progress(f"removing {name}, a build no index names (a run that ended early)")
            shutil.rmtree(os.path.join(to, name), ignore_errors=True)


# --- building --------------------------------------------------------------------

def build_index(source: VectorSource, to: str, index_key: str = "auto",
                max_memory: int = DEFAULT_MAX_MEMORY, target_recall: float = 0.95,
                rebuild: bool = False, recall_queries: int = RECALL_QUERIES,
                batch_size: int = 8192, seed: int = 0,
                progress: Callable[[str], None] = LOG.info) -> dict:
    """Index every row of `source` into the folder `to`; returns the infos.

    Where `to` already holds an index of the same vectors' maker and kind,
    only rows not in it are added (a resumed run); an index of another
    model is refused unless `rebuild`.
    """
    if not 0 < target_recall <= 1:
        raise SearchError(f"--target_recall must be in (0, 1], got {target_recall}")
    if index_key != "auto":
        _checked_key(index_key, source.dim)
    with locked_target(to, progress):
        return _build_in_process(source, to, index_key, max_memory, target_recall,
                                 rebuild, recall_queries, batch_size, seed, progress)


def _build_in_process(source: VectorSource, to: str, index_key: str, max_memory: int,
                      target_recall: float, rebuild: bool, recall_queries: int,
                      batch_size: int, seed: int, progress: Callable[[str], None]) -> dict:
    """build_index's work, in this process, under the folder's lock."""
    started = time.perf_counter()
    times: dict[str, float] = {}
    n, d = source.num_rows(), source.dim
    if n == 0:
        raise SearchError("the dataset has no rows to index")
    identity = source.identity()
    remote = _is_remote(to)
    work = tempfile.mkdtemp(prefix="mobilenet-embed-index-") if remote else to
    os.makedirs(work, exist_ok=True)
    existing = None if rebuild else read_infos_or_none(to, progress)
    if existing is not None and existing.get("identity") != identity:
        raise SearchError(
            f"the index in {to} was built from other vectors "
            f"({_identity_differences(existing.get('identity') or {}, identity)}); "
            "pass --rebuild to replace it, or --to another folder")

    if index_key == "auto":
        choice = choose_index(n, d, max_memory)
        if existing is not None and _family(existing["index_key"]) == _family(choice.key):
            # Keep the trained quantizer of a grown dataset: rows are added.
            choice = dataclasses.replace(choice, key=existing["index_key"])
    else:
        _checked_key(index_key, d)
        choice = Choice(index_key, _is_compressed(index_key), "--index_key",
                        estimate_bytes(index_key, n, d))
    incremental = (existing is not None and existing["index_key"] == choice.key
                   and existing.get("engine", "in-process") == "in-process")
    old_rows: dict[str, int] = {}
    old_index = None
    if incremental:
        try:
            old_files = os.path.join(_local_folder(to) if remote else work, existing["files"])
            old_index = faiss.read_index(os.path.join(old_files, "index.faiss"))
            old_ids = pq.read_table(os.path.join(old_files, "rows.parquet"),
                                    columns=["image_id"]).column("image_id").to_pylist()
            if len(old_ids) != old_index.ntotal or (choice.rerank and os.path.getsize(
                    os.path.join(old_files, "vectors.f32")) != 4 * d * len(old_ids)):
                raise ValueError("its files disagree on the number of rows")
            old_rows = {v: i for i, v in enumerate(old_ids)}
        except Exception as e:  # pylint: disable=broad-except
            progress(f"the index in {to} cannot be read ({_first_line(e)}): "
                     "building it again")
            incremental, old_rows, old_index = False, {}, None

    # Pass 1: the training sample and the recall queries (rows drawn at random).
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    num_queries = min(recall_queries, n)
    query_pos = np.sort(rng.choice(n, num_queries, replace=False))
    template = _checked_key(choice.key, d)
    ntrain = 0
    if not template.is_trained and not incremental:
        check_trainable(choice.key, n, d)
        ntrain = min(n, _training_points(choice.key, n))
    train_pos = np.sort(rng.choice(n, ntrain, replace=False)) if ntrain else np.empty(0, np.int64)
    queries = np.empty((num_queries, d), np.float32)
    query_ids: list[str] = []
    train = np.empty((ntrain, d), np.float32)
    seen_old = 0
    pos = 0
    for ids, _, vecs in source.batches(batch_size):
        if vecs.shape[1] != d:
            raise SearchError(f"vectors have {vecs.shape[1]} dims, expected {d}")
        stop = pos + len(ids)
        for target, wanted in ((queries, query_pos), (train, train_pos)):
            lo, hi = np.searchsorted(wanted, [pos, stop])
            if hi > lo:
                target[lo:hi] = vecs[wanted[lo:hi] - pos]
        lo, hi = np.searchsorted(query_pos, [pos, stop])
        query_ids.extend(ids[p - pos] for p in query_pos[lo:hi])
        if old_rows:
            seen_old += sum(1 for i in ids if i in old_rows)
        pos = stop
    if pos != n:
        raise SearchError(f"the dataset changed while it was read ({pos} rows, "
                          f"{n} expected); run index again")
    if incremental and seen_old != len(old_rows):
        progress(f"{len(old_rows) - seen_old} indexed rows are no longer in the "
                 "dataset: building the index again")
        incremental, old_rows = False, {}
        if not template.is_trained:
            ntrain = min(n, _training_points(choice.key, n))
            train = _sample_again(source, rng, n, ntrain, d, batch_size)
    times["sample_s"] = time.perf_counter() - t

    build_id = f"build-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    files = os.path.join(work, build_id)
    os.makedirs(files)
    try:
        t = time.perf_counter()
        if incremental:
            progress(f"adding to the existing {choice.key} index of {len(old_rows)} rows")
            index = old_index
        else:
            index = template
            if ntrain:
                progress(f"training {choice.key} on {ntrain} vectors")
                with unbuildable(choice.key, n, d):
                    index.train(train)
        del train
        times["train_s"] = time.perf_counter() - t

        # Pass 2: add new rows; exact top-k of the queries over every row.
        t = time.perf_counter()
        progress(f"adding {n - len(old_rows)} vectors to {choice.key} "
                 f"({'incremental' if incremental else 'new'}), "
                 f"exact search of {num_queries} recall queries alongside")
        exact = _ExactTopK(queries, RECALL_K + 1)
        new_ids: list[str] = []
        new_uris: list[str] = []
        vectors_file = None
        if choice.rerank:
            vectors_file = os.path.join(files, "vectors.f32")
            if incremental:
                shutil.copyfile(os.path.join(old_files, "vectors.f32"), vectors_file)
            out_vectors = open(vectors_file, "ab")
        next_row = len(old_rows)
        query_rows = np.full(num_queries, -1, np.int64)
        query_index = {q: i for i, q in enumerate(query_ids)}
        for ids, uris, vecs in source.batches(batch_size):
            rows = np.empty(len(ids), np.int64)
            new = np.ones(len(ids), bool)
            for j, image_id in enumerate(ids):
                old = old_rows.get(image_id)
                if old is None:
                    rows[j] = next_row
                    next_row += 1
                else:
                    rows[j], new[j] = old, False
                q = query_index.get(image_id)
                if q is not None:
                    query_rows[q] = rows[j]
            if new.any():
                fresh = np.ascontiguousarray(vecs[new])
                with unbuildable(choice.key, n, d):
                    index.add(fresh)
                if vectors_file:
                    out_vectors.write(fresh.tobytes())
                new_ids.extend(i for i, f in zip(ids, new) if f)
                new_uris.extend(u for u, f in zip(uris, new) if f)
            exact.update(vecs, rows)
        if vectors_file:
            out_vectors.close()
        if index.ntotal != n:
            raise SearchError(f"the dataset changed while it was indexed "
                              f"({index.ntotal} rows indexed, {n} expected); run index again")
        times["add_s"] = time.perf_counter() - t

        all_ids = (list(old_rows) if incremental else []) + new_ids
        all_uris = (pq.read_table(os.path.join(old_files, "rows.parquet"), columns=["uri"])
                    .column("uri").to_pylist() if incremental else []) + new_uris
        rows_table = pa.table({"image_id": pa.array(all_ids, pa.string()),
                               "uri": pa.array(all_uris, pa.string())})
        rerank_vectors = RowReader(vectors_file, d) if vectors_file else None
        rerank = {"exact": True, "candidates_per_k": _candidates_per_k(choice.key)} \
            if choice.rerank else None
        opened = SearchIndex(index, rows_table.column("image_id").combine_chunks(),
                             rows_table.column("uri").combine_chunks(),
                             {"rerank": rerank}, rerank_vectors)

        # Tune and measure.
        progress(f"measuring recall@10 against exact search; tuning to {target_recall}")
        t = time.perf_counter()
        gt_scores, gt_rows = exact.result()
        opened.infos["index_key"] = choice.key
        params, tuning, recall = _tune(opened, queries, query_rows, gt_scores,
                                       gt_rows, target_recall)
        times["tune_s"] = time.perf_counter() - t
        latency = _latency(opened, queries)

        faiss.write_index(index, os.path.join(files, "index.faiss"))
        pq.write_table(rows_table, os.path.join(files, "rows.parquet"))
        times["total_s"] = time.perf_counter() - started
        size = sum(os.path.getsize(os.path.join(files, f)) for f in os.listdir(files))
        infos = build_infos(
            build_id=build_id, choice=choice, index_key=index_key, rerank=rerank,
            params=params, target_recall=target_recall, recall=recall,
            num_queries=num_queries, tuning=tuning, latency=latency, rows=n, dim=d,
            identity=identity, times=times, size=size, max_memory=max_memory,
            recall_method=("held-out rows of the dataset as queries (each "
                           "excluded from its own results), against exact "
                           "inner-product search over every row; a neighbour "
                           "counts when its score reaches the exact k-th score"))
        infos.update({"engine": "in-process", "runner": None, "shards": 1,
                      "rows_added": len(new_ids), "incremental": incremental})
        _write_json(os.path.join(files, INDEX_INFOS), infos)
        _commit(work, to, build_id, infos)
    except BaseException:
        shutil.rmtree(files, ignore_errors=True)
        raise
    finally:
        if remote:
            shutil.rmtree(work, ignore_errors=True)
    if not infos["target_met"]:
        progress(f"warning: recall@10 {infos['recall_at_10']:.3f} is below the "
                 f"target {target_recall} at the largest search parameters tried")
    return infos


def build_infos(*, build_id: str, choice: "Choice", index_key: str, rerank, params: dict,
                target_recall: float, recall: dict, num_queries: int, tuning, latency: dict,
                rows: int, dim: int, identity: dict, times: dict, size: int,
                max_memory: int, recall_method: str) -> dict:
    """What every build records in index_infos.json, in-process or on Beam
    (each adds its own engine, shard and incremental fields)."""
    return {
        "format_version": FORMAT_VERSION,
        "files": build_id,
        "index_key": choice.key,
        "chosen_by": f"auto: {choice.reason}" if index_key == "auto" else "--index_key",
        "metric": METRIC,
        "rerank": rerank,
        "search_parameters": params,
        "target_recall_at_10": target_recall,
        "target_met": recall["recall_at_10"] >= target_recall,
        "recall_at_1": recall["recall_at_1"],
        "recall_at_10": recall["recall_at_10"],
        "recall_queries": num_queries,
        "recall_method": recall_method,
        "tuning": tuning,
        "latency_ms": latency,
        "rows": rows,
        "dimension": dim,
        "identity": identity,
        "model": identity.get("model"),
        "weights_sha256": identity.get("weights_sha256"),
        "build_seconds": {k: round(v, 3) for k, v in times.items()},
        "size_on_disk_bytes": size,
        "estimated_index_memory_bytes": choice.estimated_bytes,
        "max_memory_bytes": max_memory,
        # this process's peak RSS
        "peak_memory_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "faiss_version": faiss.__version__,
        "built_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _exists_remote(folder: str) -> bool:
    from apache_beam.io.filesystems import FileSystems
    return FileSystems.exists(folder.rstrip("/") + "/" + INDEX_INFOS)


def _commit(work: str, to: str, build_id: str, infos: dict) -> None:
    """index_infos.json, replaced last, names the new files; then the
    previous builds are removed. A reader sees the old index or the new."""
    if _is_remote(to):
        from apache_beam.io.filesystems import FileSystems
        base = to.rstrip("/")
        top = os.path.join(work, build_id)
        for root, _, names in os.walk(top):
            for name in names:
                rel = os.path.relpath(os.path.join(root, name), top).replace(os.sep, "/")
                _copy_uri(os.path.join(root, name), f"{base}/{build_id}/{rel}")
        previous = read_infos_or_none(to)
        keep = {build_id, previous["files"] if previous else build_id}
        _copy_uri(os.path.join(work, build_id, INDEX_INFOS), f"{base}/{INDEX_INFOS}")
        # The build just replaced stays until the next run's start: a reader
        # that read the old pointer a moment ago can still copy it.
        old = [m.path for m in FileSystems.match([f"{base}/build-*/**"])[0].metadata_list
               if not any(f"/{b}/" in m.path for b in keep)]
        if old:
            FileSystems.delete(old)
        return
    _write_json(os.path.join(to, INDEX_INFOS), infos)
    for name in os.listdir(to):
        if name.startswith("build-") and name != build_id:
            shutil.rmtree(os.path.join(to, name), ignore_errors=True)


def _family(key: str) -> str:
    return re.sub(r"^IVF\d+", "IVF", key)


def _training_points(key: str, n: int) -> int:
    nlist = int(re.match(r"IVF(\d+)", key).group(1)) if key.startswith("IVF") else 256
    points = nlist * TRAIN_POINTS_PER_LIST
    if re.search(r"PQ\d+", key):
        points = max(points, 256 * TRAIN_POINTS_PER_LIST)
    return min(n, points)


def _candidates_per_k(key: str) -> int:
    # 8-bit codes keep the order nearly exact: with 2k candidates re-ranked,
    # IVF1024,SQ8 matched IVF1024,Flat's recall at every nprobe on 1M rows
    # (docs/search.md). PQ codes are coarser; 8k is not measured here yet.
    return 2 if "SQ" in key else 8


def _sample_again(source, rng, n, ntrain, d, batch_size) -> np.ndarray:
    wanted = np.sort(rng.choice(n, ntrain, replace=False))
    out = np.empty((ntrain, d), np.float32)
    pos = 0
    for ids, _, vecs in source.batches(batch_size):
        lo, hi = np.searchsorted(wanted, [pos, pos + len(ids)])
        out[lo:hi] = vecs[wanted[lo:hi] - pos]
        pos += len(ids)
    return out


def _identity_differences(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new))
    diff = [f"{k}: {str(old.get(k))[:40]!r} vs {str(new.get(k))[:40]!r}"
            for k in keys if old.get(k) != new.get(k)]
    return "index vs dataset: " + "; ".join(diff)


class _ExactTopK:
    """Running exact top-k of a few queries over vectors streamed past."""

    def __init__(self, queries: np.ndarray, k: int):
        self.queries = queries
        self.k = k
        self.scores = np.full((len(queries), 0), -np.inf, np.float32)
        self.rows = np.full((len(queries), 0), -1, np.int64)

    def update(self, vectors: np.ndarray, rows: np.ndarray) -> None:
        scores = np.concatenate([self.scores, self.queries @ vectors.T], axis=1)
        labels = np.concatenate([self.rows, np.broadcast_to(rows, (len(self.queries), len(rows)))], axis=1)
        if scores.shape[1] > self.k:
            keep = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            scores = np.take_along_axis(scores, keep, axis=1)
            labels = np.take_along_axis(labels, keep, axis=1)
        self.scores, self.rows = scores, labels

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(-self.scores, axis=1, kind="stable")
        return (np.take_along_axis(self.scores, order, axis=1),
                np.take_along_axis(self.rows, order, axis=1))


def _without_self(scores: np.ndarray, rows: np.ndarray, self_rows: np.ndarray, k: int
                  ) -> np.ndarray:
    """Scores of each query's results without the query's own row, first k."""
    out = np.full((len(scores), k), -np.inf, np.float32)
    for i in range(len(scores)):
        keep = rows[i] != self_rows[i]
        s = scores[i][keep & (rows[i] >= 0)][:k]
        out[i, :len(s)] = s
    return out


def recall_at(approx: np.ndarray, exact: np.ndarray, k: int, tol: float = 1e-4) -> float:
    """Share of the approximate top-k whose score reaches the exact k-th
    score (ties between equal vectors count as found), averaged over queries
    that have at least k exact neighbours."""
    kth = exact[:, k - 1]
    valid = np.isfinite(kth)
    if not valid.any():
        return 1.0
    hits = (approx[valid, :k] >= kth[valid, None] - tol).sum(axis=1)
    return float(np.mean(hits / k))


def measure_recall(index: SearchIndex, queries: np.ndarray, query_rows: np.ndarray,
                   gt_scores: np.ndarray, gt_rows: np.ndarray) -> dict:
    """recall@1 and @10 of `index` for dataset rows used as queries, each
    without itself, against the exact top-k (gt_*, which include it)."""
    k = min(RECALL_K, index.ntotal - 1)
    if k < 1:
        return {"recall_at_1": 1.0, "recall_at_10": 1.0}
    scores, rows = index.search_rows(queries, k + 1)
    approx = _without_self(scores, rows, query_rows, k)
    exact = _without_self(gt_scores, gt_rows, query_rows, k)
    return {"recall_at_1": round(recall_at(approx, exact, 1), 4),
            "recall_at_10": round(recall_at(approx, exact, k), 4)}


def _tune(index: SearchIndex, queries, query_rows, gt_scores, gt_rows, target: float
          ) -> tuple[dict, list, dict]:
    """The cheapest search parameter that reaches the target recall@10."""
    key = index.infos.get("index_key") or ""
    ivf = faiss.try_extract_index_ivf(index.index)
    if ivf is not None:
        name, grid = "nprobe", [p for p in NPROBE_GRID if p <= ivf.nlist] or [ivf.nlist]
        if grid[-1] != ivf.nlist and ivf.nlist < NPROBE_GRID[-1]:
            grid.append(ivf.nlist)
    elif "HNSW" in type(index.index).__name__ or "HNSW" in key:
        name, grid = "efSearch", list(EF_SEARCH_GRID)
    else:
        return {}, [], measure_recall(index, queries, query_rows, gt_scores, gt_rows)
    tuning = []
    for value in grid:
        index.params = {name: value}
        index._apply(index.params)  # pylint: disable=protected-access
        recall = measure_recall(index, queries, query_rows, gt_scores, gt_rows)
        tuning.append({name: value, **recall})
        if recall["recall_at_10"] >= target:
            break
    return {name: value}, tuning, recall


def _latency(index: SearchIndex, queries: np.ndarray) -> dict:
    """Single-query search latency (one vector per call), milliseconds."""
    k = min(RECALL_K, index.ntotal)
    times = []
    for q in queries[:LATENCY_QUERIES]:
        t = time.perf_counter()
        index.search_rows(q[None, :], k)
        times.append((time.perf_counter() - t) * 1000)
    return {"p50": round(float(np.percentile(times, 50)), 3),
            "p95": round(float(np.percentile(times, 95)), 3),
            "queries": len(times), "k": k}
