"""Thread pools of whichever runtime runs the model, set once per process.

The launcher (or a worker) states the threads before loading; ONNX Runtime
reads them when it creates its session, TensorFlow when it first runs (TF
fixes its pools at its first op, so they are applied before that, and only
where TensorFlow is used: a worker on ONNX Runtime never imports it).
"""
from __future__ import annotations

import logging
import sys

LOG = logging.getLogger(__name__)
_THREADS = {"intra": 0, "inter": 0}


def configure(intra_op_threads: int = 0, inter_op_threads: int = 0) -> None:
    """0 keeps the runtime's default (a thread per core)."""
    _THREADS.update(intra=intra_op_threads, inter=inter_op_threads)
    if "tensorflow" in sys.modules:  # already imported: apply while it can
        apply_tensorflow()


def intra_op() -> int:
    return _THREADS["intra"]


def inter_op() -> int:
    return _THREADS["inter"]


def apply_tensorflow() -> None:
    """Give TensorFlow the configured pools; a note where it started before."""
    import tensorflow as tf
    intra, inter = _THREADS["intra"], _THREADS["inter"]
    try:
        if intra:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:
        current = (tf.config.threading.get_intra_op_parallelism_threads(),
                   tf.config.threading.get_inter_op_parallelism_threads())
        if current != (intra or current[0], inter or current[1]):
            LOG.warning("TensorFlow already started with intra/inter-op "
                        "threads %s; cannot change them now", current)
