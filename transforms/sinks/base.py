"""The one seam every store sink fills (in the spirit of Beam's
`apache_beam.ml.rag.ingestion.base.VectorDatabaseWriteConfig`): a small
write config per store, each in its own module importing only this one and
`records`.

    config.check_client()            the client library, or ImportError
    config.prepare(overwrite)        create the table, or check its model and
                                     dataset (StoreMismatch)
    config.create_write_transform()  VectorRecords -> the store (a PTransform)
    config.count()                   rows the store holds
    config.delete_stale(keep_ids)    rows whose image_id the dataset no
                                     longer holds, deleted: the store equals
                                     the dataset after a re-export
"""
from __future__ import annotations

import abc
from typing import Iterable

from transforms.sinks.records import identity_differences

DELETE_CHUNK = 1000  # ids per delete call


class StoreMismatch(ValueError):
    """The target holds another model's vectors, another dataset's, or
    another layout."""


def check_recorded(what: str, mine: dict, theirs: dict) -> list[str]:
    """The differences that refuse a write into `what` (empty: same model and
    dataset). A store written before datasets were recorded is accepted."""
    differing = identity_differences(mine, theirs)
    if theirs.get("dataset_id") and theirs.get("dataset_id") != mine.get("dataset_id"):
        differing.append(f"dataset {theirs.get('dataset')!r} vs {mine.get('dataset')!r}")
    return differing


def mismatch(what: str, differing: list[str]) -> StoreMismatch:
    return StoreMismatch(f"{what} holds other vectors ({'; '.join(differing)}); "
                         "use --overwrite to replace it")


class StoreConfig(abc.ABC):
    """A store's write config: where, which model, and the small steps."""

    client_module = ""  # the client library's import name

    def check_client(self) -> None:
        if self.client_module:
            __import__(self.client_module)

    @abc.abstractmethod
    def prepare(self, overwrite: bool = False) -> None:
        """Create the table/collection, or check its model and dataset."""

    @abc.abstractmethod
    def create_write_transform(self):
        """The PTransform writing VectorRecords into the store."""

    @abc.abstractmethod
    def count(self) -> int:
        """Rows the store holds now."""

    @abc.abstractmethod
    def stored_ids(self) -> Iterable[str]:
        """The image_ids the store holds."""

    @abc.abstractmethod
    def delete_ids(self, ids: list[str]) -> None:
        """Delete the rows of these image_ids."""

    def delete_stale(self, keep_ids: set) -> int:
        """Delete the rows whose image_id is not in `keep_ids`; how many."""
        stale = sorted(set(self.stored_ids()) - set(keep_ids))
        for start in range(0, len(stale), DELETE_CHUNK):
            self.delete_ids(stale[start:start + DELETE_CHUNK])
        return len(stale)
