"""Beam stages of the embedding pipeline, and the libraries under them.

The public surface for Beam users (everything else may change):

    from transforms import EmbedImages, WriteEmbeddingDataset, dataset_metadata
    from transforms import Dataset, ModelSpec

See transforms/composite.py for an example.
"""
# Worker processes import this package before their first bundle: against a
# GCS emulator they must not spend ~25 s searching for credentials.
from transforms.gcs_auth import use_anonymous_gcs_if_emulated as _anonymous_gcs

_anonymous_gcs()

_PUBLIC = {
    "EmbedImages": "transforms.composite",
    "WriteEmbeddingDataset": "transforms.composite",
    "dataset_metadata": "transforms.composite",
    "Dataset": "transforms.dataset",
    "ModelSpec": "transforms.model.loading",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    """Imported on first use: the stages pull in TensorFlow and Beam's ML."""
    if name in _PUBLIC:
        import importlib
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'transforms' has no attribute {name!r}")
