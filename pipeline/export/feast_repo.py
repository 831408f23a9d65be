"""`mobilenet-embed feast OUT --to REPO`: a Feast feature repository over the
dataset's embeddings Parquet (no copy: the FileSource reads OUT/embeddings/).

    REPO/feature_store.yaml   local provider, SQLite online store, file offline store
    REPO/features.py          Entity image_id; FileSource(event_timestamp);
                              FeatureView image_embeddings: feature_vector,
                              top5_labels, top5_probabilities, model

Then, in REPO: `feast apply`, `feast materialize-incremental <now>`, and
`FeatureStore(REPO).get_online_features(...)` / `get_historical_features(...)`.
The view's tags record the model the vectors came from.
"""
from __future__ import annotations

import os

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from pipeline.search.errors import SearchError, check_local_target
from transforms.dataset import Dataset, DatasetError, write_file_atomically
from transforms.uris import is_local, join

FILES = ("feature_store.yaml", "features.py")
GENERATED = "# Written by mobilenet-embed feast"
VIEW = "image_embeddings"
FEATURES = ("feature_vector", "top5_labels", "top5_probabilities", "model")

YAML = """{generated}: a Feast repository over {dataset}
project: {project}
registry: data/registry.db
provider: local
online_store:
  type: sqlite
  path: data/online_store.db
offline_store:
  type: file
entity_key_serialization_version: 3
"""

FEATURES_PY = '''{generated}.
"""The embeddings of {dataset} as Feast features.

    feast apply && feast materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S)
    store = FeatureStore(".")
    store.get_online_features(features=["{view}:feature_vector"],
                              entity_rows=[{{"image_id": "..."}}]).to_dict()
"""
from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, String

image_id = Entity(name="image_id", join_keys=["image_id"], value_type=ValueType.STRING,
                  description="the dataset's image_id (the image's path or URI)")

embeddings = FileSource(name="embeddings", path={path!r},
                        timestamp_field="event_timestamp",
                        description="mobilenet-embed's embeddings Parquet")

{view} = FeatureView(
    name="{view}",
    entities=[image_id],
    ttl=timedelta(days={ttl_days}),
    schema=[
        Field(name="feature_vector", dtype=Array(Float32)),
        Field(name="top5_labels", dtype=Array(String)),
        Field(name="top5_probabilities", dtype=Array(Float32)),
        Field(name="model", dtype=String),
    ],
    online=True,
    source=embeddings,
    tags={tags!r},
)
'''


def _is_ours(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(200).startswith(GENERATED)
    except (OSError, UnicodeDecodeError):
        return False


def write_repo(output: str, to: str, project: str = "mobilenet_embed",
               overwrite: bool = False, ttl_days: int = 36500) -> dict:
    dataset = Dataset(output)
    try:
        metadata = dataset.metadata()
    except DatasetError as e:
        raise SearchError(str(e)) from None
    with FileSystems.open(dataset.parts()[0]) as f:
        names = pq.read_schema(f).names
    missing = [c for c in ("image_id", "event_timestamp", *FEATURES) if c not in names]
    if missing:
        raise SearchError(f"{dataset.shown} has no {', '.join(missing)} column (made by an "
                          "older version?); re-run the job into a new --output")
    if not project.replace("_", "").isalnum():
        raise SearchError(f"--project {project!r}: letters, digits and underscores only")
    if not is_local(to):
        raise SearchError(f"--to {to}: a Feast repository is a local folder")
    to = os.path.abspath(os.path.expanduser(to))
    check_local_target(to)
    clash = [n for n in FILES if os.path.exists(os.path.join(to, n))
             and not _is_ours(os.path.join(to, n))]
    if clash and not overwrite:
        raise SearchError(f"{to} holds {', '.join(clash)} this command did not write; "
                          "use another --to or --overwrite")
    source = join(dataset.root, "embeddings")
    tags = {"model": metadata.model.model, "weights_sha256": metadata.model.weights_sha256,
            "feature_dim": str(metadata.feature_dim), "model_handle": metadata.model.model_handle,
            "dataset": dataset.root}
    values = {"generated": GENERATED, "dataset": dataset.shown, "project": project,
              "path": source, "view": VIEW, "ttl_days": ttl_days, "tags": tags}
    try:
        write_file_atomically(os.path.join(to, "features.py"),
                              FEATURES_PY.format(**values).encode())
        write_file_atomically(os.path.join(to, "feature_store.yaml"),
                              YAML.format(**values).encode())
        os.makedirs(os.path.join(to, "data"), exist_ok=True)
    except OSError as e:
        raise SearchError(f"cannot write the repository {to}: {e.strerror or e}") from None
    return {"repo": to, "source": source, "view": VIEW, "project": project,
            "rows": dataset.num_rows(), "dimensions": metadata.feature_dim}


__all__ = ["write_repo", "VIEW", "FEATURES"]
