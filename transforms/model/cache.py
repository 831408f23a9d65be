"""The model library's leaf helpers: where caches live, package versions,
file digests, atomic writes, one-line error text. Imports nothing of ours,
so every module of `transforms/model/` can use it."""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import tempfile
import uuid

LOG = logging.getLogger(__name__)


def cache_root() -> str:
    """MOBILENET_EMBED_CACHE_DIR, else a folder in the temp dir."""
    root = os.environ.get("MOBILENET_EMBED_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "mobilenet_embed_models")
    os.makedirs(root, exist_ok=True)
    return root


def version(module: str) -> str:
    """A package's version without importing it (importing TensorFlow takes
    seconds; `loading.cached_info` must not)."""
    names = {"tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-intel",
                            "tf-nightly")}.get(module, (module,))
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return importlib.import_module(module).__version__


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: str, record: dict, what: str) -> None:
    """Best effort: a reader sees the whole record or none; a cache that
    cannot be written costs a re-measurement, never the run."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex}"
        with open(temp, "w") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(temp, path)
    except OSError as e:
        LOG.warning("could not cache %s in %s: %s", what, path, e)


def write_entry_atomic(path: str, files: dict[str, bytes], record: dict,
                       what: str) -> None:
    """A cache entry of several files (`files`: extension -> bytes) plus
    `path.json`, written last: a reader that finds the .json finds the
    whole entry. Best effort, as `write_json_atomic`."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temp = f"{path}.{uuid.uuid4().hex}"
        for ext, data in files.items():
            with open(temp + ext, "wb") as f:
                f.write(data)
        with open(temp + ".json", "w") as f:
            json.dump(record, f)
        for ext in (*files, ".json"):
            os.replace(temp + ext, path + ext)
    except OSError as e:
        LOG.warning("could not cache %s in %s: %s", what, path, e)


def read_json(path: str):
    """The record at `path`, or None where it is absent or damaged."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
