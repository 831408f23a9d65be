"""SavedModels in either TF-Hub layout -> one frozen two-output graph.

  /3   one module with signatures `image_classification` and
       `image_feature_vector` (outputs under `default`). A TF1 Hub module is
       pruned to fetch both tensors from one graph call; a TF2 export of the
       same signatures is fused by `fusion.fuse_heads`.
  /4-/5  one callable SavedModel per head (classification/, feature_vector/);
       the two are fused into one graph by `fusion.fuse_heads`.
"""
from __future__ import annotations

import hashlib
import os

from transforms.model.spec import ModelSpec, ModelUnavailableError

_CLS_SIG, _FV_SIG = "image_classification", "image_feature_vector"


def freeze_saved_models(spec: ModelSpec, variant, paths: list[str],
                         digest: str):
    import tensorflow_hub as hub

    from transforms.model import fusion

    objs = [hub.load(p) for p in paths]
    if len(objs) == 2:
        return fusion.fuse_heads([callable_head(o, variant.input_size)
                                  for o in objs], digest)
    obj, path = objs[0], paths[0]
    signatures = set(obj.signatures.keys())
    if {_CLS_SIG, _FV_SIG} <= signatures:
        if hasattr(obj, "prune") and hasattr(obj, "graph"):
            return fusion.freeze_graph(
                prune_tf1(obj, path),
                "one pass: TF1 Hub module, both signatures pruned together",
                digest)
        return fusion.fuse_heads([single_output(obj.signatures[_CLS_SIG]),
                                  single_output(obj.signatures[_FV_SIG])],
                                 digest)
    if _FV_SIG in signatures:
        raise ModelUnavailableError(
            f"{spec.describe()} holds only the feature-vector head. Pass "
            "the classification module of the same variant instead: in "
            "the /3 layout it carries both heads.")
    raise ModelUnavailableError(
        f"{spec.describe()} holds one head only (a /4-/5 style "
        "SavedModel). Pass a directory holding classification/ and "
        "feature_vector/, or both with --model_handle and "
        "--feature_vector_handle.")


def single_output(fn):
    """Wrap a signature (kwargs in, dict out) as images -> one tensor."""
    import tensorflow as tf

    spec = fn.structured_input_signature[1]["images"]

    @tf.function(input_signature=[tf.TensorSpec(spec.shape, tf.float32)])
    def call(images):
        return fn(images=images)["default"]
    return call.get_concrete_function()


def callable_head(obj, size: int):
    """The single head of a /4-/5 SavedModel as images -> one tensor."""
    import tensorflow as tf

    image_spec = tf.TensorSpec([None, size, size, 3], tf.float32)
    if callable(obj):
        @tf.function(input_signature=[image_spec])
        def call(images):
            out = obj(images)
            return out["default"] if isinstance(out, dict) else out
        return call.get_concrete_function()
    if "serving_default" in obj.signatures:
        sig = obj.signatures["serving_default"]
        (name,) = sig.structured_input_signature[1].keys()

        @tf.function(input_signature=[image_spec])
        def call_signature(images):
            (out,) = sig(**{name: images}).values()
            return out
        return call_signature.get_concrete_function()
    raise ModelUnavailableError("the SavedModel is neither callable nor has a "
                                "serving_default signature")


def prune_tf1(obj, path: str):
    """Both heads of a TF1 Hub module from one graph call."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    # hub.load picks the meta graph with no tags for TF1 modules.
    (meta,) = [m for m in proto.meta_graphs if not m.meta_info_def.tags]
    cls, fv = meta.signature_def[_CLS_SIG], meta.signature_def[_FV_SIG]
    return obj.prune(feeds=[cls.inputs["images"].name],
                     fetches=[cls.outputs["default"].name,
                              fv.outputs["default"].name])


def weights_digest(paths: list[str]) -> str:
    """sha256 over the variables files (or the graph, where weights are inline)."""
    digest = hashlib.sha256()
    for path in paths:
        var_dir = os.path.join(path, "variables")
        files = ([os.path.join(var_dir, f) for f in sorted(os.listdir(var_dir))]
                 if os.path.isdir(var_dir) and os.listdir(var_dir)
                 else [os.path.join(path, "saved_model.pb")])
        for name in files:
            digest.update(os.path.basename(name).encode())
            with open(name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()
