"""Models built by the tests, in the formats TF-Hub serves.

TF-Hub is out of reach from CI, so the loading paths are exercised with
models made here in the real formats:
  - a genuine TF1 Hub module (the /3 format: a TF1 SavedModel with the
    empty tag set, ref variables, the signatures `default`,
    `image_classification` and `image_feature_vector`, and tfhub_module.pb);
  - a TF-Hub cache folder as tensorflow_hub lays it out, so the real
    `hub.resolve(handle)` finds a module without any network.
"""
from __future__ import annotations

import hashlib
import os
import shutil

import numpy as np

# A ModuleDef proto with format = FORMAT_V3: field 1 (varint) = 3. Hub only
# checks that this file exists to treat the folder as a TF1 Hub module.
_MODULE_DEF_V3 = b"\x08\x03"


def build_tf1_hub_module(path: str, size: int, feature_dim: int,
                         seed: int = 0) -> str:
    """A small conv net exported exactly as TF1 Hub /3 modules are."""
    import tensorflow as tf
    v1 = tf.compat.v1
    rng = np.random.RandomState(seed)
    graph = tf.Graph()
    with graph.as_default():
        images = v1.placeholder(tf.float32, [None, size, size, 3], name="images")

        def variable(name, shape, scale):
            # use_resource=False: TF1 modules hold ref variables.
            return v1.get_variable(
                name, initializer=(rng.randn(*shape) * scale).astype(np.float32),
                use_resource=False)

        net = tf.nn.conv2d(images * 2.0 - 1.0,
                           variable("conv1/weights", [3, 3, 3, 16], 0.3),
                           strides=2, padding="SAME")
        net = tf.nn.relu6(net)
        net = tf.nn.conv2d(net, variable("conv2/weights", [1, 1, 16, feature_dim],
                                         0.2), strides=1, padding="SAME")
        features = tf.reduce_mean(tf.nn.relu6(net), axis=[1, 2],
                                  name="feature_vector")
        logits = tf.add(tf.matmul(features, variable(
            "logits/weights", [feature_dim, 1001], 0.05)),
            variable("logits/biases", [1001], 0.1), name="logits")
        info = v1.saved_model.utils.build_tensor_info
        sig = v1.saved_model.signature_def_utils.build_signature_def
        classification = sig(inputs={"images": info(images)},
                             outputs={"default": info(logits)})
        feature_vector = sig(
            inputs={"images": info(images)},
            outputs={"default": info(features),
                     "conv2": info(net)})  # modules also expose endpoints
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = v1.saved_model.Builder(path)
            builder.add_meta_graph_and_variables(
                session, tags=[], signature_def_map={
                    "default": classification,
                    "image_classification": classification,
                    "image_feature_vector": feature_vector})
            builder.save()
    with open(os.path.join(path, "tfhub_module.pb"), "wb") as f:
        f.write(_MODULE_DEF_V3)
    return path


def seed_tfhub_cache(cache_dir: str, handle: str, module_dir: str) -> str:
    """Put `module_dir` where tensorflow_hub's resolver caches `handle`."""
    target = os.path.join(cache_dir, hashlib.sha1(handle.encode("utf8")).hexdigest())
    shutil.copytree(module_dir, target)
    # The descriptor hub writes next to a downloaded module.
    with open(target + ".descriptor.txt", "w") as f:
        f.write(f"Module: {handle}\n")
    return target
