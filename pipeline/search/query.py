"""Nearest neighbours of vectors, dataset rows or new images.

    from pipeline.search import open_search
    s = open_search("out/")                     # dataset + its index, checked
    s.by_images(["cat.jpg"], k=5)               # embedded like the dataset
    s.by_ids(["photos/cat.jpg"], k=5)           # rows already embedded
    s.by_vectors(my_vectors, k=5)               # anything of the same model
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from pipeline.search.errors import SearchError
from pipeline.search.index import Neighbor, SearchIndex
from pipeline.search.source import DatasetVectors, QueryEmbedder


@dataclasses.dataclass
class QueryResult:
    query: str  # as given: a path/URI or an image id
    neighbors: list[Neighbor]
    error: Optional[str] = None
    note: Optional[str] = None  # why fewer than k neighbours came back

    def to_json(self) -> dict:
        if self.error:
            return {"query": self.query, "error": self.error, "neighbors": []}
        answer = {"query": self.query, "neighbors": [
            {"image_id": n.image_id, "uri": n.uri, "score": round(n.score, 6)}
            for n in self.neighbors]}
        if self.note:
            answer["note"] = self.note
        return answer


def default_index_dir(dataset: DatasetVectors) -> str:
    return dataset.dataset.join("index")


def check_k(k: int) -> int:
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchError(f"--k must be a positive number of neighbours, got {k}")
    return int(k)


class Searcher:
    """A dataset and its index, checked to hold vectors of the same model."""

    def __init__(self, dataset: DatasetVectors, index: SearchIndex):
        self.dataset = dataset
        self.index = index
        recorded = index.infos.get("identity") or {}
        current = dataset.identity()
        if recorded != current:
            differing = sorted(k for k in set(recorded) | set(current)
                               if recorded.get(k) != current.get(k))
            raise SearchError(
                f"the index was built from other vectors than {dataset.dataset.shown} "
                f"holds now ({', '.join(differing)} differ); run "
                "`mobilenet-embed index OUT --rebuild`")
        rows = dataset.num_rows()
        if index.ntotal < rows:
            # A resumed run added rows: still usable, but say so.
            self.stale = (f"the index has {index.ntotal} rows, the dataset "
                          f"{rows}: run `mobilenet-embed index` to add them")
        elif index.ntotal > rows:
            # Parts were deleted: the index still finds rows no longer there.
            self.stale = (f"the index has {index.ntotal} rows, the dataset only "
                          f"{rows} (rows were removed): run `mobilenet-embed index` "
                          "to remove them from the index")
        else:
            self.stale = None
        self._embedder: Optional[QueryEmbedder] = None

    def by_vectors(self, vectors: np.ndarray, k: int = 10) -> list[list[Neighbor]]:
        return self.index.search(vectors, check_k(k))

    def by_ids(self, image_ids: Sequence[str], k: int = 10) -> list[QueryResult]:
        """Neighbours of rows already in the dataset (each without itself)."""
        k = check_k(k)
        found = self.dataset.rows(image_ids, ["feature_vector"])
        known = [i for i in image_ids if i in found]
        results = {}
        if known:
            vectors = np.stack([found[i]["feature_vector"] for i in known])
            for image_id, neighbors in zip(known, self.index.search(vectors, k + 1)):
                neighbors = [n for n in neighbors if n.image_id != image_id][:k]
                results[image_id] = QueryResult(image_id, neighbors,
                                                note=self._fewer(len(neighbors), k, 1))
        return [results.get(i) or QueryResult(
            i, [], f"image id {i!r} is not in the dataset") for i in image_ids]

    def by_images(self, uris: Sequence[str], k: int = 10, batch_size: int = 32
                  ) -> list[QueryResult]:
        """Neighbours of images embedded with the dataset's model; an image
        that cannot be read or decoded is a result with its error."""
        k = check_k(k)
        if self._embedder is None:
            self._embedder = QueryEmbedder(self.dataset.metadata)
        results = []
        for start in range(0, len(uris), batch_size):
            chunk = list(uris[start:start + batch_size])
            vectors, errors = self._embedder.embed(chunk)
            ok = [i for i, e in enumerate(errors) if e is None]
            found = self.index.search(vectors[ok], k) if ok else []
            by_pos = dict(zip(ok, found))
            results.extend(QueryResult(u, by_pos.get(i, []), errors[i],
                                       None if errors[i] else
                                       self._fewer(len(by_pos.get(i, [])), k, 0))
                           for i, u in enumerate(chunk))
        return results

    def _fewer(self, found: int, k: int, itself: int) -> Optional[str]:
        """One line saying why a query got fewer than k neighbours."""
        if found >= k:
            return None
        others = self.index.ntotal - itself
        if found >= others:
            return (f"{found} of --k {k} neighbours: the index holds only {others} "
                    f"{'other ' if itself else ''}rows")
        return (f"{found} of --k {k} neighbours: the index found no more even "
                "searching every list")


def open_search(output: str, index_dir: Optional[str] = None) -> Searcher:
    dataset = DatasetVectors(output)
    return Searcher(dataset, SearchIndex.open(index_dir or default_index_dir(dataset)))
