"""The contract of the output: Arrow schemas of embeddings/ and errors/.

Defined once here and used by the writer, the tests and the docs
(`python -m pipeline schema` prints them).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

import pyarrow as pa

SCHEMA_VERSION = "1"
NUM_CLASSES = 1001  # index 0 is "background"
TOP_K = 5
# Beam metrics of every stage are counted under this namespace.
METRICS_NAMESPACE = "mobilenet_embed"

# Keys of the preprocessing record that are written for the record but do
# not change the pixels' definition: a library upgrade must not block a
# resume or a query.
PREPROCESSING_RECORDED_ONLY = ("pillow", "library_versions")

# Parquet key-value metadata written into every file (values are strings;
# `preprocessing` is JSON). Readers find them with
# pq.read_schema(path).metadata.
META_PREFIX = "mobilenet_embed."
META_KEYS = (
    "schema_version",
    "project_version",
    "model",  # catalog name, e.g. mobilenet_v2_100_224
    "model_source",  # tfhub | saved_model | random
    "model_handle",  # TF-Hub handle or path/URI; "random(seed=N)" for random
    "weights_sha256",  # digest of the weights actually loaded
    "heads",  # how logits and features were computed (one pass or two)
    "feature_dim",
    "runtime",  # what ran the model, its version, the parity figures
    "precision",  # fp32 | int8 (part of the identity)
    "engine",  # what ran the model: onnxruntime | openvino | tensorflow
    "engine_choice",  # JSON: the engines' timings here, the machine, cached or not
    "quantization",  # JSON: calibration record, guard figures, engine timings
    "preprocessing",  # JSON of the decode/resize settings
    "labels",  # the label set of `top5_labels`
)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the output records about the model that made it: written by the
    model library when it loads a model, read by everyone else."""
    model: str  # catalog name, e.g. mobilenet_v2_100_224
    model_source: str  # tfhub | saved_model | random
    model_handle: str  # TF-Hub handle(s), path/URI, or "random(seed=N)"
    weights_sha256: str  # digest of the weights actually loaded
    heads: str  # how logits and features were computed (one pass or two)
    feature_dim: int
    # What ran it, its version and the parity check against TensorFlow, e.g.
    # "onnxruntime 1.32.0 CPUExecutionProvider; parity max|d| ...". Recorded,
    # not part of the identity: the runtimes agree within the parity limit.
    runtime: str = ""
    # fp32, or int8: the fused graph quantized statically (QDQ), checked
    # against fp32 by the accuracy guard. Part of the identity: int8 and fp32
    # rows are not mixed in one dataset.
    precision: str = "fp32"
    # onnxruntime | openvino | tensorflow: measured fastest within parity on
    # the machine that loaded it ("" in files written before it was recorded).
    engine: str = ""
    # int8 only: JSON of the calibration record (images, pixel digest), the
    # guard's figures and limits, and the engines' timings.
    quantization: str = ""
    # JSON of `engines.Choice.to_dict`: the engines' seconds per probe batch
    # (or why one was left out), the batch, the machine (CPU model, flags
    # digest, ISA cap, versions, threads) and whether the choice was cached.
    engine_choice: str = ""


# ModelInfo's fields that files written before they existed lack.
_MODEL_DEFAULTS = {"runtime": "", "precision": "fp32", "engine": "",
                   "quantization": "", "engine_choice": ""}


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
    """The key-value metadata of every output file and of `_dataset.json`:
    the one typed record of how a dataset was made. Written and read only
    through `to_strings` / `from_strings`."""
    model: ModelInfo
    preprocessing: dict  # the decode/resize settings (JSON in the files)
    labels: str  # the label set of `top5_labels`
    schema_version: str = SCHEMA_VERSION
    project_version: str = ""

    # Rows made under a different value of these cannot be mixed in one dataset.
    IDENTITY = ("schema_version", "model", "weights_sha256", "feature_dim",
                "precision", "preprocessing")

    @property
    def feature_dim(self) -> int:
        return self.model.feature_dim

    def to_strings(self) -> dict[str, str]:
        """The META_KEYS as strings, for Parquet metadata and JSON."""
        values = {
            "schema_version": self.schema_version,
            "project_version": self.project_version,
            **{k: str(v) for k, v in dataclasses.asdict(self.model).items()},
            "preprocessing": json.dumps(self.preprocessing, sort_keys=True),
            "labels": self.labels,
        }
        return {k: values[k] for k in META_KEYS}

    @classmethod
    def from_strings(cls, values: dict) -> "DatasetMetadata":
        """Inverse of `to_strings`; KeyError/ValueError when a key is missing
        or malformed (callers name the file)."""
        model = ModelInfo(**{f.name: values[f.name]
                             for f in dataclasses.fields(ModelInfo)
                             if f.name != "feature_dim"
                             and f.name not in _MODEL_DEFAULTS},
                          feature_dim=int(values["feature_dim"]),
                          **{k: str(values.get(k, default))
                             for k, default in _MODEL_DEFAULTS.items()})
        preprocessing = values["preprocessing"]
        if isinstance(preprocessing, str):
            preprocessing = json.loads(preprocessing)
        if not isinstance(preprocessing, dict):
            raise ValueError("preprocessing is not a JSON object")
        return cls(model=model, preprocessing=preprocessing,
                   labels=str(values["labels"]),
                   schema_version=str(values["schema_version"]),
                   project_version=str(values.get("project_version", "")))

    def identity(self) -> dict[str, str]:
        """The values that decide whether rows can be mixed. Library
        versions are recorded, but an upgrade should not block a resume."""
        strings = self.to_strings()
        settings = dict(self.preprocessing)
        for key in PREPROCESSING_RECORDED_ONLY:
            settings.pop(key, None)
        strings["preprocessing"] = json.dumps(settings, sort_keys=True)
        return {k: strings[k] for k in self.IDENTITY}

    def differences(self, other: "DatasetMetadata") -> list[str]:
        """'key: mine vs theirs' for each identity value that differs."""
        mine, theirs = self.identity(), other.identity()
        return [f"{k}: {mine[k]!r} vs {theirs[k]!r}" for k in self.IDENTITY
                if mine[k] != theirs[k]]


def meta_key(name: str) -> bytes:
    return (META_PREFIX + name).encode()


def embeddings_schema(feature_dim: int) -> pa.Schema:
    """Schema of embeddings/: one row per embedded image."""
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("logits", pa.list_(pa.float32(), NUM_CLASSES), nullable=False),
        pa.field("feature_vector", pa.list_(pa.float32(), feature_dim),
                 nullable=False),
        pa.field("top5_class_ids", pa.list_(pa.int32(), TOP_K),
                 nullable=False),
        pa.field("top5_labels", pa.list_(pa.string(), TOP_K), nullable=False),
        pa.field("top5_probabilities", pa.list_(pa.float32(), TOP_K),
                 nullable=False),
        pa.field("original_width", pa.int32(), nullable=False),
        pa.field("original_height", pa.int32(), nullable=False),
        pa.field("content_sha256", pa.string(), nullable=False),
        pa.field("content_bytes", pa.int64(), nullable=False),
        pa.field("event_timestamp", pa.timestamp("us", tz="UTC"),
                 nullable=False),
    ])


ERRORS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("uri", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("error_class", pa.string(), nullable=False),
    pa.field("message", pa.string(), nullable=False),
    pa.field("content_sha256", pa.string(), nullable=True),
    pa.field("event_timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
])


def with_metadata(schema: pa.Schema, metadata: DatasetMetadata) -> pa.Schema:
    """The schema with the dataset's key-value metadata attached."""
    return schema.with_metadata(
        {meta_key(k): v.encode() for k, v in metadata.to_strings().items()})


def read_metadata(schema: pa.Schema) -> Optional[DatasetMetadata]:
    """The dataset metadata of a file's schema; None for a file without it.
    ValueError when it is there but malformed."""
    raw = schema.metadata or {}
    values = {}
    for k, v in raw.items():
        key = k.decode()
        if key.startswith(META_PREFIX):
            values[key[len(META_PREFIX):]] = v.decode()
    if not values:
        return None
    try:
        return DatasetMetadata.from_strings(values)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"malformed {META_PREFIX}* metadata: {e!r}") from None
