"""gs:// for real: the job end to end against a GCS emulator on loopback.

The emulator (gcp-storage-emulator, a separate server process started and
stopped by the `gcs_emulator` fixture) serves the bucket; the job reaches it
through Beam's own GCS filesystem and google-cloud-storage, anonymously
(STORAGE_EMULATOR_HOST). Everything read back from the bucket is read with
a plain storage client, not with the pipeline's code.

With ../shared present the photos are real ImageNet JPEGs and the model is
the shared real-weights SavedModel; without it, scikit-image's sample photos
and a small TF1 Hub module built here stand in, so these tests always run.
"""
from __future__ import annotations

import collections
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gcs_emulator import (NetworkGuard, forget_beam_credentials,
                          gcs_emulator)  # noqa: F401 (a fixture)
from jobs import matrix, read_embeddings, run_job, sample_photos, summary
from model_fixtures import build_tf1_hub_module, seed_tfhub_cache
from paths import SAMPLE, SHARED_MODEL
from pipeline.cli import main
from transforms.model import loading, sources

BUCKET = "embed-test"
GS = f"gs://{BUCKET}"
HAVE_SHARED = (SAMPLE / "labels.csv").exists() and SHARED_MODEL.exists()
TINY = "mobilenet_v2_035_96"  # the variant the small TF1 Hub module stands for


@dataclass
class Corpus:
    images: list[Path]  # local copies, also uploaded to gs://BUCKET/images/
    image_dir: Path
    model_dir: Path  # the main model (shared real weights, or the tiny module)
    model: str
    tiny_dir: Path  # a small TF1 Hub module: fast loads for the other tests


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Corpus:
    root = tmp_path_factory.mktemp("gcs_corpus")
    image_dir = root / "images"
    image_dir.mkdir()
    if HAVE_SHARED:
        sources = sorted(SAMPLE.glob("*.JPEG"))[::17][:12]
    else:
        sources = sorted(p for p in sample_photos().iterdir()
                         if p.suffix in (".png", ".jpg"))[:12]
    images = [Path(shutil.copy(p, image_dir / p.name)) for p in sources]
    tiny = Path(build_tf1_hub_module(str(root / "tiny"), size=96, feature_dim=1280))
    if HAVE_SHARED:
        model_dir, model = SHARED_MODEL / "v1_signatures", "mobilenet_v2_100_224"
    else:
        model_dir, model = tiny, TINY
    return Corpus(images, image_dir, model_dir, model, tiny)


@pytest.fixture(scope="module")
def bucket(gcs_emulator, corpus, tmp_path_factory):
    """The bucket: images/ (+ a manifest), models/main/, models/tiny*/; and a
    model cache of this module's own."""
    gcs_emulator.create_bucket(BUCKET)
    for image in corpus.images:
        gcs_emulator.upload_file(image, f"{GS}/images/{image.name}")
    gcs_emulator.upload_tree(corpus.model_dir, f"{GS}/models/main")
    for name in ("tiny-probe", "tiny-load", "tiny-mp"):
        gcs_emulator.upload_tree(corpus.tiny_dir, f"{GS}/models/{name}")
    # Relative entries (resolved against the manifest's folder) and absolute
    # ones, a comment and a blank line, as users write them.
    lines = ["# the sample", ""]
    for i, image in enumerate(corpus.images):
        lines.append(image.name if i % 2 else f"{GS}/images/{image.name}")
    manifest = corpus.image_dir.parent / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    gcs_emulator.upload_file(manifest, f"{GS}/images/manifest.txt")
    cache = tmp_path_factory.mktemp("model_cache")
    before = os.environ.get("MOBILENET_EMBED_CACHE_DIR")
    os.environ["MOBILENET_EMBED_CACHE_DIR"] = str(cache)
    try:
        yield gcs_emulator
    finally:
        if before is None:
            os.environ.pop("MOBILENET_EMBED_CACHE_DIR", None)
        else:
            os.environ["MOBILENET_EMBED_CACHE_DIR"] = before


def read_gs_table(emulator, prefix: str) -> pa.Table:
    """Every Parquet file under prefix, read back with a plain storage client."""
    parts = [u for u in emulator.list(prefix) if u.endswith(".parquet")]
    assert parts, f"no Parquet files under {prefix}"
    return pa.concat_tables(pq.read_table(io.BytesIO(emulator.read(u)))
                            for u in parts)


def by_name(table: pa.Table) -> dict[str, dict]:
    """Rows keyed by the file name: ids equal modulo the folder/bucket prefix."""
    rows = {}
    for row, features in zip(table.to_pylist(), matrix(table, "feature_vector")):
        name = row["image_id"].rsplit("/", 1)[-1]
        assert name not in rows, f"{name} twice"
        rows[name] = dict(row, features=features)
    return rows


def assert_same_rows(gs_table: pa.Table, local_table: pa.Table, prefix: str):
    gs_rows, local_rows = by_name(gs_table), by_name(local_table)
    assert sorted(gs_rows) == sorted(local_rows)
    for name, row in gs_rows.items():
        local = local_rows[name]
        assert row["image_id"] == f"{prefix}/{name}" == row["uri"]
        assert local["image_id"].endswith("/" + name)
        np.testing.assert_allclose(row["features"], local["features"], atol=1e-5,
                                   err_msg=name)
        assert row["top5_class_ids"] == local["top5_class_ids"], name
        assert row["top5_labels"] == local["top5_labels"], name
        assert row["content_sha256"] == local["content_sha256"], name


@pytest.fixture(scope="module")
def runs(bucket, corpus, tmp_path_factory):
    """The same images run locally, over gs:// by glob and by manifest."""
    local_out = tmp_path_factory.mktemp("local_out")
    timings = {}
    started = time.monotonic()
    assert run_job("--input", corpus.image_dir, "--output", local_out,
                   "--model", corpus.model, "--model_handle", corpus.model_dir) == 0
    timings["local"] = time.monotonic() - started

    # A fresh process as far as Beam's credential cache goes: had the job
    # searched for credentials, the guard would see google.auth.default().
    forget_beam_credentials()
    guard = NetworkGuard()
    mark = bucket.mark()
    with guard.watch():
        started = time.monotonic()
        glob_code = run_job("--input", f"{GS}/images/*",
                            "--output", f"{GS}/out-glob", "--model", corpus.model,
                            "--model_handle", f"{GS}/models/main")
        timings["gs_glob"] = time.monotonic() - started
        started = time.monotonic()
        manifest_code = run_job("--manifest", f"{GS}/images/manifest.txt",
                                "--output", f"{GS}/out-manifest",
                                "--model", corpus.model,
                                "--model_handle", f"{GS}/models/main")
        timings["gs_manifest"] = time.monotonic() - started
    print(f"\nrun times (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    return dict(local=local_out, glob_code=glob_code, manifest_code=manifest_code,
                guard=guard, timings=timings, mark=mark)


# --- end to end ------------------------------------------------------------------

def test_glob_run_over_gs_matches_the_local_run(runs, bucket, corpus):
    assert runs["glob_code"] == 0
    gs_table = read_gs_table(bucket, f"{GS}/out-glob/embeddings/")
    assert gs_table.num_rows == len(corpus.images)
    assert_same_rows(gs_table, read_embeddings(runs["local"]), f"{GS}/images")


def test_manifest_run_over_gs_matches_the_local_run(runs, bucket, corpus):
    assert runs["manifest_code"] == 0
    gs_table = read_gs_table(bucket, f"{GS}/out-manifest/embeddings/")
    assert gs_table.num_rows == len(corpus.images)
    assert_same_rows(gs_table, read_embeddings(runs["local"]), f"{GS}/images")


def test_summary_and_dataset_json_are_written_to_the_bucket(runs, bucket, corpus):
    local = summary(runs["local"])
    for out in ("out-glob", "out-manifest"):
        files = bucket.list(f"{GS}/{out}/")
        assert f"{GS}/{out}/run_summary.json" in files
        assert f"{GS}/{out}/_dataset.json" in files
        assert not [f for f in files if "_staging" in f or f.endswith(".tmp")]
        s = json.loads(bucket.read(f"{GS}/{out}/run_summary.json"))
        assert s["output"] == f"{GS}/{out}"
        assert s["counts"]["embedded"] == len(corpus.images)
        assert s["counts"]["failed"] == 0 and s["accounting"]["ok"]
        assert s["dataset_rows"] == len(corpus.images)
        assert s["model"]["model_handle"] == f"{GS}/models/main"
        assert s["model"]["weights_sha256"] == local["model"]["weights_sha256"]
        dataset = json.loads(bucket.read(f"{GS}/{out}/_dataset.json"))
        assert dataset["model"] == corpus.model
        assert dataset["weights_sha256"] == local["model"]["weights_sha256"]


def test_gs_runs_stay_on_loopback_and_never_search_for_credentials(runs):
    guard = runs["guard"]
    # No metadata-server probe (169.254.169.254, metadata.google.internal),
    # no token endpoint, no real GCS: only the emulator on 127.0.0.1.
    assert guard.outside == []
    # Beam's search (google.auth.default(), retried with backoff) costs
    # ~25 s per process when nothing is found; the job skips it.
    assert guard.credential_searches == []


def test_a_fresh_cli_process_reads_the_bucket_without_a_credential_stall(
        runs, bucket, tmp_path):
    """`mobilenet-embed show gs://...` in a new process: Beam's credential
    cache is empty there, as on a worker."""
    r = subprocess.run([sys.executable, "-m", "pipeline", "show", f"{GS}/out-glob",
                        "--limit", "2"], capture_output=True, text=True,
                       env=_no_credentials_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "1 Parquet file(s)" in r.stdout and "embedded" in r.stdout
    # A credential search would fail at once on the missing key file and
    # Beam would warn "Unable to find default credentials".
    assert "default credentials" not in r.stderr


def _no_credentials_env() -> dict:
    """A process environment where any credential search fails at once and
    says so, instead of probing the metadata server for ~25 s."""
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
                GOOGLE_APPLICATION_CREDENTIALS="/nonexistent/key.json")


def test_resume_over_gs_skips_everything(runs, bucket, corpus):
    out = f"{GS}/out-glob"
    parts_before = [u for u in bucket.list(f"{out}/embeddings/")]
    mark = bucket.mark()
    code = run_job("--input", f"{GS}/images/*",
                   "--output", out, "--model", corpus.model,
                   "--model_handle", f"{GS}/models/main")
    assert code == 0
    s = json.loads(bucket.read(f"{out}/run_summary.json"))
    n = len(corpus.images)
    assert s["counts"]["entries_listed"] == n
    assert s["counts"]["skipped_already_embedded"] == n
    assert s["counts"]["embedded"] == 0 and s["counts"]["failed"] == 0
    assert s["accounting"]["ok"] and s["dataset_rows"] == n
    assert bucket.list(f"{out}/embeddings/") == parts_before
    # Nothing re-read: no image bytes, no model bytes (cached per process).
    assert bucket.media_reads(mark) and not [
        r for r in bucket.media_reads(mark)
        if r.startswith(("images/", "models/")) and not r.endswith(".txt")]


# --- the model on GCS --------------------------------------------------------------

def _tiny_spec(name: str) -> loading.ModelSpec:
    return loading.ModelSpec(variant=TINY, source="saved_model",
                             handle=f"{GS}/models/{name}")


@pytest.fixture(scope="module")
def reads_per_copy(bucket, tmp_path_factory):
    """The object reads of one copy of the tiny module (the emulator's log
    shows one line per request; a copy reads each object in 1-3 requests)."""
    before = os.environ["MOBILENET_EMBED_CACHE_DIR"]
    os.environ["MOBILENET_EMBED_CACHE_DIR"] = str(tmp_path_factory.mktemp("probe"))
    try:
        mark = bucket.mark()
        sources.local_copy(f"{GS}/models/tiny-probe", _tiny_spec("tiny-probe"))
        reads = collections.Counter(r.split("/", 2)[2]
                                    for r in bucket.media_reads(mark))
    finally:
        os.environ["MOBILENET_EMBED_CACHE_DIR"] = before
    assert reads and set(reads) >= {"saved_model.pb", "tfhub_module.pb"}
    return reads


def test_model_is_copied_once_and_loaded_once_per_process(
        bucket, reads_per_copy, monkeypatch, tmp_path):
    import tensorflow_hub as hub

    from transforms.inference import MobileNetV2Handler
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    spec = _tiny_spec("tiny-load")
    monkeypatch.delitem(loading._CACHE, spec, raising=False)
    hub_loads = []
    real_hub_load = hub.load
    monkeypatch.setattr(hub, "load", lambda *a, **k: hub_loads.append(a) or
                        real_hub_load(*a, **k))
    mark = bucket.mark()
    # What RunInference does on every DoFn setup in every bundle, from
    # several threads at once.
    handler = MobileNetV2Handler(spec)
    models, errors = [], []

    def load_many():
        try:
            for _ in range(5):
                models.append(handler.load_model())
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=load_many) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(models) == 20
    assert len({id(m) for m in models}) == 1
    assert len(hub_loads) == 1
    reads = collections.Counter(r.split("/", 2)[2] for r in bucket.media_reads(mark))
    assert reads == reads_per_copy  # every object read exactly one copy's worth
    assert len([q for q in bucket.listings(mark) if "models/tiny-load" in q]) == 1

    # A new worker process on the same machine: the copy on disk is reused
    # (listed to check it is current, nothing downloaded) and so is the
    # frozen graph cached from it: the SavedModel is not loaded again.
    monkeypatch.delitem(loading._CACHE, spec)
    mark = bucket.mark()
    model = handler.load_model()
    assert model is not models[0] and len(hub_loads) == 1
    assert bucket.media_reads(mark) == []
    assert model.weights_sha256 == models[0].weights_sha256

    # The model replaced in the bucket: the next process copies it anew.
    monkeypatch.delitem(loading._CACHE, spec)
    replaced = tmp_path / "tfhub_module.pb"
    replaced.write_bytes(b"\x08\x03\x08\x03")  # still FORMAT_V3, 2 bytes longer
    bucket.upload_file(replaced, f"{GS}/models/tiny-load/tfhub_module.pb")
    mark = bucket.mark()
    handler.load_model()
    assert collections.Counter(r.split("/", 2)[2] for r in
                               bucket.media_reads(mark)) == reads_per_copy


@pytest.mark.parametrize("case", ["no_such_folder", "no_such_bucket",
                                  "not_a_saved_model", "damaged"])
def test_missing_or_unreadable_model_uri_fails_fast(bucket, corpus, case, capsys,
                                                    tmp_path):
    handle = {"no_such_folder": f"{GS}/models/nope",
              "no_such_bucket": "gs://no-such-bucket-here/model",
              "not_a_saved_model": f"{GS}/images",
              "damaged": f"{GS}/models/damaged"}[case]
    expected = {"no_such_folder": f"no files under {handle}",
                "no_such_bucket": f"could not list the SavedModel at {handle}",
                "not_a_saved_model": f"{handle} is not a SavedModel directory",
                "damaged": f"could not load {handle}"}[case]
    if case == "damaged":
        (tmp_path / "variables").mkdir()
        (tmp_path / "saved_model.pb").write_bytes(b"\x08\x01not a SavedModel")
        (tmp_path / "variables" / "variables.index").write_bytes(b"")
        bucket.upload_tree(tmp_path, handle)
    out = f"{GS}/out-fail-{case}"
    mark = bucket.mark()
    code = main(["run", "--progress", "off", "--input", f"{GS}/images/*",
                 "--output", out, "--model", corpus.model, "--model_handle", handle])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"error: {expected}" in err and "Traceback" not in err
    # Before any image was read, and nothing written.
    assert not [r for r in bucket.media_reads(mark) if r.startswith("images/")]
    assert bucket.list(out) == []


def test_cli_process_exit_code_for_a_missing_model_uri(bucket, tmp_path):
    mark = bucket.mark()
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--input", f"{GS}/images/*",
         "--output", f"{GS}/out-cli-missing", "--model_handle",
         f"{GS}/models/missing"], capture_output=True, text=True,
        env=_no_credentials_env(), cwd=tmp_path, timeout=300)
    assert r.returncode == 2, r.stderr
    assert f"error: no files under {GS}/models/missing" in r.stderr
    assert "Traceback" not in r.stderr and "default credentials" not in r.stderr
    assert not [x for x in bucket.media_reads(mark) if x.startswith("images/")]
    assert bucket.list(f"{GS}/out-cli-missing") == []


# --- several worker processes ---------------------------------------------------

@pytest.fixture(scope="module")
def single_process_run(corpus, tmp_path_factory) -> Path:
    """The small model over the local images, in one process."""
    out = tmp_path_factory.mktemp("single")
    assert run_job("--input", corpus.image_dir, "--output", out, *SMALL_BATCHES,
                   "--model_handle", corpus.tiny_dir) == 0
    return out


SMALL_BATCHES = ("--model", TINY, "--max_batch_size", "2", "--rows_per_file", "5")
MULTI_PROCESS = ("--direct_running_mode", "multi_processing",
                 "--direct_num_workers", "2")


def _no_worker_left(bucket) -> None:
    """The SDK worker processes are gone once the job returns."""
    import psutil
    _, alive = psutil.wait_procs(
        [c for c in psutil.Process().children(recursive=True)
         if c.pid != bucket.process.pid], timeout=10)
    assert not alive, [(c.pid, c.cmdline()) for c in alive]


def test_multi_process_local_run_matches_the_single_process_run(
        bucket, corpus, single_process_run, tmp_path):
    out = tmp_path / "multi"
    started = time.monotonic()
    code = main(["run", "--progress", "on", "--input", str(corpus.image_dir),
                 "--output", str(out), *SMALL_BATCHES,
                 "--model_handle", str(corpus.tiny_dir), *MULTI_PROCESS])
    print(f"\nmulti-process local run: {time.monotonic() - started:.1f} s")
    assert code == 0
    _no_worker_left(bucket)
    multi, single = read_embeddings(out), read_embeddings(single_process_run)
    assert multi.num_rows == len(corpus.images)
    assert_same_rows(multi, single, str(corpus.image_dir))
    s = summary(out)
    assert s["counts"]["embedded"] == len(corpus.images) and s["accounting"]["ok"]
    assert s["dataset_rows"] == len(corpus.images)
    assert not (out / "_staging").exists()
    assert len(list((out / "embeddings").glob("*.parquet"))) >= 3  # 5 rows a file


def test_multi_process_gs_run_matches_and_reads_the_model_once_per_process(
        bucket, corpus, single_process_run, reads_per_copy, tmp_path, monkeypatch):
    """2 SDK worker processes, everything on gs://: same rows as one process;
    the model copied once for the machine and loaded once per process."""
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    mark = bucket.mark()
    started = time.monotonic()
    code = main(["run", "--progress", "on", "--input", f"{GS}/images/*",
                 "--output", f"{GS}/out-mp", *SMALL_BATCHES,
                 "--model_handle", f"{GS}/models/tiny-mp", *MULTI_PROCESS])
    print(f"\nmulti-process run over gs://: {time.monotonic() - started:.1f} s")
    assert code == 0
    _no_worker_left(bucket)
    multi = read_gs_table(bucket, f"{GS}/out-mp/embeddings/")
    assert_same_rows(multi, read_embeddings(single_process_run), f"{GS}/images")
    s = json.loads(bucket.read(f"{GS}/out-mp/run_summary.json"))
    assert s["counts"]["embedded"] == len(corpus.images) and s["accounting"]["ok"]
    assert s["counts"]["skipped_not_image_extension"] == 1  # manifest.txt
    model_reads = collections.Counter(
        r.split("/", 2)[2] for r in bucket.media_reads(mark)
        if r.startswith("models/tiny-mp/"))
    assert model_reads == reads_per_copy  # one copy for the whole machine
    # Listed by the launcher, then once by each worker process that loads
    # it (12 images in batches of 2): never per bundle or batch.
    listings = [q for q in bucket.listings(mark) if "models/tiny-mp" in q]
    assert 1 <= len(listings) <= 3, listings


# --- fetch-model: staging a TF-Hub module on GCS ----------------------------------

def test_fetch_model_stages_a_hub_module_on_gcs_for_workers(
        bucket, corpus, tmp_path, monkeypatch, capsys):
    spec = loading.ModelSpec(variant=TINY)  # tfhub, version 3
    (handle,) = spec.hub_handles()
    seed_tfhub_cache(str(tmp_path / "hub"), handle, str(corpus.tiny_dir))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub"))
    target = f"{GS}/models/staged/{TINY}"
    assert main(["fetch-model", "--model", TINY, "--to", target]) == 0
    assert f"--model_handle {target}" in capsys.readouterr().out
    local_files = sorted(p.relative_to(corpus.tiny_dir).as_posix()
                         for p in corpus.tiny_dir.rglob("*") if p.is_file())
    assert bucket.list(target + "/") == [f"{target}/{f}" for f in local_files]
    for f in local_files:
        assert bucket.read(f"{target}/{f}") == (corpus.tiny_dir / f).read_bytes()
    # A worker without internet runs from the staged copy.
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "empty_hub"))
    out = f"{GS}/out-staged"
    assert run_job("--input", f"{GS}/images/*", "--output", out, "--model", TINY,
                   "--model_handle", target) == 0
    s = json.loads(bucket.read(f"{out}/run_summary.json"))
    assert s["counts"]["embedded"] == len(corpus.images)
    direct = loading.load_model(loading.ModelSpec(
        variant=TINY, source="saved_model", handle=str(corpus.tiny_dir)))
    assert s["model"]["weights_sha256"] == direct.weights_sha256


@pytest.mark.skipif(not HAVE_SHARED, reason=f"needs the shared real-weights "
                    f"/4-style models at {SHARED_MODEL} (absent here)")
def test_fetch_model_stages_both_heads_of_version_4(bucket, tmp_path, monkeypatch):
    spec = loading.ModelSpec(hub_version=4)
    cls_handle, fv_handle = spec.hub_handles()
    seed_tfhub_cache(str(tmp_path), cls_handle, str(SHARED_MODEL / "classification"))
    seed_tfhub_cache(str(tmp_path), fv_handle, str(SHARED_MODEL / "feature_vector"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MOBILENET_EMBED_CACHE_DIR", str(tmp_path / "cache"))
    target = f"{GS}/models/staged/v4"
    assert main(["fetch-model", "--hub_version", "4", "--to", target]) == 0
    staged = bucket.list(target + "/")
    for head in ("classification", "feature_vector"):
        assert f"{target}/{head}/saved_model.pb" in staged
    # The layout --model_handle reads back: both heads found and copied.
    paths = sources.resolve_saved_model(loading.ModelSpec(
        source="saved_model", handle=target))
    assert [Path(p).name for p in paths] == ["classification", "feature_vector"]
    for p in paths:
        assert (Path(p) / "saved_model.pb").read_bytes() == (
            SHARED_MODEL / Path(p).name / "saved_model.pb").read_bytes()
