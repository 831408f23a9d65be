"""Nothing lost: bad input isolated, every image accounted for, safe re-runs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import corpus
from jobs import (files_under, matrix, read_embeddings, read_errors, run_job,
                  sample_photos, summary)

RANDOM_SMALL = ("--model", "mobilenet_v2_035_96", "--model_source", "random")


def _manifest(path: Path, entries: list[str]) -> Path:
    path.write_text("\n".join(entries) + "\n")
    return path


def _rows_by_id(table) -> dict[str, dict]:
    return {row["image_id"]: row for row in table.to_pylist()}


# --- the hostile corpus through the real job -------------------------------------------

@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory):
    """Every corpus file, a missing entry, an unreadable file and a duplicate,
    listed in one manifest and run through the job."""
    root = tmp_path_factory.mktemp("corpus")
    folder = root / "files"
    expected = corpus.make_corpus(folder)
    entries = sorted(expected)
    for name, outcome in corpus.MISSING_FILES.items():
        entries.append(name)
        expected[name] = outcome
    shutil.copy(folder / "good.jpg", folder / "unreadable.jpg")
    entries.append("unreadable.jpg")
    entries.append("good.jpg")  # listed twice: embedded once, counted
    # Entries relative to the manifest's folder, as users write them.
    manifest = _manifest(root / "manifest.txt", [f"files/{e}" for e in entries])
    output = root / "out"
    with corpus.file_permissions_enforced() as enforced:
        refused = enforced and corpus.make_unreadable(folder / "unreadable.jpg")
        code = run_job("--manifest", manifest, "--output", output, *RANDOM_SMALL,
                       "--max_bytes", corpus.CORPUS_MAX_BYTES)
    expected["unreadable.jpg"] = corpus.UNREADABLE if refused else corpus.ok(96, 64)
    return {"folder": folder, "expected": expected, "output": output,
            "code": code, "entries": entries}


def test_corpus_every_file_ends_in_exactly_one_place(corpus_run):
    folder, expected = corpus_run["folder"], corpus_run["expected"]
    embedded = _rows_by_id(read_embeddings(corpus_run["output"]))
    errors = _rows_by_id(read_errors(corpus_run["output"]))
    assert not set(embedded) & set(errors)
    assert len(embedded) + len(errors) == len(expected)
    for name, outcome in expected.items():
        image_id = str(folder / name)
        if outcome.ok:
            row = embedded[image_id]
            assert (row["original_width"], row["original_height"]) == outcome.size, name
        else:
            row = errors[image_id]
            assert (row["stage"], row["error_class"]) == (outcome.stage,
                                                          outcome.error_class), name
            assert row["message"] and "\n" not in row["message"]


def test_corpus_summary_accounts_for_everything(corpus_run):
    s = summary(corpus_run["output"])
    expected = corpus_run["expected"]
    failures = [e for e in expected.values() if not e.ok]
    assert s["counts"]["entries_listed"] == len(corpus_run["entries"])
    assert s["counts"]["duplicates_dropped"] == 1
    assert s["counts"]["embedded"] == len(expected) - len(failures)
    assert s["counts"]["failed"] == len(failures)
    assert s["accounting"] == {"ok": True, "rule": s["accounting"]["rule"],
                               "unaccounted": 0}
    by_stage = {}
    for e in failures:
        by_stage[e.stage] = by_stage.get(e.stage, 0) + 1
    assert s["failures_by_stage"] == by_stage
    assert s["failures_by_reason"]["decode/DecompressionBomb"] == 2


def test_corpus_run_exits_non_zero_above_the_failure_rate(corpus_run):
    # A third of the corpus fails: far above the default --max_failure_rate
    # of 5%. The exit code says so, after every output was written.
    assert corpus_run["code"] == 1
    assert (corpus_run["output"] / "run_summary.json").exists()


def test_good_images_are_unchanged_by_bad_neighbours(corpus_run, tmp_path):
    folder, expected = corpus_run["folder"], corpus_run["expected"]
    good = [n for n, e in expected.items() if e.ok and n != "unreadable.jpg"]
    alone = tmp_path / "alone"
    code = run_job("--manifest", _manifest(tmp_path / "good.txt",
                                           [str(folder / n) for n in good]),
                   "--output", alone, *RANDOM_SMALL)
    assert code == 0
    mixed = read_embeddings(corpus_run["output"])
    clean = read_embeddings(alone)
    order = {i: k for k, i in enumerate(clean.column("image_id").to_pylist())}
    ids = [i for i in mixed.column("image_id").to_pylist() if i in order]
    assert len(ids) == len(good)
    mixed_features = matrix(mixed, "feature_vector")
    clean_features = matrix(clean, "feature_vector")
    position = {i: k for k, i in enumerate(mixed.column("image_id").to_pylist())}
    for image_id in ids:
        np.testing.assert_allclose(mixed_features[position[image_id]],
                                   clean_features[order[image_id]], atol=1e-5)


def test_exif_rotated_file_embeds_like_its_upright_twin(corpus_run):
    folder = corpus_run["folder"]
    table = read_embeddings(corpus_run["output"])
    features = dict(zip(table.column("image_id").to_pylist(),
                        matrix(table, "feature_vector")))
    upright = features[str(folder / "upright.jpg")]
    for orientation in (3, 6, 8):
        rotated = features[str(folder / f"exif-orientation-{orientation}.jpg")]
        cosine = rotated @ upright / np.linalg.norm(rotated) / np.linalg.norm(upright)
        # JPEG re-encoding of the rotated pixels differs slightly, no more.
        assert cosine > 0.999, (orientation, cosine)


# --- one guilty image in a failing batch ---------------------------------------------

def test_a_failing_batch_is_retried_image_by_image():
    from transforms.model.loading import ModelSpec, load_model
    from schemas import DecodedImage, Embedding, FailedImage
    from transforms.inference import MobileNetV2Handler

    model = load_model(ModelSpec(variant="mobilenet_v2_035_96", source="random"))

    class PoisonedModel:
        """The real model, but a batch holding an all-255 image fails."""
        def predict(self, pixels):
            if (pixels.reshape(len(pixels), -1) == 255).all(axis=1).any():
                raise RuntimeError("kernel failure on this input")
            return model.predict(pixels)

    rng = np.random.default_rng(0)
    images = [DecodedImage(f"id{i}", f"uri{i}",
                           rng.integers(0, 256, (96, 96, 3), dtype=np.uint8),
                           96, 96, "sha", 10) for i in range(6)]
    images[3] = images[3]._replace(pixels=np.full((96, 96, 3), 255, np.uint8))
    handler = MobileNetV2Handler(ModelSpec(variant="mobilenet_v2_035_96",
                                           source="random"))
    results = handler.run_inference(images, PoisonedModel())
    assert [type(r) for r in results] == [Embedding] * 3 + [FailedImage] + [Embedding] * 2
    assert results[3].stage == "inference" and results[3].error_class == "RuntimeError"
    alone = model.predict(np.stack([images[0].pixels]))[1][0]
    np.testing.assert_allclose(results[0].feature_vector, alone, atol=1e-5)


# --- deterministic output --------------------------------------------------------------

def test_same_image_same_vector_whatever_the_batch(tmp_path):
    photos = sorted(sample_photos().glob("*.png"))
    runs = {}
    for name, args in {"batch1": ("--max_batch_size", "1"),
                       "batch64": ("--max_batch_size", "64", "--min_batch_size", "64"),
                       "batch5": ("--max_batch_size", "5")}.items():
        assert run_job("--input", sample_photos() / "*.png", "--output",
                       tmp_path / name, *RANDOM_SMALL, *args) == 0
        table = read_embeddings(tmp_path / name)
        runs[name] = dict(zip(table.column("image_id").to_pylist(),
                              zip(matrix(table, "feature_vector"),
                                  matrix(table, "logits"))))
    assert set(runs["batch1"]) == set(runs["batch64"]) == set(runs["batch5"])
    assert len(runs["batch1"]) == len(photos)
    for image_id, (features, logits) in runs["batch1"].items():
        for other in ("batch64", "batch5"):
            # Each run measures its engine at its own batch size, so two runs
            # may use ONNX Runtime and OpenVINO, which agree to float
            # rounding (CI measured 1.4e-5 on features of magnitude 2.5).
            np.testing.assert_allclose(runs[other][image_id][0], features,
                                       rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(runs[other][image_id][1], logits,
                                       rtol=1e-5, atol=1e-4)


# --- resume ---------------------------------------------------------------------------

@pytest.fixture()
def twelve_photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, src in enumerate(sorted(sample_photos().glob("*.png"))[:12]):
        shutil.copy(src, folder / f"p{i:02d}.png")
    return folder


def test_rerun_embeds_only_the_rest(tmp_path, twelve_photos):
    out = tmp_path / "out"
    first = sorted(str(p) for p in twelve_photos.glob("*.png"))[:5]
    assert run_job("--manifest", _manifest(tmp_path / "first.txt", first),
                   "--output", out, *RANDOM_SMALL) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert run_job("--input", twelve_photos, "--output", out, *RANDOM_SMALL) == 0
    counts = summary(out)["counts"]
    assert counts["skipped_already_embedded"] == 5 and counts["embedded"] == 7
    ids = read_embeddings(out).column("image_id").to_pylist()
    assert sorted(ids) == sorted(str(p) for p in twelve_photos.glob("*.png"))
    # The first run's file is kept as it was.
    after = {p.name: p.stat().st_mtime_ns for p in (out / "embeddings").iterdir()}
    assert all(after.get(name) == mtime for name, mtime in before.items())
    # A third run has nothing left to do.
    assert run_job("--input", twelve_photos, "--output", out, *RANDOM_SMALL) == 0
    assert summary(out)["counts"]["embedded"] == 0
    assert summary(out)["dataset_rows"] == 12


def test_rerun_retries_earlier_failures_and_drops_their_old_rows(tmp_path, twelve_photos):
    out = tmp_path / "out"
    broken = twelve_photos / "p00.png"
    data = broken.read_bytes()
    broken.write_bytes(data[:40])  # truncated
    assert run_job("--input", twelve_photos, "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "0.5") == 0
    assert read_errors(out).num_rows == 1
    broken.write_bytes(data)  # repaired
    assert run_job("--input", twelve_photos, "--output", out, *RANDOM_SMALL) == 0
    assert read_errors(out) is None
    assert read_embeddings(out).num_rows == 12


def test_output_made_with_another_model_is_refused(tmp_path, twelve_photos, capsys):
    out = tmp_path / "out"
    assert run_job("--input", twelve_photos, "--output", out, *RANDOM_SMALL) == 0
    other_weights = ("--model", "mobilenet_v2_035_96", "--model_source", "random",
                     "--seed", "1")
    assert run_job("--input", twelve_photos, "--output", out, *other_weights) == 2
    err = capsys.readouterr().err
    assert "made differently" in err and "weights_sha256" in err and "--overwrite" in err
    assert run_job("--input", twelve_photos, "--output", out,
                   *RANDOM_SMALL, "--resize_mode", "center_crop") == 2
    assert "preprocessing" in capsys.readouterr().err
    assert run_job("--input", twelve_photos, "--output", out, *other_weights,
                   "--overwrite") == 0
    table = read_embeddings(out)
    assert table.num_rows == 12
    from schemas import read_metadata
    assert read_metadata(table.schema).model.model_handle == "random(seed=1)"


def test_kill_9_leaves_only_whole_files_and_the_rerun_completes(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted(sample_photos().glob("*.png"))
    for copy in range(8):  # ~180 images: long enough to kill mid-way
        for i, src in enumerate(sources):
            shutil.copy(src, folder / f"c{copy}_{i:02d}.png")
    total = len(list(folder.iterdir()))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "run", "--input", str(folder),
               "--output", str(out), "--model", "mobilenet_v2_100_224",
               "--model_source", "random", "--rows_per_file", "8",
               "--max_batch_size", "4", "--progress", "off"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    job = subprocess.Popen(command, env=env, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and job.poll() is None:
            if len(list((out / "embeddings").glob("*.parquet"))) >= 3 \
                    if (out / "embeddings").exists() else False:
                break
            time.sleep(0.05)
        assert job.poll() is None, "the job ended before it could be killed"
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait(timeout=60)
    committed = list((out / "embeddings").glob("*"))
    assert committed and all(p.suffix == ".parquet" for p in committed)
    done = sum(pq.ParquetFile(p).metadata.num_rows for p in committed)  # all readable
    assert 0 < done < total
    # Half-written files exist only in the staging area, out of readers' way,
    # and the killed run still holds the output's lock.
    staged = files_under(out / "_staging") if (out / "_staging").exists() else []
    assert all(f.endswith(".inprogress") for f in staged), staged
    assert json.loads((out / "_lock.json").read_text())["pid"] == job.pid
    assert run_job("--input", folder, "--output", out, "--model",
                   "mobilenet_v2_100_224", "--model_source", "random",
                   "--rows_per_file", "8") == 0
    s = summary(out)
    assert s["counts"]["skipped_already_embedded"] == done
    assert s["counts"]["embedded"] == total - done
    ids = read_embeddings(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == total
    assert not (out / "_staging").exists()  # the dead run's files are gone
    assert not (out / "_lock.json").exists()  # taken over, then released


# --- hostile names and ids --------------------------------------------------------------

def test_hostile_ids_cannot_write_outside_the_output(tmp_path, twelve_photos):
    hostile = ["../../escaped", "/tmp/absolute", "..", "a/../../b", "C:\\windows\\x",
               "name\nwith newline", "😀 emoji", "%2e%2e%2fencoded"]
    manifest = tmp_path / "ids.csv"
    photos = sorted(twelve_photos.glob("*.png"))
    with open(manifest, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "uri"])
        for image_id, photo in zip(hostile, photos):
            writer.writerow([image_id, photo])
    before = set(files_under(tmp_path))
    out = tmp_path / "out"
    assert run_job("--manifest", manifest, "--output", out, *RANDOM_SMALL) == 0
    assert sorted(read_embeddings(out).column("image_id").to_pylist()) == sorted(hostile)
    created = set(files_under(tmp_path)) - before
    assert created and all(path.startswith("out" + os.sep) for path in created)
    assert all(p.name.startswith("part-") for p in (out / "embeddings").iterdir())


def test_credentials_in_uris_never_reach_logs_or_outputs(tmp_path, twelve_photos, capfd):
    secret = "s3cr3tT0ken"
    manifest = _manifest(tmp_path / "m.txt", [
        str(twelve_photos / "p01.png"),
        f"unknownfs://user:{secret}@host/img.jpg",
        f"https://example.invalid/a.jpg?X-Goog-Signature={secret}&w=3"])
    out = tmp_path / "out"
    assert run_job("--manifest", manifest, "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "1") == 0
    captured = capfd.readouterr()
    assert secret not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    errors = read_errors(out).to_pylist()
    assert [e["stage"] for e in errors] == ["read", "read"]
    assert read_embeddings(out).num_rows == 1


def test_a_row_that_cannot_be_written_fails_alone(tmp_path):
    from schemas import DatasetMetadata, Embedding, FailedImage, ModelInfo
    from transforms.dataset import EMBEDDINGS, CommittedFile, Dataset
    from transforms.write import EmbeddingRows, WriteParquetFiles

    def embedding(i, dim=1280):
        return Embedding(f"id{i}", f"/img/{i}.jpg", np.zeros(1001, np.float32),
                         np.full(dim, i, np.float32), np.arange(5, dtype=np.int32),
                         np.full(5, 0.2, np.float32), 10, 10, "ab" * 32, 100)

    metadata = DatasetMetadata(ModelInfo("m", "random", "random(seed=0)", "ab",
                                         "one pass", 1280), {}, "labels")
    writer = WriteParquetFiles(Dataset(str(tmp_path)), EMBEDDINGS, "run1",
                               EmbeddingRows("m", 1280, ("l",) * 1001),
                               metadata=metadata, rows_per_file=100,
                               rows_per_row_group=4)
    writer.setup()
    writer.start_bundle()
    rows = [embedding(0), embedding(1), embedding(2, dim=7), embedding(3),
            embedding(4)]
    outputs = [o for row in rows for o in (writer.process(row) or [])]
    outputs += list(writer.finish_bundle())
    failed = [o.value for o in outputs if getattr(o, "tag", None) == "failed"]
    committed = [getattr(o, "value", o) for o in outputs
                 if getattr(o, "tag", None) != "failed"]
    assert [f.image_id for f in failed] == ["id2"]
    assert isinstance(failed[0], FailedImage) and failed[0].stage == "write"
    (done,) = [c for c in committed if isinstance(c, CommittedFile)]
    table = pq.read_table(done.path)
    assert table.column("image_id").to_pylist() == ["id0", "id1", "id3", "id4"]
