"""Inference stage: Beam's RunInference with the project's own ModelHandler.

Beam's TFModelHandlerTensor loads with tf.keras.models.load_model, which reads
neither TF-Hub modules nor legacy SavedModels under Keras 3, so this handler
loads through `transforms.model.loading` instead; the model then runs on ONNX
Runtime or TensorFlow as its `ModelSpec.runtime` says (`LoadedModel.runtime`
tells which, and why). RunInference gives the rest:
one model per worker process shared by its threads (or one per machine with
`large_model`), bounded batches, and its own metrics.

A failing batch never fails its bundle: its images are retried one by one so
that only the guilty image becomes a `FailedImage`.
"""
from __future__ import annotations

import functools
import logging
import os
from typing import Any, Iterable, Optional, Sequence, Union

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, RunInference

from transforms.model import threads
from transforms.model.loading import LoadedModel, ModelSpec, load_model
from schemas import (METRICS_NAMESPACE, TOP_K, DecodedImage, Embedding,
                     FailedImage)

LOG = logging.getLogger(__name__)

Result = Union[Embedding, FailedImage]


class WeightsMismatchError(RuntimeError):
    pass


def tensorflow_environment() -> dict[str, str]:
    """Environment TensorFlow must see before it starts, in every process.

    oneDNN's CPU kernels: TF leaves them off on CPUs other than recent Intel
    ones, yet on this model they double throughput on AMD EPYC too (same
    top-1, feature cosine > 0.9999998; see benchmarks/). The launcher's value
    wins, so TF_ENABLE_ONEDNN_OPTS=0 turns them off everywhere.
    """
    return {"TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1")}


def configure_threads(intra_op_threads: int = 0,
                      inter_op_threads: int = 0) -> None:
    """Threads of the model's runtime in this process (0: its default, all
    cores): ONNX Runtime's session or TensorFlow's pools, whichever runs the
    model. Call before loading it; TensorFlow is not imported for this."""
    threads.configure(intra_op_threads, inter_op_threads)


def default_max_batch_size(input_size: int) -> int:
    """The pixels of 16 images at 224x224, as images of `input_size`, within
    16..64. Activation memory grows with the pixels of a batch (measured at
    224, two workers: about 300 MB more each at 32 images than at 16) while
    one TensorFlow thread per process is no faster on larger batches."""
    return max(16, min(64, 16 * 224 * 224 // (input_size * input_size)))


def calibration_pixels(calibration) -> np.ndarray:
    """The int8 calibration sample decoded again from its record (a
    `quantize.Calibration`): where a worker or a query lacks the quantized
    model in its cache, it quantizes the same pixels to the same model
    (`load_model` checks their digest). The files were accepted under the
    job's limits by the launcher; the limits here only bound a file that
    changed since."""
    import json

    from transforms.decode import DecodeLimits, PreprocessSettings, decode_sample
    settings = PreprocessSettings.from_metadata(json.loads(calibration.preprocessing))
    pixels, _ = decode_sample(calibration.uris, settings,
                              DecodeLimits(max_bytes=2**31, max_pixels=2**31))
    return pixels


class MobileNetV2Handler(ModelHandler[DecodedImage, Result, LoadedModel]):
    """DecodedImage in; Embedding (pixels dropped) or FailedImage out."""

    def __init__(self, spec: ModelSpec, *, min_batch_size: int = 1,
                 max_batch_size: int = 32, large_model: bool = False,
                 model_copies: Optional[int] = None,
                 expected_weights_sha256: Optional[str] = None,
                 intra_op_threads: int = 0, inter_op_threads: int = 0):
        super().__init__(min_batch_size=min_batch_size,
                         max_batch_size=max_batch_size,
                         large_model=large_model, model_copies=model_copies,
                         env_vars=tensorflow_environment())
        self._spec = spec
        self._expected_digest = expected_weights_sha256
        self._threads = (intra_op_threads, inter_op_threads)

    def load_model(self) -> LoadedModel:
        configure_threads(*self._threads)
        model = load_model(self._spec, calibration_pixels=(
            functools.partial(calibration_pixels, self._spec.calibration)
            if self._spec.calibration else None))
        if (self._expected_digest
                and model.weights_sha256 != self._expected_digest):
            # e.g. TF-Hub served other bytes to this worker than to the
            # launcher: mixing them would silently corrupt the dataset.
            raise WeightsMismatchError(
                f"worker loaded weights {model.weights_sha256[:16]}... for "
                f"{self._spec.describe()}, but the job was planned with "
                f"{self._expected_digest[:16]}...; refusing to mix them")
        LOG.info("model %s runs on %s", self._spec.variant, model.runtime)
        return model

    def run_inference(self, batch: Sequence[DecodedImage], model: LoadedModel,
                      inference_args: Optional[dict[str, Any]] = None
                      ) -> Iterable[Result]:
        try:
            logits, features = model.predict(
                np.stack([image.pixels for image in batch]))
        except Exception as e:  # pylint: disable=broad-except
            if len(batch) == 1:
                return [_failure(batch[0], e)]
            LOG.warning("a batch of %d failed in inference (%s: %s); "
                        "retrying its images one by one", len(batch),
                        type(e).__name__, e)
            Metrics.counter(METRICS_NAMESPACE, "inference_batch_retries").inc()
            return [result for image in batch
                    for result in self.run_inference([image], model)]
        top_ids, top_probs = top_k(logits, TOP_K)
        return [_result(image, logits[i], features[i], top_ids[i], top_probs[i])
                for i, image in enumerate(batch)]

    def get_num_bytes(self, batch: Sequence[DecodedImage]) -> int:
        return sum(image.pixels.nbytes for image in batch)

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Class ids and softmax probabilities of the k largest logits, per row."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    ids = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return (ids.astype(np.int32),
            np.take_along_axis(probs, ids, axis=1).astype(np.float32))


def _result(image: DecodedImage, logits: np.ndarray, features: np.ndarray,
            top_ids: np.ndarray, top_probs: np.ndarray) -> Result:
    if not (np.isfinite(logits).all() and np.isfinite(features).all()):
        return FailedImage(image.image_id, image.uri, "inference",
                           "NonFiniteOutput",
                           "the model returned NaN or infinite values",
                           image.content_sha256)
    return Embedding(image.image_id, image.uri, logits, features, top_ids,
                     top_probs, image.original_width, image.original_height,
                     image.content_sha256, image.content_bytes)


def _failure(image: DecodedImage, error: Exception) -> FailedImage:
    message = str(error).strip().splitlines()
    return FailedImage(image.image_id, image.uri, "inference",
                       type(error).__name__,
                       (message[0] if message else "")[:500],
                       image.content_sha256)


class _SplitFailures(beam.DoFn):
    def process(self, result: Result):
        if isinstance(result, FailedImage):
            Metrics.counter(METRICS_NAMESPACE, "failed_inference").inc()
            yield beam.pvalue.TaggedOutput(Embed.FAILED, result)
        else:
            Metrics.counter(METRICS_NAMESPACE, "images_embedded").inc()
            yield result


class Embed(beam.PTransform):
    """DecodedImage -> Embedding (main output) and FailedImage ("failed")."""
    FAILED = "failed"

    def __init__(self, handler: MobileNetV2Handler):
        super().__init__()
        self._handler = handler

    def expand(self, images):
        return (images
                | "RunInference" >> RunInference(self._handler)
                | "SplitFailures" >> beam.ParDo(_SplitFailures())
                .with_outputs(self.FAILED, main="embedded"))
