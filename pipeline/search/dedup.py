"""Duplicates across a dataset: exact copies by content digest, then near
copies above a cosine threshold, found all-vs-all through the index in
batches (k-NN with a threshold, k grown where every neighbour passes), never
an N x N matrix. Pairs are grouped into clusters (connected components), each
with one representative: the largest image (most pixels), then the smallest
image id.

DEFAULT_THRESHOLD is measured, not guessed: tests/test_search_eval.py embeds
the 200 shared ImageNet photos and 14 transformed copies of each with the real
weights and prints precision and recall of the pairs against the threshold
(docs/search.md has the curve). There, no two distinct photos pair up from
0.74 on (the closest two sit at 0.732); 0.80 keeps a margin of 0.05 above
that, because in a larger collection the closest distinct photos come
closer, and still pairs 93% of mildly transformed copies with their
original directly (more through their clusters).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow as pa

from pipeline.search.errors import SearchError
from pipeline.search.index import SearchIndex
from pipeline.search.vectors import VectorSource

# Measured on real photos and transformed copies (see the module doc).
DEFAULT_THRESHOLD = 0.80
START_K = 16

PAIRS_SCHEMA = pa.schema([("image_id_a", pa.string()), ("image_id_b", pa.string()),
                          ("similarity", pa.float32()), ("kind", pa.string())])
CLUSTERS_SCHEMA = pa.schema([("cluster_id", pa.int64()), ("image_id", pa.string()),
                             ("is_representative", pa.bool_())])


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or not -1.0 <= float(threshold) <= 1.0 \
            or threshold != threshold:
        raise SearchError(f"--threshold must be a cosine similarity in [-1, 1], got {threshold}")
    return float(threshold)


def near_pairs(index: SearchIndex, source: VectorSource, threshold: float,
               batch_size: int = 2048, start_k: int = START_K
               ) -> Iterator[tuple[str, str, float]]:
    """(a, b, similarity) with a < b, each unordered pair once, for every two
    rows at or above `threshold` that the index finds."""
    threshold = check_threshold(threshold)
    seen: set[tuple[str, str]] = set()
    for ids, _, vectors in source.batches(batch_size):
        pending = np.arange(len(ids))
        k = min(start_k, index.ntotal)
        while len(pending):
            scores, rows = index.search_rows(vectors[pending], k)
            full = []
            for qi, srow, rrow in zip(pending, scores, rows):
                if k < index.ntotal and len(srow) and srow[-1] >= threshold and rrow[-1] >= 0:
                    full.append(qi)  # all k passed: there may be more
                    continue
                me = ids[qi]
                for s, r in zip(srow, rrow):
                    if r < 0 or s < threshold:
                        break
                    other = index.image_ids[int(r)].as_py()
                    if other == me:
                        continue
                    pair = (me, other) if me < other else (other, me)
                    if pair not in seen:
                        seen.add(pair)
                        yield pair[0], pair[1], float(min(s, 1.0))
            pending = np.array(full, dtype=np.int64)
            k = min(k * 4, index.ntotal)


def exact_groups(rows: Iterable[tuple[str, Optional[str]]]) -> list[list[str]]:
    """Image ids sharing a content digest, groups of two or more."""
    by_digest: dict[str, list[str]] = {}
    for image_id, digest in rows:
        if digest:
            by_digest.setdefault(digest, []).append(image_id)
    return [sorted(g) for g in by_digest.values() if len(g) > 1]


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)
        self.parent.setdefault(a, a)
        self.parent.setdefault(b, b)


def clusters(pairs: Iterable[tuple[str, str]], pixels: dict[str, int]) -> list[list[str]]:
    """Connected components of the pairs, largest first; each list starts
    with its representative (most pixels, then smallest id)."""
    uf = _UnionFind()
    for a, b in pairs:
        uf.union(a, b)
    groups: dict[str, list[str]] = {}
    for x in uf.parent:
        groups.setdefault(uf.find(x), []).append(x)
    out = []
    for members in groups.values():
        members.sort(key=lambda i: (-pixels.get(i, 0), i))
        out.append(members)
    out.sort(key=lambda m: (-len(m), m[0]))
    return out


@dataclasses.dataclass
class Duplicates:
    pairs: pa.Table  # PAIRS_SCHEMA
    clusters: pa.Table  # CLUSTERS_SCHEMA
    counts: dict


def find_duplicates(index: SearchIndex, source: VectorSource,
                    digests: Iterable[tuple[str, Optional[str], int]],
                    threshold: float = DEFAULT_THRESHOLD,
                    max_pairs: Optional[int] = None) -> Duplicates:
    """In one process, results in memory (a notebook, small data; the
    `dedup` command runs `dedup_beam` instead). `digests`: (image_id,
    content_sha256, pixels) of every row. More than `max_pairs` near pairs
    stop it with a SearchError instead of filling the memory."""
    threshold = check_threshold(threshold)
    digest_of, pixels, rows = {}, {}, 0
    for image_id, digest, size in digests:
        digest_of[image_id] = digest
        pixels[image_id] = size or 0
        rows += 1
    groups = exact_groups(digest_of.items())
    a, b, sim, kind = [], [], [], []
    for group in groups:
        group.sort(key=lambda i: (-pixels.get(i, 0), i))
        for other in group[1:]:
            a.append(group[0]), b.append(other), sim.append(1.0), kind.append("exact")
    exact_count = len(a)
    for x, y, s in near_pairs(index, source, threshold):
        dx, dy = digest_of.get(x), digest_of.get(y)
        if dx and dx == dy:
            continue  # the same bytes: already an exact pair of its group
        a.append(x), b.append(y), sim.append(s), kind.append("near")
        if max_pairs is not None and len(a) - exact_count > max_pairs:
            raise SearchError(f"more than {max_pairs:,} near-duplicate pairs at threshold "
                              f"{threshold}: raise the threshold or max_pairs")
    pairs = pa.table([pa.array(a, pa.string()), pa.array(b, pa.string()),
                      pa.array(sim, pa.float32()), pa.array(kind, pa.string())],
                     schema=PAIRS_SCHEMA)
    found = clusters(zip(a, b), pixels)
    cid, ids, rep = [], [], []
    for n, members in enumerate(found):
        for j, image_id in enumerate(members):
            cid.append(n), ids.append(image_id), rep.append(j == 0)
    cluster_table = pa.table([pa.array(cid, pa.int64()), pa.array(ids, pa.string()),
                              pa.array(rep, pa.bool_())], schema=CLUSTERS_SCHEMA)
    in_clusters = len(ids)
    counts = {
        "images": rows,
        "threshold": threshold,
        "exact_pairs": exact_count,
        "near_pairs": len(a) - exact_count,
        "clusters": len(found),
        "images_in_clusters": in_clusters,
        "largest_cluster": len(found[0]) if found else 0,
        "removable_duplicates": in_clusters - len(found),
    }
    return Duplicates(pairs, cluster_table, counts)
