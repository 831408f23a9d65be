"""ImageNet labels in the order of the modules' 1001 logits (0 = background)."""
from __future__ import annotations

import functools
from importlib import resources

from schemas import NUM_CLASSES

LABEL_SET = f"imagenet_{NUM_CLASSES}"


@functools.lru_cache(maxsize=1)
def imagenet_labels() -> tuple[str, ...]:
    """Short names (text before the first comma), as TF-Hub's ImageNetLabels.txt."""
    text = resources.files("transforms.model").joinpath(
        "data", f"imagenet_labels_{NUM_CLASSES}.txt").read_text(encoding="utf-8")
    labels = tuple(line.split(",")[0].strip() for line in text.splitlines())
    if len(labels) != NUM_CLASSES or labels[0] != "background":
        raise RuntimeError("the packaged ImageNet label file is damaged")
    return labels
