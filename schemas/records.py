"""The elements that flow between the pipeline's stages.

Plain NamedTuples of strings, ints and numpy arrays: cheap to pickle between
fused stages, and readable in a debugger. Every listed image becomes exactly
one of `Embedding` or `FailedImage` by the end of the pipeline.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

# The stages an image can fail in, in pipeline order. The error table in the
# README and the `stage` column of errors/ use exactly these names.
STAGES = ("list", "read", "decode", "preprocess", "inference", "write")


class ImageRef(NamedTuple):
    """One image to embed, as listed from a glob or a manifest."""
    image_id: str  # stable: the manifest id, else the URI
    uri: str


class DecodedImage(NamedTuple):
    """An image read, decoded and resized to the model's input size."""
    image_id: str
    uri: str
    pixels: np.ndarray  # uint8 [height, width, 3], RGB, the model's input size
    original_width: int  # after EXIF orientation, before resizing
    original_height: int
    content_sha256: str  # hex digest of the file's bytes
    content_bytes: int


class Embedding(NamedTuple):
    """The model's outputs for one image; the pixels are gone by now."""
    image_id: str
    uri: str
    logits: np.ndarray  # float32 [1001]
    feature_vector: np.ndarray  # float32 [feature_dim]
    top_class_ids: np.ndarray  # int32 [5], most probable first
    top_probabilities: np.ndarray  # float32 [5], softmax over the 1001 logits
    original_width: int
    original_height: int
    content_sha256: str
    content_bytes: int


class FailedImage(NamedTuple):
    """An image that could not be embedded, and why."""
    image_id: str
    uri: str
    stage: str  # one of STAGES
    error_class: str  # short, stable reason such as "TruncatedImage"
    message: str  # one line for a person; never holds credentials
    content_sha256: Optional[str] = None
