"""MobileNetV2 built in-process, with seeded random weights.

For benchmarks and smoke runs where the real weights are not at hand. Keras'
application model has the TF-Slim layer shapes (channel rounding to multiples
of 8, last conv kept at 1280 for multipliers below 1.0), so its parameter
counts equal the published table; tests check all 22 variants.

The model follows the TF-Hub image contract: float32 RGB in [0, 1] in, and
one model with two outputs (logits [N, 1001], feature vector [N, d]) so both
come from one forward pass.
"""
from __future__ import annotations

import hashlib

import numpy as np

from transforms.model.catalog import Variant


def build_random_model(variant: Variant, seed: int = 0):
    """A Keras model: images in [0, 1] -> (logits, feature_vector)."""
    import keras  # imported late: TensorFlow start-up is slow

    keras.utils.set_random_seed(seed)
    size = variant.input_size
    backbone = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=variant.depth_multiplier,
        weights=None, include_top=True, classes=variant.num_classes,
        classifier_activation=None)
    (pooling,) = [layer for layer in backbone.layers if isinstance(
        layer, keras.layers.GlobalAveragePooling2D)]
    pooled = pooling.output
    images = keras.Input((size, size, 3), name="images")
    # The TF-Hub modules take [0, 1] and scale to [-1, 1] inside.
    scaled = keras.layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(
        images)
    two_heads = keras.Model(backbone.inputs, [backbone.output, pooled])
    logits, features = two_heads(scaled)
    model = keras.Model(images, [logits, features],
                        name=f"{variant.name}_random")
    _he_initialize(model, seed)
    return model


def _he_initialize(model, seed: int) -> None:
    """Variance-preserving random kernels, so activations neither vanish nor
    explode through the 17 blocks (Keras' defaults with untrained batch norm
    leave the features around 1e-12, useless even for a smoke run)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            kernel, fan_in, gain = layer.kernel, np.prod(layer.kernel.shape[:2]), 2.0
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, fan_in, gain = layer.kernel, np.prod(layer.kernel.shape[:3]), 2.0
        elif isinstance(layer, keras.layers.Dense):
            kernel, fan_in, gain = layer.kernel, layer.kernel.shape[0], 1.0
        else:
            continue
        kernel.assign(rng.normal(0.0, np.sqrt(gain / fan_in),
                                 kernel.shape).astype(np.float32))


def counted_parameters(model) -> int:
    """Conv, depthwise and dense weights plus the logits bias: what TF-Slim counts.

    Batch-norm values are excluded, as in the published table.
    """
    import keras

    total = 0
    for layer in _all_layers(model):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                              keras.layers.Dense)):
            total += sum(int(np.prod(w.shape)) for w in layer.weights)
    return total


def _all_layers(model):
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)
        else:
            yield layer


def weights_digest(model) -> str:
    """sha256 over every weight array, in model order."""
    digest = hashlib.sha256()
    for w in model.weights:
        digest.update(np.ascontiguousarray(w.numpy()).tobytes())
    return digest.hexdigest()
