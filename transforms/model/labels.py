"""ImageNet labels in the order of the modules' 1001 logits (0 = background)."""
from __future__ import annotations

import functools
from importlib import resources

LABEL_SET = "imagenet_1001"


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Short names (text before the first comma), as TF-Hub's ImageNetLabels.txt."""
    text = resources.files("transforms.model").joinpath(
        "data", "imagenet_labels_1001.txt").read_text(encoding="utf-8")
    labels = tuple(line.split(",")[0].strip() for line in text.splitlines())
    if len(labels) != 1001 or labels[0] != "background":
        raise RuntimeError("the packaged ImageNet label file is damaged")
    return labels
