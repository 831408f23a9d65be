"""OpenVINO (CPU plugin) runs the ONNX model, int8 (QDQ) or fp32.

OpenVINO reads the same ONNX file ONNX Runtime runs, QDQ nodes included,
and turns them into its own int8 kernels; on CPUs with VNNI/AMX its int8
MobileNetV2 is the fastest published CPU figure, so `engines.choose`
times it against ONNX Runtime on each machine, in fp32 as in int8, and keeps
the faster.
Threads follow `threads` (the `--tf_*_threads` settings), as ONNX Runtime's.
"""
from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np

from transforms.model import onnx_runtime, threads


class OpenVinoRunner:
    """uint8 pixels [N, H, W, 3] -> (logits, features) as numpy float32."""

    def __init__(self, model: bytes, path: Optional[str] = None):
        import openvino as ov
        core = ov.Core()
        # f32 explicitly: on CPUs with avx512_bf16 or AMX the plugin's
        # default inference precision is bf16 (measured on an EPYC with
        # avx512_bf16: logits off by 0.57, far outside the fp32 parity), and
        # the quantized model's float parts must stay what was calibrated.
        config = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False,
                  "INFERENCE_PRECISION_HINT": "f32"}
        if threads.intra_op():
            config["INFERENCE_NUM_THREADS"] = threads.intra_op()
        if path and os.path.isfile(path):
            network = core.read_model(path)
        else:  # the ONNX frontend reads files: write the bytes to one
            with tempfile.TemporaryDirectory(prefix="mobilenet_ov_") as work:
                file = os.path.join(work, "model.onnx")
                with open(file, "wb") as f:
                    f.write(model)
                network = core.read_model(file)
        self.compiled = core.compile_model(network, "CPU", config)
        self.request = self.compiled.create_infer_request()
        outputs = {name: o for o in self.compiled.outputs for name in o.get_names()}
        # By name where the frontend kept it; else the graph's output order.
        first, second = self.compiled.outputs[:2]
        self._logits = outputs.get(onnx_runtime.LOGITS, first)
        self._features = outputs.get(onnx_runtime.FEATURES, second)
        self.version = ov.__version__

    def __call__(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self.request.infer({onnx_runtime.INPUT: np.ascontiguousarray(pixels)})
        return (np.array(result[self._logits], np.float32),
                np.array(result[self._features], np.float32))

    def describe(self) -> str:
        return f"openvino {self.version} CPU"
