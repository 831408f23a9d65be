"""The catalog of the 22 MobileNetV2 variants served on TF-Hub.

The published figures are the TF-Slim table (multiply-adds and parameters in
millions, ImageNet top-1/top-5 in percent). The project ships its own copy so
that `mobilenet-embed models` works anywhere; a test checks it against the
reference table in ../shared when that is present.
"""
from __future__ import annotations

import dataclasses
import difflib

from schemas import NUM_CLASSES

HUB_VERSIONS = (3, 4, 5)
DEFAULT_HUB_VERSION = 3
DEFAULT_MODEL = "mobilenet_v2_100_224"
_HUB_ROOT = "https://tfhub.dev/google/imagenet"

# (depth multiplier, input size, MACs (M), params (M), top-1 %, top-5 %)
_SLIM_TABLE = (
    (1.4, 224, 582, 6.06, 75.0, 92.5),
    (1.3, 224, 509, 5.34, 74.4, 92.1),
    (1.0, 224, 300, 3.47, 71.8, 91.0),
    (1.0, 192, 221, 3.47, 70.7, 90.1),
    (1.0, 160, 154, 3.47, 68.8, 89.0),
    (1.0, 128, 99, 3.47, 65.3, 86.9),
    (1.0, 96, 56, 3.47, 60.3, 83.2),
    (0.75, 224, 209, 2.61, 69.8, 89.6),
    (0.75, 192, 153, 2.61, 68.7, 88.9),
    (0.75, 160, 107, 2.61, 66.4, 87.3),
    (0.75, 128, 69, 2.61, 63.2, 85.3),
    (0.75, 96, 39, 2.61, 58.8, 81.6),
    (0.5, 224, 97, 1.95, 65.4, 86.4),
    (0.5, 192, 71, 1.95, 63.9, 85.4),
    (0.5, 160, 50, 1.95, 61.0, 83.2),
    (0.5, 128, 32, 1.95, 57.7, 80.8),
    (0.5, 96, 18, 1.95, 51.2, 75.8),
    (0.35, 224, 59, 1.66, 60.3, 82.9),
    (0.35, 192, 43, 1.66, 58.2, 81.2),
    (0.35, 160, 30, 1.66, 55.7, 79.1),
    (0.35, 128, 20, 1.66, 50.8, 75.0),
    (0.35, 96, 11, 1.66, 45.5, 70.4),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """TF-Slim's channel rounding: nearest multiple, never 10% below."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    depth_multiplier: float
    input_size: int
    macs_m: int
    params_m: float
    top1: float
    top5: float

    @property
    def feature_dim(self) -> int:
        # Multipliers below 1.0 do not shrink the last 1280-channel conv.
        return _make_divisible(1280 * max(1.0, self.depth_multiplier))

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES

    def hub_handle(self, head: str, version: int = DEFAULT_HUB_VERSION) -> str:
        if head not in ("classification", "feature_vector"):
            raise ValueError(f"unknown head {head!r}")
        if version not in HUB_VERSIONS:
            raise ValueError(
                f"TF-Hub version {version} is not served; use one of "
                f"{', '.join(map(str, HUB_VERSIONS))}")
        return f"{_HUB_ROOT}/{self.name}/{head}/{version}"


def _name(multiplier: float, size: int) -> str:
    return f"mobilenet_v2_{round(multiplier * 100):03d}_{size}"


VARIANTS: dict[str, Variant] = {
    _name(m, s): Variant(_name(m, s), m, s, macs, params, top1, top5)
    for m, s, macs, params, top1, top5 in sorted(_SLIM_TABLE)
}


class UnknownModelError(ValueError):
    pass


def get_variant(name: str) -> Variant:
    """The catalog entry for `name`; a clear error listing valid names."""
    try:
        return VARIANTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, VARIANTS, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}.{hint} Valid names: "
            f"{', '.join(VARIANTS)} (see `mobilenet-embed models`).") from None


def format_table() -> str:
    """The catalog as a text table, fastest first, to choose speed vs accuracy."""
    header = ("model", "depth", "input", "features", "MACs(M)", "params(M)",
              "top-1", "top-5")
    rows = [header]
    for v in sorted(VARIANTS.values(), key=lambda v: (v.macs_m, v.name)):
        rows.append((v.name, f"{v.depth_multiplier:.2f}",
                     f"{v.input_size}x{v.input_size}", str(v.feature_dim),
                     str(v.macs_m), f"{v.params_m:.2f}", f"{v.top1:.1f}",
                     f"{v.top5:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append("MACs, parameters and ImageNet accuracy: the published "
                 "TF-Slim figures. TF-Hub handles: "
                 f"{_HUB_ROOT}/<model>/{{classification,feature_vector}}/"
                 f"{{{','.join(map(str, HUB_VERSIONS))}}}")
    return "\n".join(lines)
