"""The public Beam surface: embed images inside your own pipeline, and write
the result as this project's dataset. The job (`pipeline/job.py`) is built
from the same two transforms.

    with beam.Pipeline() as p:
        uris = p | beam.Create(["gs://bucket/a.jpg", "/data/b.png"])
        out = uris | EmbedImages(ModelSpec("mobilenet_v2_050_160"))
        out | WriteEmbeddingDataset(Dataset("gs://bucket/emb"),
                                    dataset_metadata(ModelSpec("mobilenet_v2_050_160")))

`EmbedImages` takes URIs (str), `ImageRef`s, or `(image_id, bytes)` pairs and
returns {"embedded": Embedding, "failed": FailedImage}: every input comes out
exactly once. `WriteEmbeddingDataset` takes that dict and writes embeddings/,
errors/ and run_summary.json atomically. It does not take the output's lock
(`Dataset.acquire_lock`); the job does.
"""
from __future__ import annotations

import time
from typing import Optional

import apache_beam as beam

from schemas import DatasetMetadata
from transforms import listing
from transforms.dataset import EMBEDDINGS, ERRORS, Dataset
from transforms.decode import DecodeLimits, PreprocessSettings, ReadDecodeResize
from transforms.inference import Embed, MobileNetV2Handler
from transforms.model import catalog
from transforms.model.labels import LABEL_SET, imagenet_labels
from transforms.model.loading import ModelSpec, load_model
from transforms.report import Summarize
from transforms.write import EmbeddingRows, ErrorRows, WriteParquetFiles

def default_settings(spec: ModelSpec) -> PreprocessSettings:
    """The preprocessing the modules expect, at the model's input size."""
    size = catalog.get_variant(spec.variant).input_size
    return PreprocessSettings(height=size, width=size)


def dataset_metadata(spec: ModelSpec,
                     settings: Optional[PreprocessSettings] = None
                     ) -> DatasetMetadata:
    """The metadata of a dataset made with `spec` (loads the model here, in
    the launcher, to record its weights digest)."""
    settings = settings or default_settings(spec)
    return DatasetMetadata(model=load_model(spec).info(),
                           preprocessing=settings.to_metadata(),
                           labels=LABEL_SET,
                           project_version=_project_version())


def _project_version() -> str:
    import importlib.metadata
    try:
        return importlib.metadata.version("mobilenet-embed")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


class EmbedImages(beam.PTransform):
    """Images in; {"embedded": Embedding, "failed": FailedImage} out."""
    EMBEDDED, FAILED = "embedded", "failed"

    def __init__(self, spec: ModelSpec,
                 settings: Optional[PreprocessSettings] = None,
                 limits: Optional[DecodeLimits] = None, *,
                 min_batch_size: int = 1, max_batch_size: Optional[int] = None,
                 large_model: bool = False, model_copies: Optional[int] = None,
                 expected_weights_sha256: Optional[str] = None,
                 intra_op_threads: int = 0, inter_op_threads: int = 0):
        super().__init__()
        from transforms.inference import default_max_batch_size
        self._settings = settings or default_settings(spec)
        self._limits = limits or DecodeLimits()
        self._handler = MobileNetV2Handler(
            spec, min_batch_size=min_batch_size,
            max_batch_size=max_batch_size or default_max_batch_size(
                self._settings.height),
            large_model=large_model, model_copies=model_copies,
            expected_weights_sha256=expected_weights_sha256,
            intra_op_threads=intra_op_threads,
            inter_op_threads=inter_op_threads)

    def expand(self, images):
        # Decode and inference fuse into one stage: a Flatten of decoded
        # images here would make the runner buffer every image's pixels.
        decoded = images | "ReadDecodeResize" >> beam.ParDo(
            ReadDecodeResize(self._settings, self._limits)).with_outputs(
                ReadDecodeResize.FAILED, main="images")
        embedded = decoded.images | "Embed" >> Embed(self._handler)
        failed = ((decoded[ReadDecodeResize.FAILED], embedded[Embed.FAILED])
                  | "AllFailed" >> beam.Flatten())
        return {self.EMBEDDED: embedded.embedded, self.FAILED: failed}


class WriteEmbeddingDataset(beam.PTransform):
    """{"embedded", "failed"[, "stats", "redundant"]} -> the dataset's files.

    "stats" and "redundant" come from the job's listing stage; without them
    every input counts as one listed image.
    """
    STATS, REDUNDANT = "stats", "redundant"

    def __init__(self, dataset: Dataset, metadata: DatasetMetadata, *,
                 run_id: Optional[str] = None, rows_per_file: int = 4096,
                 started_at: Optional[float] = None,
                 header: Optional[dict] = None):
        super().__init__()
        import datetime as dt
        import uuid
        self._dataset = dataset
        self._metadata = metadata
        self._run_id = run_id or (
            dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
            + "-" + uuid.uuid4().hex[:6])
        self._rows_per_file = rows_per_file
        self._started_at = started_at or time.time()
        self._header = header or {"output": dataset.shown,
                                  "model": metadata.to_strings()}

    def expand(self, inputs):
        embedded, failed = inputs[EmbedImages.EMBEDDED], inputs[EmbedImages.FAILED]
        p = embedded.pipeline
        stats = inputs.get(self.STATS)
        if stats is None:
            stats = ((embedded, failed) | "AllInputs" >> beam.Flatten()
                     | "CountInputs" >> beam.FlatMap(
                         lambda _: [(listing.ENTRIES, 1), (listing.TO_EMBED, 1)]))
        redundant = inputs.get(self.REDUNDANT)
        if redundant is None:
            redundant = p | "NoRedundant" >> beam.Create([])
        common = dict(dataset=self._dataset, run_id=self._run_id,
                      metadata=self._metadata, rows_per_file=self._rows_per_file)
        model = self._metadata.model
        written = embedded | "WriteEmbeddings" >> beam.ParDo(WriteParquetFiles(
            kind=EMBEDDINGS, rows=EmbeddingRows(
                model.model, model.feature_dim, imagenet_labels()),
            **common)).with_outputs(WriteParquetFiles.FAILED, main="committed")
        all_failed = ((failed, written[WriteParquetFiles.FAILED])
                      | "WithWriteFailures" >> beam.Flatten())
        committed = (
            (written.committed,
             all_failed | "WriteErrors" >> beam.ParDo(WriteParquetFiles(
                 kind=ERRORS, rows=ErrorRows(), **common)))
            | "AllCommitted" >> beam.Flatten())
        return ((committed, stats, redundant)
                | "Summarize" >> Summarize(self._dataset, self._run_id,
                                           self._started_at, self._header))
