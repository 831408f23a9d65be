"""The on-disk cache of frozen two-output graphs, keyed by what shapes them
(weights, variant, graph files, the TensorFlow that built them). A later
process (another worker, the next run) imports a cached graph in a second
instead of loading and fusing the SavedModels again."""
from __future__ import annotations

import hashlib
import json
import logging
import os

from transforms.model.cache import cache_root, file_digest, version, write_entry_atomic
from transforms.model.spec import ModelSpec

LOG = logging.getLogger(__name__)


# Bump when the frozen graphs built here change, so old caches are ignored.
_GRAPH_FORMAT = "2"


def key(*parts: str) -> str:
    """Cache key of a frozen graph: what shapes it, and the TF that built it."""
    return hashlib.sha256("|".join((_GRAPH_FORMAT, version("tensorflow")) + parts)
                          .encode()).hexdigest()[:32]


def random_cache_path(spec: ModelSpec, variant) -> str:
    return os.path.join(cache_root(), "graphs", key(
        "random", variant.name, str(spec.seed), version("keras")))


def directories_cache_path(variant, paths: list[str], digest: str) -> str:
    graphs = [file_digest(os.path.join(p, "saved_model.pb")) for p in paths]
    return os.path.join(cache_root(), "graphs",
                        key(digest, variant.name, *graphs))


def read_graph(path: str):
    from transforms.model.fusion import FrozenGraph
    try:
        with open(path + ".json") as f:
            info = json.load(f)
        with open(path + ".pb", "rb") as f:
            return FrozenGraph.from_bytes(f.read(), info)
    except Exception:  # absent or damaged (any parse error): rebuild
        return None


def write_graph(path: str, frozen) -> None:
    """Best effort and atomic: a reader sees a whole cache entry or none."""
    data, info = frozen.to_bytes()
    write_entry_atomic(path, {".pb": data}, info, "the frozen model")
