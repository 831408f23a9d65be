"""Test session set-up: TensorFlow runs as the command line runs it.

Set before any test imports TensorFlow (see transforms.inference's
tensorflow_environment): the in-process jobs and the direct model calls the
tests compare them with then use the same kernels as `mobilenet-embed`.
"""
import os

os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
