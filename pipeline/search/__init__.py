"""Similarity search over a dataset's feature vectors: build an index, query
it by vectors, dataset rows or new images, find duplicates, draw a gallery.

    from pipeline.search import build_dataset_index, open_search, find_dataset_duplicates
    build_dataset_index("out/")                 # out/index/, recall measured
    s = open_search("out/")
    s.by_images(["cat.jpg"], k=5)[0].neighbors  # [Neighbor(image_id, uri, score, row)]
    dups = find_dataset_duplicates("out/")      # .pairs, .clusters (Arrow), .counts

Every problem a user can fix raises `SearchError` with a one-line message.
"""
from pipeline.search.errors import SearchError
from pipeline.search.index import (DEFAULT_MAX_MEMORY, Neighbor, SearchIndex,
                                   build_index, choose_index, parse_size)
from pipeline.search.vectors import ArrayVectors, normalize

_DATASET_CALLS = ("build_dataset_index", "find_dataset_duplicates", "open_search")


def __getattr__(name):
    # The dataset-level calls import the dataset reader (and Beam) only when
    # used: the index library alone works on any vectors.
    if name in _DATASET_CALLS:
        from pipeline.search import api
        return getattr(api, name)
    raise AttributeError(name)

__all__ = ["SearchError", "SearchIndex", "Neighbor", "ArrayVectors", "normalize",
           "build_index", "choose_index", "parse_size", "DEFAULT_MAX_MEMORY",
           "build_dataset_index", "open_search", "find_dataset_duplicates"]
