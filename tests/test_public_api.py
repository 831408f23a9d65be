"""The public Beam surface, in a pipeline the test builds itself."""
from __future__ import annotations

import apache_beam as beam
import numpy as np

from jobs import matrix, read_embeddings, read_errors, sample_photos, summary


def test_embed_images_and_write_the_dataset_in_a_users_pipeline(tmp_path):
    from transforms import (Dataset, EmbedImages, ModelSpec,
                            WriteEmbeddingDataset, dataset_metadata)
    from transforms.composite import default_settings
    from transforms.decode import DecodeLimits, decode_and_resize
    from transforms.model.loading import load_model

    spec = ModelSpec("mobilenet_v2_035_96", source="random")
    photos = sorted(sample_photos().glob("*.png"))[:4]
    as_bytes = photos[4 - 1].read_bytes()
    inputs = [str(p) for p in photos[:3]] + [
        ("from-bytes", as_bytes),
        ("not-an-image", b"<html>login page</html>"),
        str(tmp_path / "missing.jpg"),
    ]
    out = tmp_path / "out"
    with beam.Pipeline(runner="FnApiRunner") as p:
        embedded = p | beam.Create(inputs) | EmbedImages(spec)
        _ = embedded | WriteEmbeddingDataset(Dataset(str(out)),
                                             dataset_metadata(spec))

    table = read_embeddings(out)
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted([str(p) for p in photos[:3]] + ["from-bytes"])
    errors = {r["image_id"]: (r["stage"], r["error_class"])
              for r in read_errors(out).to_pylist()}
    assert errors == {"not-an-image": ("decode", "UnrecognizedFormat"),
                      str(tmp_path / "missing.jpg"): ("read", "FileNotFound")}
    s = summary(out)
    assert s["accounting"]["ok"] and s["counts"]["entries_listed"] == 6
    assert Dataset(str(out)).metadata().model.model == "mobilenet_v2_035_96"
    # The vectors are the model's for the decoded pixels.
    model = load_model(spec)
    pixels = np.stack([decode_and_resize(as_bytes, default_settings(spec),
                                         DecodeLimits())[0]])
    _, features = model.predict(pixels)
    row = ids.index("from-bytes")
    np.testing.assert_allclose(matrix(table, "feature_vector")[row], features[0],
                               atol=1e-5)
