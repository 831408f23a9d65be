"""The dataset-level calls the commands make (and a notebook can)."""
from __future__ import annotations

from typing import Callable, Optional

from pipeline.search.dedup import (DEFAULT_THRESHOLD, Duplicates, check_threshold,
                                   find_duplicates)
from pipeline.search.build import build_index_beam
from pipeline.search.errors import SearchError
from pipeline.search.index import DEFAULT_MAX_MEMORY, LOG, SearchIndex, build_index
from pipeline.search.query import Searcher, default_index_dir, open_search
from pipeline.search.source import DatasetVectors


def build_dataset_index(output: str, to: Optional[str] = None, index_key: str = "auto",
                        max_memory: int = DEFAULT_MAX_MEMORY, target_recall: float = 0.95,
                        rebuild: bool = False,
                        progress: Callable[[str], None] = LOG.info,
                        shards: Optional[int] = None,
                        beam_argv: Optional[list] = None,
                        layout: str = "merged") -> dict:
    """Index a dataset into `to` (default OUT/index): inverted files as a Beam
    pipeline (local FnApiRunner by default; Beam's flags in `beam_argv`,
    e.g. ["--runner", "DataflowRunner", ...] or ["--dry_run"]), Flat and
    HNSW in this process. Returns the index_infos.json written."""
    dataset = DatasetVectors(output)
    dataset.check_parts()
    return build_index_beam(dataset, to or default_index_dir(dataset), index_key=index_key,
                            max_memory=max_memory, target_recall=target_recall,
                            rebuild=rebuild, shards=shards, beam_argv=beam_argv,
                            layout=layout, progress=progress)


def _digests(dataset: DatasetVectors):
    for batch in dataset.iter_columns(["image_id", "content_sha256",
                                       "original_width", "original_height"]):
        ids, digests, w, h = (batch.column(i).to_pylist() for i in range(4))
        for image_id, digest, width, height in zip(ids, digests, w, h):
            yield image_id, digest, (width or 0) * (height or 0)


def find_dataset_duplicates(output: str, threshold: float = DEFAULT_THRESHOLD,
                            index_dir: Optional[str] = None,
                            max_pairs: Optional[int] = None) -> Duplicates:
    """Duplicates in memory, in this process: for small datasets and
    notebooks. `max_pairs` defaults to what DEFAULT_MAX_MEMORY holds. The
    `dedup` command (`dedup_beam.dedup_dataset`) runs on Beam and writes
    Parquet parts instead."""
    from pipeline.search.dedup_beam import default_max_pairs
    threshold = check_threshold(threshold)
    searcher: Searcher = open_search(output, index_dir)
    if searcher.stale:
        raise SearchError(searcher.stale)
    from pipeline.search.dedup_beam import SEARCH_EFFORT
    searcher.index.search_harder(SEARCH_EFFORT)
    return find_duplicates(searcher.index, searcher.dataset, _digests(searcher.dataset),
                           threshold, max_pairs or default_max_pairs(DEFAULT_MAX_MEMORY))


__all__ = ["build_dataset_index", "find_dataset_duplicates", "open_search",
           "SearchIndex"]
