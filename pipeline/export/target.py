"""An export target: where `--to` points, whether it can be written, who is
writing it, what it holds, and the atomic replace of a file export.

  <to>/_export.lock       one writer at a time (transforms.dataset.FolderLock)
  <to>/_export.manifest   JSON: format, dataset, model identity, rows, files
  <to>/_staging-<run>/    a file export being written (gone after commit)

A file export (vertex, bigquery files) is committed by moving the new files
into <to> under names holding the run id, writing the manifest (the commit
point), then deleting the previous set; files of ours that no manifest
names (an interrupted export's) go too. Files this command did not write,
or another model's or dataset's export, are refused unless --overwrite.
Stores with an embedded mode (LanceDB folder, Qdrant path, Milvus Lite
file) get the same lock and manifest beside them; servers are reached by
URL and hold the model in their table/collection metadata.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import json
import os
import re
from typing import Optional

from apache_beam.io.filesystems import FileSystems

from pipeline.search.errors import SearchError, check_local_target
from transforms.dataset import DatasetError, FolderLock, write_file_atomically
from transforms.sinks.records import IDENTITY_KEYS, identity_differences
from transforms.uris import is_local, join, redact

MANIFEST, LOCK, STAGING = "_export.manifest", "_export.lock", "_staging-"
FILE_FORMATS = ("vertex", "bigquery")
# What a file export's files are called in <to> (the run id keeps sets apart).
OUR_FILES = {"vertex": "embeddings-*.json", "bigquery": "rows-*.json"}
BQ_EXTRAS = ("schema.json", "vector_search.sql")
_URL = re.compile(r"^(https?|grpc|tcp|bq|bigquery)://", re.I)


@dataclasses.dataclass
class Target:
    fmt: str
    to: str
    kind: str  # files | lancedb | qdrant-local | qdrant-server | milvus-lite | milvus-server | bigquery-table

    @property
    def local(self) -> bool:
        return is_local(self.to) and self.kind not in ("qdrant-server", "milvus-server",
                                                       "bigquery-table")

    @property
    def embedded_single_process(self) -> bool:
        """Qdrant's local mode and Milvus Lite allow one process at a time."""
        return self.kind in ("qdrant-local", "milvus-lite")

    @property
    def folder(self) -> Optional[str]:
        """Where the lock and manifest live (None for servers)."""
        if self.kind in ("qdrant-server", "milvus-server", "bigquery-table"):
            return None
        if self.kind == "lancedb" and not (is_local(self.to) or self.to.startswith("gs://")):
            return None  # s3://, db:// (LanceDB Cloud): the store's own concurrency
        return self.to

    def meta_path(self, name: str) -> str:
        if self.kind == "milvus-lite":  # a file: lock and manifest beside it
            return f"{self.to}{name.replace('_export', '.export')}"
        return join(self.to, name)

    @property
    def shown(self) -> str:
        return redact(self.to)


def classify(fmt: str, to: str) -> Target:
    if fmt in FILE_FORMATS:
        if fmt == "bigquery" and (to.startswith(("bq://", "bigquery://"))):
            return Target(fmt, to.split("://", 1)[1], "bigquery-table")
        if _URL.match(to):
            raise SearchError(f"--to {to}: {fmt} files go to a folder (local or gs://)")
        return Target(fmt, _abs(to), "files")
    if fmt == "lancedb":
        return Target(fmt, _abs(to), "lancedb")
    if fmt == "qdrant":
        if _URL.match(to):
            return Target(fmt, to, "qdrant-server")
        if not is_local(to):
            raise SearchError(f"--to {to}: Qdrant takes a local folder or a server URL")
        return Target(fmt, _abs(to), "qdrant-local")
    if fmt == "milvus":
        if _URL.match(to):
            return Target(fmt, to, "milvus-server")
        if not is_local(to) or not to.endswith(".db"):
            raise SearchError(f"--to {to}: Milvus takes a Milvus Lite file (*.db) or "
                              "a server URL (http://host:19530)")
        return Target(fmt, _abs(to), "milvus-lite")
    raise SearchError(f"--format {fmt!r} is not known")


def _abs(path: str) -> str:
    if is_local(path):
        return os.path.abspath(os.path.expanduser(path))
    return path.rstrip("/")


def check_writable(target: Target) -> None:
    """One line, before any work, for a --to that cannot be written: a file
    where a folder goes (or the reverse), a path under a file, no permission."""
    if not target.local:
        return
    # Milvus Lite: a file (Milvus Lite 2) or a folder (3); the rest: folders.
    check_local_target(target.to, is_file=None if target.kind == "milvus-lite" else False)


def lock(target: Target) -> Optional[FolderLock]:
    if target.folder is None:
        return None
    return FolderLock(target.meta_path(LOCK), f"the export target {target.shown}")


def acquire(target: Target, run_id: str) -> Optional[FolderLock]:
    held = lock(target)
    if held is not None:
        if target.kind != "milvus-lite" and target.local:
            try:
                os.makedirs(target.to, exist_ok=True)
            except OSError as e:
                raise SearchError(f"--to {target.to}: cannot create it "
                                  f"({e.strerror or e})") from None
        try:
            held.acquire(run_id)
        except DatasetError as e:
            raise SearchError(str(e)) from None
    return held


def read_manifest(target: Target) -> Optional[dict]:
    if target.folder is None:
        return None
    path = target.meta_path(MANIFEST)
    try:
        with FileSystems.open(path) as f:
            return json.loads(f.read().decode("utf-8"))
    except Exception:  # absent (or unreadable: treated as foreign files below)
        return None


def write_manifest(target: Target, payload: dict) -> None:
    if target.folder is None:
        return
    payload = {**payload, "exported_at": dt.datetime.now(dt.timezone.utc)
               .isoformat(timespec="seconds")}
    write_file_atomically(target.meta_path(MANIFEST),
                          (json.dumps(payload, indent=2) + "\n").encode())


def check_previous(target: Target, identity: dict, overwrite: bool) -> Optional[dict]:
    """The previous export's manifest, refused (unless overwrite) where it
    came from another model or, for a file export, another dataset; a file
    target holding files this command did not write is refused too."""
    previous = read_manifest(target)
    if previous is not None and not overwrite:
        theirs = previous.get("identity", {})
        differing = identity_differences(identity, theirs)
        if target.kind == "files" and theirs.get("dataset") != identity.get("dataset"):
            differing.append(f"dataset {theirs.get('dataset')!r} vs "
                             f"{identity.get('dataset')!r}")
        if previous.get("format", target.fmt) != target.fmt:
            differing.append(f"format {previous.get('format')!r} vs {target.fmt!r}")
        if differing:
            raise SearchError(f"{target.shown} holds another export ({'; '.join(differing)}); "
                              "use --overwrite to replace it")
    if target.kind == "files" and not overwrite:
        foreign = [os.path.basename(p) for p in foreign_files(target, previous)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more"
                                              if len(foreign) > 3 else "")
            raise SearchError(f"{target.shown} holds files this command did not write "
                              f"({shown}); use an empty folder or --overwrite")
    return previous


def _list(folder: str) -> list[str]:
    try:
        return [m.path for m in FileSystems.match([join(folder, "*")])[0].metadata_list]
    except Exception:  # no such folder yet
        return []


def _ours(name: str, fmt: str) -> bool:
    return fnmatch.fnmatch(name, OUR_FILES[fmt]) or (fmt == "bigquery" and name in BQ_EXTRAS)


def foreign_files(target: Target, previous: Optional[dict]) -> list[str]:
    """Files in a file target that no export of ours wrote (sub-folders and
    our lock, manifest and staging aside)."""
    found = []
    for path in _list(target.to):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name in (MANIFEST, LOCK) or name.startswith(STAGING) or "/" in \
                path[len(target.to.rstrip("/")) + 1:].rstrip("/"):
            continue
        if is_local(path) and os.path.isdir(path):
            continue
        if previous is not None and _ours(name, previous.get("format", target.fmt)):
            continue
        found.append(path)
    return found


def commit_files(target: Target, staging: str, run_id: str, payload: dict,
                 previous: Optional[dict], overwrite: bool) -> list[str]:
    """Move the staged set into place, write the manifest (the commit), then
    delete the previous set and any file of ours no manifest names."""
    staged = sorted(p for p in _list(staging) if not p.endswith("/"))
    moved = []
    for path in staged:
        name = path.rsplit("/", 1)[-1]
        if name not in BQ_EXTRAS:
            stem, dot, ext = name.rpartition(".")
            prefix, _, shard = stem.partition("-")
            name = f"{prefix}-{run_id}-{shard}.{ext}"
        moved.append(join(target.to, name))
    FileSystems.rename(staged, moved)
    write_manifest(target, {**payload, "files": [m.rsplit("/", 1)[-1] for m in moved]})
    keep = set(moved)
    stale = [p for p in _list(target.to)
             if p not in keep and _ours(p.rsplit("/", 1)[-1], target.fmt)
             and not (is_local(p) and os.path.isdir(p))]
    if overwrite:
        stale += [p for p in foreign_files(target, {"format": target.fmt})
                  if p.lower().endswith(".json") and p not in keep and p not in stale]
    if stale:
        FileSystems.delete(stale)
    remove_staging(staging)
    return moved


def remove_stale_staging(target: Target) -> int:
    """Staging folders of exports that died (we hold the lock: none is live)."""
    if is_local(target.to):
        names = os.listdir(target.to) if os.path.isdir(target.to) else []
        stale = [join(target.to, n) for n in names if n.startswith(STAGING)]
    else:  # object stores: the folders are the objects' prefixes
        try:
            found = FileSystems.match([join(target.to, STAGING + "*/*")])[0].metadata_list
        except Exception:  # none
            found = []
        stale = sorted({m.path.rsplit("/", 1)[0] for m in found})
    for path in stale:
        remove_staging(path)
    return len(stale)


def remove_staging(staging: str) -> None:
    if is_local(staging):
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
        return
    try:
        found = FileSystems.match([join(staging, "**")])[0].metadata_list
        if found:
            FileSystems.delete([m.path for m in found])
    except Exception:  # nothing there, or already gone
        pass


__all__ = ["Target", "classify", "check_writable", "acquire", "check_previous",
           "commit_files", "read_manifest", "write_manifest", "remove_staging",
           "IDENTITY_KEYS"]
