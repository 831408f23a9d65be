"""The one element every sink takes: a `VectorRecord` per image.

The vector is L2-normalized float32 (cosine similarity = inner product, as
`mobilenet-embed query` reports it); `label` is the top-1 class; `restricts`
holds extra filter values by name (Vertex namespaces, payload fields);
`crowding_tag` groups results Vertex should diversify (e.g. the folder).
"""
from __future__ import annotations

import json
import posixpath
import uuid
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np

from schemas import DatasetMetadata, Embedding
from transforms.uris import redact

# The model a store's rows came from: a store holds one model's vectors.
IDENTITY_KEYS = ("model", "weights_sha256", "feature_dim")


class VectorRecord(NamedTuple):
    id: str  # the dataset's image_id
    uri: str
    vector: np.ndarray  # float32 [d], unit L2 norm
    label: str  # top-1 class
    top5_labels: tuple
    model: str
    restricts: tuple = ()  # ((namespace, (values...)), ...)
    crowding_tag: Optional[str] = None


def store_identity(metadata: DatasetMetadata, dataset: str = "",
                   dataset_id: str = "") -> dict:
    """What a store records about its vectors: the model (name, weights
    digest, dimensions; these must match to mix rows), its handle, the
    dataset they came from and that dataset's identity (its creation stamp:
    a copied or grown dataset keeps it; another dataset is refused by the
    stores, see transforms.sinks.base.check_recorded)."""
    return {"model": metadata.model.model,
            "weights_sha256": metadata.model.weights_sha256,
            "feature_dim": str(metadata.feature_dim),
            "model_handle": metadata.model.model_handle,
            "dataset": dataset, "dataset_id": dataset_id}


def identity_differences(mine: dict, theirs: dict) -> list[str]:
    return [f"{k} {theirs.get(k)!r} vs {mine.get(k)!r}" for k in IDENTITY_KEYS
            if str(mine.get(k)) != str(theirs.get(k))]


def identity_json(identity: dict) -> str:
    return json.dumps({k: str(v) for k, v in identity.items()}, sort_keys=True)


def point_uuid(image_id: str) -> str:
    """A stable UUID for stores whose ids must be integers or UUIDs (Qdrant)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "mobilenet-embed:" + image_id))


def unit(vector) -> np.ndarray:
    x = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(x))
    return x / norm if norm > 1e-12 else x


def folder_of(uri: str) -> str:
    """The image's folder (a crowding tag users expect: one album, one shop)."""
    return posixpath.dirname(uri.replace("\\", "/")).rstrip("/") or "/"


class ToVectorRecords(beam.PTransform):
    """`EmbedImages(...)["embedded"]` (schemas.Embedding) -> VectorRecord:
    the feature vector normalized, the top-1 label of the dataset's label set.
    crowding="folder" tags each record with the image's folder."""

    def __init__(self, metadata: DatasetMetadata, crowding: Optional[str] = None):
        super().__init__()
        self._model = metadata.model.model
        self._crowding = crowding

    def expand(self, embedded):
        from transforms.model.labels import imagenet_labels
        labels = imagenet_labels()
        model, crowding = self._model, self._crowding

        def convert(e: Embedding) -> VectorRecord:
            top = [labels[int(i)] for i in e.top_class_ids]
            return VectorRecord(e.image_id, redact(e.uri), unit(e.feature_vector), top[0],
                                tuple(top), model,
                                crowding_tag=folder_of(e.uri) if crowding == "folder" else None)
        return embedded | "ToVectorRecords" >> beam.Map(convert)
