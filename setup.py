"""Packaging for the MobileNetV2 embedding pipeline.

The same file serves three uses: `pip install -e .` for local runs and tests,
the console script `mobilenet-embed`, and `--setup_file ./setup.py` on
Dataflow, where each worker installs the sdist built from it (so every data
file the workers need must be listed in package_data).
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"',
                    (HERE / "pipeline" / "__init__.py").read_text()).group(1)

# Ranges that resolve together (checked with constraints.txt, which pins the
# exact set CI and run_local.sh use). Beam 2.77 needs pyarrow < 26 and
# numpy < 2.5; tf-keras must match the TensorFlow minor version because
# tensorflow_hub imports it at import time.
INSTALL_REQUIRES = [
    "apache-beam[gcp]>=2.77.0,<2.78",
    "tensorflow>=2.21,<2.22",
    "tf-keras>=2.21,<2.22",
    "tensorflow-hub>=0.16.1,<0.17",
    "numpy>=1.26,<2.5",
    "pyarrow>=16,<26",
    "pillow>=12.0",  # its own AVIF plugin (libavif) in the wheels
    "pillow-heif>=1.1,<2",  # HEIC/HEIF through libheif
    "tifffile>=2025.1",  # TIFFs Pillow cannot read: float, planar, JPEG 2000...
    "imagecodecs>=2025.3",  # the codecs tifffile decodes them with
    "orjson>=3.9,<4",  # the JSON lines of vertex/bigquery exports
    "simplejpeg>=1.7,<2",  # libjpeg-turbo's M/8 DCT scaling for plain JPEGs
    "google-cloud-storage>=2.14",
    "psutil>=5.9",  # local runs size their worker processes by free memory
    "faiss-cpu>=1.9,<2",  # mobilenet-embed index/query/dedup (pipeline/search)
    # The model runs on ONNX Runtime, converted from TensorFlow's frozen
    # graph by tf2onnx (transforms/model/onnx_runtime.py). Workers convert
    # where their cache lacks it, so both are runtime dependencies.
    "onnxruntime>=1.20,<2",
    "onnx>=1.16,<2",
    "tf2onnx>=1.17,<1.18",
    # --precision int8: the quantized graph on OpenVINO's CPU plugin where it
    # is faster than ONNX Runtime (transforms/model/openvino_runtime.py).
    "openvino>=2025.1,<2027",
]

EXTRAS = {
    "test": [
        "pytest>=8",
        "pytest-timeout>=2.3",
        "duckdb>=1.1",
        "gcp-storage-emulator>=2024.8.3",
        "packaging>=23",  # tests/test_dataflow.py reads requirement specifiers
    ],
    "samples": ["scikit-image>=0.24"],
    # mobilenet-embed export / feast and transforms.sinks: the stores' own
    # clients, tested offline against their embedded modes.
    "lancedb": ["lancedb>=0.30,<1"],
    "qdrant": ["qdrant-client>=1.15,<2"],  # Beam's rag writer needs >= 1.15
    "milvus": ["pymilvus>=2.5.10,<4", "milvus-lite>=2.5"],
    "feast": ["feast>=0.60,<1"],
}
EXTRAS["stores"] = sorted({r for k in ("lancedb", "qdrant", "milvus", "feast")
                           for r in EXTRAS[k]})

setup(
    name="mobilenet-embed",
    version=VERSION,
    description=("Embed large image collections with TF-Hub MobileNetV2 on "
                 "Apache Beam (local or Dataflow) into Parquet."),
    long_description=(HERE / "README.md").read_text(encoding="utf-8")
    if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms",
                                    "transforms.*", "schemas", "schemas.*"]),
    package_data={"transforms.model": ["data/*.txt"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["mobilenet-embed=pipeline.cli:main"],
    },
)
