"""The catalog and every model source and layout, offline."""
from __future__ import annotations

import dataclasses

import csv
import re
import shutil

import numpy as np
import pytest

from model_fixtures import build_tf1_hub_module, seed_tfhub_cache
from transforms.model import catalog
from transforms.model.loading import (ModelSpec, ModelUnavailableError,
                                    load_model)
from paths import SHARED, needs_shared, SHARED_MODEL

PROBE = (np.random.RandomState(7).rand(3, 224, 224, 3) * 255).astype(np.uint8)


# --- catalog ----------------------------------------------------------------------

@needs_shared
def test_catalog_matches_the_published_slim_table():
    rows = list(csv.DictReader(open(SHARED / "reference" /
                                    "mobilenet_v2_slim_table.csv")))
    assert len(rows) == len(catalog.VARIANTS) == 22
    for row in rows:
        name = f"mobilenet_v2_{round(float(row['multiplier']) * 100):03d}_{row['resolution']}"
        v = catalog.get_variant(name)
        assert (v.depth_multiplier, v.input_size) == (float(row["multiplier"]),
                                                      int(row["resolution"]))
        assert (v.macs_m, v.params_m, v.top1, v.top5) == (
            int(row["macs_m"]), float(row["params_m"]), float(row["top1"]),
            float(row["top5"]))


@needs_shared
def test_catalog_handles_and_feature_dims_match_the_module_cards():
    cards = (SHARED / "reference" / "000_dbb5fc68d13e5ecb.txt").read_text()
    served = set(re.findall(
        r"tfhub\.dev/google/imagenet/(mobilenet_v2_\d{3}_\d+)/"
        r"(classification|feature_vector)/3", cards))
    ours = {(v.name, head) for v in catalog.VARIANTS.values()
            for head in ("classification", "feature_vector")}
    assert ours == served and len(ours) == 44
    # Each feature_vector card states its feature size.
    sections = re.split(r"\n# \d+\. ", cards)
    checked = 0
    for section in sections:
        title = re.search(r"mobilenet\\?_v2\\?_(\d{3})\\?_(\d+)-feature\\?_vector", section)
        size = re.search(r"num_features` = (\d+)", section)
        if title and size:
            name = f"mobilenet_v2_{title.group(1)}_{title.group(2)}"
            assert catalog.get_variant(name).feature_dim == int(size.group(1)), name
            checked += 1
    assert checked >= 20


def test_handles_for_each_version():
    v = catalog.get_variant("mobilenet_v2_050_160")
    assert v.hub_handle("feature_vector", 5) == (
        "https://tfhub.dev/google/imagenet/mobilenet_v2_050_160/feature_vector/5")
    assert ModelSpec(variant=v.name).hub_handles() == [
        "https://tfhub.dev/google/imagenet/mobilenet_v2_050_160/classification/3"]
    assert len(ModelSpec(variant=v.name, hub_version=4).hub_handles()) == 2
    with pytest.raises(ValueError, match="version"):
        v.hub_handle("classification", 2)


def test_unknown_model_lists_valid_names():
    with pytest.raises(catalog.UnknownModelError) as e:
        catalog.get_variant("mobilenet_v2_100_225")
    message = str(e.value)
    assert "mobilenet_v2_100_224" in message and "mobilenet_v2_035_96" in message
    assert message.count("mobilenet_v2_") >= 22


def test_models_table_lists_every_variant():
    table = catalog.format_table()
    for name in catalog.VARIANTS:
        assert name in table
    assert "582" in table and "75.0" in table  # 1.4_224 MACs and top-1


# --- random source: the architecture ---------------------------------------------

@pytest.mark.parametrize("name", sorted(catalog.VARIANTS))
def test_random_architecture_parameter_counts_match_slim(name):
    from transforms.model.architecture import build_random_model, counted_parameters
    variant = catalog.get_variant(name)
    model = build_random_model(variant, seed=0)
    # The table gives millions to two decimals.
    assert round(counted_parameters(model) / 1e6, 2) == variant.params_m
    logits, features = model.outputs
    assert tuple(logits.shape) == (None, 1001)
    assert tuple(features.shape) == (None, variant.feature_dim)


def test_random_weights_are_seeded():
    a = load_model(ModelSpec(variant="mobilenet_v2_035_96", source="random", seed=1))
    b = load_model(ModelSpec(variant="mobilenet_v2_035_96", source="random", seed=2))
    assert a.weights_sha256 != b.weights_sha256
    from transforms.model.architecture import build_random_model, weights_digest
    again = build_random_model(catalog.get_variant("mobilenet_v2_035_96"), seed=1)
    assert weights_digest(again) == a.weights_sha256
    assert a.heads.startswith("one pass")


def test_batches_run_on_few_shapes_and_padding_changes_no_row():
    from transforms.model.loading import padded_batch_sizes
    # Every batch up to 32 is covered exactly, on at most 7 distinct shapes.
    shapes = set()
    for n in range(1, 33):
        sizes = padded_batch_sizes(n)
        assert sum(images for images, _ in sizes) == n
        assert all(padded >= images for images, padded in sizes)
        shapes.update(padded for _, padded in sizes)
    assert shapes == {1, 2, 4, 8, 16, 24, 32}
    model = load_model(ModelSpec(variant="mobilenet_v2_035_96", source="random"))
    pixels = (np.random.RandomState(3).rand(27, 96, 96, 3) * 255).astype(np.uint8)
    logits, features = model.predict(pixels)  # 24 + 3 padded to 4
    assert logits.shape == (27, 1001) and features.shape == (27, 1280)
    for i in (0, 23, 24, 26):
        one_logits, one_features = model.predict(pixels[i:i + 1])
        np.testing.assert_allclose(logits[i], one_logits[0], atol=1e-4)
        np.testing.assert_allclose(features[i], one_features[0], atol=1e-4)
    # Padding rows must not leak into the padded batch's real rows.
    five = model.predict(pixels[:5])[0]  # padded to 8
    np.testing.assert_allclose(five, logits[:5], atol=1e-4)


# --- SavedModel layouts -------------------------------------------------------------

def _direct(path, head):
    import tensorflow as tf
    model = tf.saved_model.load(str(path))
    return model(tf.cast(PROBE, tf.float32) / 255.0).numpy()


@needs_shared
@pytest.mark.parametrize("layout", ["v1_signatures", "."])
def test_shared_model_both_layouts_match_direct_calls(layout):
    model = load_model(ModelSpec(source="saved_model",
                                 handle=str(SHARED_MODEL / layout)))
    logits, features = model.predict(PROBE)
    np.testing.assert_allclose(logits, _direct(SHARED_MODEL / "classification",
                                               "classification"), atol=1e-4)
    np.testing.assert_allclose(features, _direct(SHARED_MODEL / "feature_vector",
                                                 "feature_vector"), atol=1e-4)
    # Both heads from one pass: the fused graph holds one backbone.
    assert model.heads.startswith("one pass: heads fused"), model.heads
    assert "(52 of 104 convolutions kept)" in model.heads


@needs_shared
def test_feature_vector_handle_pairs_two_folders():
    spec = ModelSpec(source="saved_model",
                     handle=str(SHARED_MODEL / "classification"),
                     feature_handle=str(SHARED_MODEL / "feature_vector"))
    assert load_model(spec).heads.startswith("one pass")


def test_tf1_hub_module_is_pruned_to_one_call(tmp_path):
    import tensorflow as tf
    import tensorflow_hub as hub
    path = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    model = load_model(ModelSpec(variant="mobilenet_v2_035_96",
                                 source="saved_model", handle=path))
    assert model.heads == "one pass: TF1 Hub module, both signatures pruned together"
    pixels = PROBE[:, :96, :96]
    logits, features = model.predict(pixels)
    module = hub.load(path)
    images = tf.cast(pixels, tf.float32) / 255.0
    np.testing.assert_allclose(
        logits, module.signatures["image_classification"](images=images)["default"],
        atol=1e-5)
    np.testing.assert_allclose(
        features, module.signatures["image_feature_vector"](images=images)["default"],
        atol=1e-5)


def test_tfhub_source_resolves_through_the_hub_cache(tmp_path, monkeypatch):
    """The real tensorflow_hub resolver, fed from TFHUB_CACHE_DIR, no network."""
    module = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    cache = tmp_path / "cache"
    spec = ModelSpec(variant="mobilenet_v2_035_96")  # source tfhub, version 3
    (handle,) = spec.hub_handles()
    seed_tfhub_cache(str(cache), handle, module)
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(cache))
    model = load_model(spec)
    assert model.info().model_handle == handle
    assert model.heads.startswith("one pass: TF1")


@needs_shared
def test_tfhub_version_4_loads_both_heads_from_the_cache(tmp_path, monkeypatch):
    spec = ModelSpec(hub_version=4)
    cls_handle, fv_handle = spec.hub_handles()
    seed_tfhub_cache(str(tmp_path), cls_handle, str(SHARED_MODEL / "classification"))
    seed_tfhub_cache(str(tmp_path), fv_handle, str(SHARED_MODEL / "feature_vector"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    model = load_model(spec)
    assert model.heads.startswith("one pass: heads fused")


# --- failures -------------------------------------------------------------------------

def test_unreachable_hub_handle_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    handle = "https://127.0.0.1:9/google/imagenet/mobilenet_v2_035_96/classification/3"
    with pytest.raises(ModelUnavailableError) as e:
        load_model(ModelSpec(variant="mobilenet_v2_035_96", source="saved_model",
                             handle=handle))
    message = str(e.value)
    assert handle in message and "--model_handle" in message
    assert str(tmp_path) in message  # the cache that was looked in


def test_missing_model_folder(tmp_path):
    with pytest.raises(ModelUnavailableError, match="no SavedModel directory"):
        load_model(ModelSpec(source="saved_model", handle=str(tmp_path / "nope")))


def test_folder_without_saved_model(tmp_path):
    (tmp_path / "readme.txt").write_text("not a model")
    with pytest.raises(ModelUnavailableError, match="readme.txt"):
        load_model(ModelSpec(source="saved_model", handle=str(tmp_path)))


def test_feature_vector_only_module_is_refused(tmp_path):
    path = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    # Re-export without the classification signatures.
    from tensorflow.core.protobuf import saved_model_pb2
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString(open(f"{path}/saved_model.pb", "rb").read())
    for sig in ("default", "image_classification"):
        del proto.meta_graphs[0].signature_def[sig]
    open(f"{path}/saved_model.pb", "wb").write(proto.SerializeToString())
    with pytest.raises(ModelUnavailableError, match="only the feature-vector head"):
        load_model(ModelSpec(variant="mobilenet_v2_035_96", source="saved_model",
                             handle=path))


@needs_shared
def test_wrong_variant_for_the_weights(tmp_path):
    handle = str(SHARED_MODEL / "v1_signatures")
    with pytest.raises(ModelUnavailableError, match="right variant"):
        load_model(ModelSpec(variant="mobilenet_v2_100_192", source="saved_model",
                             handle=handle))
    with pytest.raises(ModelUnavailableError, match=r"\[1664\]"):
        load_model(ModelSpec(variant="mobilenet_v2_130_224", source="saved_model",
                             handle=handle))


def test_damaged_saved_model(tmp_path):
    path = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    shutil.rmtree(f"{path}/variables")
    (tmp_path / "m" / "variables").mkdir()
    with pytest.raises(ModelUnavailableError, match="could not load"):
        load_model(ModelSpec(variant="mobilenet_v2_035_96", source="saved_model",
                             handle=path))


def test_frozen_graph_cache_is_reused_and_survives_damage(tmp_path, monkeypatch):
    from transforms.model import loading
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    # TensorFlow runs it: ONNX Runtime would not read the frozen graph again.
    spec = ModelSpec(variant="mobilenet_v2_035_96", source="saved_model",
                     handle=path, runtime="tensorflow")
    pixels = PROBE[:, :96, :96]
    first = loading._load_uncached(spec)
    (entry,) = (tmp_path / "cache" / "graphs").glob("*.pb")
    built = []
    monkeypatch.setattr(loading, "freeze_saved_models",
                        lambda *a: built.append(a) or pytest.fail("rebuilt"))
    second = loading._load_uncached(spec)  # from the cache: nothing rebuilt
    assert not built and second.heads == first.heads
    np.testing.assert_array_equal(second.predict(pixels)[1], first.predict(pixels)[1])
    monkeypatch.undo()
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    entry.write_bytes(b"damaged")
    third = loading._load_uncached(spec)  # rebuilt, and the entry repaired
    np.testing.assert_array_equal(third.predict(pixels)[1], first.predict(pixels)[1])
    assert entry.read_bytes() != b"damaged"


def test_launcher_model_info_comes_from_the_cache_without_loading(tmp_path, monkeypatch):
    """A launcher that does not run the model reads its metadata from the
    graph cache: the same as loading it, and nothing when not cached."""
    from transforms.model import loading
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    path = build_tf1_hub_module(str(tmp_path / "m"), size=96, feature_dim=1280)
    folder = ModelSpec(variant="mobilenet_v2_035_96", source="saved_model",
                       handle=path, runtime="tensorflow")
    random = ModelSpec(variant="mobilenet_v2_035_96", source="random", seed=5,
                       runtime="tensorflow")
    for spec in (folder, random):
        assert loading.cached_info(spec) is None  # not loaded yet
        loaded = loading._load_uncached(spec)
        cached = loading.cached_info(spec)
        # The same record; the runtime and engine are the workers' to say
        # (their device, their CPU's measurement).
        worker_side = dict(runtime="", engine="", engine_choice="")
        assert dataclasses.replace(cached, **worker_side) == \
            dataclasses.replace(loaded.info(), **worker_side)
        assert cached.engine == ""
        assert cached.runtime.startswith("tensorflow ")
    # Other weights in the same folder: the cache entry no longer applies.
    other = build_tf1_hub_module(str(tmp_path / "m2"), size=96, feature_dim=1280,
                                 seed=9)
    shutil.rmtree(path)
    shutil.copytree(other, path)
    assert loading.cached_info(folder) is None
    # A model that cannot be had fails as load_model does.
    with pytest.raises(ModelUnavailableError, match="no SavedModel directory"):
        loading.cached_info(ModelSpec(variant="mobilenet_v2_035_96",
                                          source="saved_model",
                                          handle=str(tmp_path / "absent")))


@needs_shared
def test_a_model_that_fails_its_checks_is_not_cached(tmp_path, monkeypatch):
    from transforms.model import loading
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    spec = ModelSpec(variant="mobilenet_v2_100_192", source="saved_model",
                     handle=str(SHARED_MODEL / "v1_signatures"))
    with pytest.raises(ModelUnavailableError, match="right variant"):
        loading._load_uncached(spec)
    assert loading.cached_info(spec) is None
    assert not list((tmp_path / "cache").rglob("*.pb"))
