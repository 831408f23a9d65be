"""What model to load (`ModelSpec`) and how loading fails: small, picklable,
imported by everyone who names a model without loading one."""
from __future__ import annotations

import dataclasses
from typing import Optional

from transforms.model import catalog, engines, quantize

SOURCES = ("tfhub", "saved_model", "random")
# auto: the fastest engine here among those whose outputs match
# TensorFlow's (ONNX Runtime, OpenVINO; `engines.choose`), else TensorFlow;
# the others force one runtime.
RUNTIMES = ("auto", "onnxruntime", "openvino", "tensorflow")


class ModelUnavailableError(RuntimeError):
    """The model cannot be had; the message says what was tried and what to do."""


class QuantizationError(RuntimeError):
    """The int8 model cannot be had (conversion, calibration or engines
    failed); the launcher falls back to fp32, a worker fails."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What to load: small and picklable, so workers can load it themselves."""
    variant: str = catalog.DEFAULT_MODEL
    source: str = "tfhub"
    handle: Optional[str] = None  # tfhub: a handle URL; saved_model: path/URI
    feature_handle: Optional[str] = None  # /4-/5: the feature-vector model
    hub_version: int = catalog.DEFAULT_HUB_VERSION
    seed: int = 0  # random source only
    runtime: str = "auto"  # one of RUNTIMES
    # fp32, or int8 (the launcher resolves --precision auto to one of them):
    # int8 needs `calibration`, and runs on `engine` (auto: the faster one,
    # timed at load).
    precision: str = "fp32"
    engine: str = "auto"
    # The batch the engines are timed at (the job's --max_batch_size).
    batch_size: int = 16
    calibration: Optional[quantize.Calibration] = None

    def __post_init__(self):
        catalog.get_variant(self.variant)  # clear error for unknown names
        if self.precision not in ("fp32", "int8"):
            raise ValueError(f"unknown precision {self.precision!r}; use fp32 "
                             "or int8")
        if self.engine not in ("auto",) + engines.ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}")
        if self.precision == "int8" and self.calibration is None:
            raise ValueError("int8 needs a calibration sample")
        if self.precision == "int8" and self.runtime == "tensorflow":
            raise ValueError("--precision int8 runs on ONNX Runtime or "
                             "OpenVINO, not on --runtime tensorflow")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {self.batch_size}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; use one of "
                             f"{', '.join(RUNTIMES)}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown model source {self.source!r}; use one "
                             f"of {', '.join(SOURCES)}")
        if self.source == "saved_model" and not self.handle:
            raise ValueError("the saved_model source needs --model_handle")
        if self.hub_version not in catalog.HUB_VERSIONS:
            raise ValueError(f"TF-Hub version must be one of "
                             f"{catalog.HUB_VERSIONS}, not {self.hub_version}")

    def hub_handles(self) -> list[str]:
        """The TF-Hub handles to fetch, classification first."""
        if self.handle:
            return [self.handle] + ([self.feature_handle]
                                    if self.feature_handle else [])
        variant = catalog.get_variant(self.variant)
        if self.hub_version == 3:
            # The /3 classification module carries both signatures.
            return [variant.hub_handle("classification", 3)]
        return [variant.hub_handle("classification", self.hub_version),
                variant.hub_handle("feature_vector", self.hub_version)]

    def describe(self) -> str:
        if self.source == "random":
            return f"random(seed={self.seed})"
        if self.source == "tfhub":
            return " + ".join(self.hub_handles())
        return " + ".join(h for h in (self.handle, self.feature_handle) if h)


