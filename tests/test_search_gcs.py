"""The search commands on a dataset in a bucket (the GCS emulator): the index
is built locally and committed to gs://, queries and dedup read it back."""
from __future__ import annotations

import io
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from gcs_emulator import gcs_emulator  # noqa: F401 (a fixture)
from jobs import run_job, sample_photos
from pipeline.commands.search import dedup_main, index_main, query_main

BUCKET = "search-test"
GS = f"gs://{BUCKET}"


def test_index_query_and_dedup_over_gs(gcs_emulator, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg"):
        shutil.copy(sample_photos() / name, photos / name)
    shutil.copy(sample_photos() / "coffee.png", photos / "coffee_copy.png")
    local = tmp_path / "out"
    assert run_job("--input", str(photos), "--output", str(local), "--model_source", "random") == 0
    gcs_emulator.create_bucket(BUCKET)
    gcs_emulator.upload_tree(local, f"{GS}/out")

    assert index_main([f"{GS}/out"]) == 0
    infos = json.loads(gcs_emulator.read(f"{GS}/out/index/index_infos.json"))
    stored = gcs_emulator.list(f"{GS}/out/index/{infos['files']}/")
    assert {u.rsplit("/", 1)[-1] for u in stored} == {"index.faiss", "rows.parquet",
                                                      "index_infos.json"}
    assert infos["rows"] == 5

    target = str(photos / "chelsea.png")
    capsys.readouterr()
    assert query_main([f"{GS}/out", "--image", target, "--k", "1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["neighbors"][0]
    assert best["image_id"].endswith("chelsea.png")

    assert dedup_main([f"{GS}/out", "--threshold", "0.9999"]) == 0
    summary = json.loads(gcs_emulator.read(f"{GS}/out/duplicates/dedup_summary.json"))
    assert summary["exact_pairs"] == 1 and summary["images"] == 5
    parts = gcs_emulator.list(f"{GS}/out/duplicates/{summary['files']}/pairs/")
    assert parts and all(p.endswith(".parquet") for p in parts)
    pairs = pa.concat_tables([pq.read_table(io.BytesIO(gcs_emulator.read(p))) for p in parts])
    exact = [p for p in pairs.to_pylist() if p["kind"] == "exact"]
    assert len(exact) == 1 and {exact[0]["image_id_a"].rsplit("/", 1)[-1],
                                exact[0]["image_id_b"].rsplit("/", 1)[-1]} == \
        {"coffee.png", "coffee_copy.png"}


def test_a_reader_of_a_vanished_build_reads_the_new_one(gcs_emulator, tmp_path):
    # issue 25 (3): a query that read the pointer just before `index
    # --rebuild` removed that build copied a half-deleted folder (404). The
    # replaced build now stays until the next run, and a reader whose build
    # vanished reads the pointer again.
    from pipeline.search.index import SearchIndex, download_index
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut.png", "coffee.png", "chelsea.png"):
        shutil.copy(sample_photos() / name, photos / name)
    local = tmp_path / "out"
    assert run_job("--input", str(photos), "--output", str(local), "--model_source", "random") == 0
    gcs_emulator.create_bucket(f"{BUCKET}-race")
    gcs_emulator.upload_tree(local, f"{GS}-race/out")
    index = f"{GS}-race/out/index"

    def pointer():
        return json.loads(gcs_emulator.read(f"{index}/index_infos.json"))

    assert index_main([f"{GS}-race/out"]) == 0
    first = pointer()
    assert index_main([f"{GS}-race/out", "--rebuild"]) == 0
    second = pointer()
    assert second["files"] != first["files"]
    assert gcs_emulator.list(f"{index}/{first['files']}/")  # kept for readers still copying
    copy = download_index(index, first)
    assert json.load(open(f"{copy}/index_infos.json"))["files"] == first["files"]

    assert index_main([f"{GS}-race/out", "--rebuild"]) == 0
    third = pointer()
    assert not gcs_emulator.list(f"{index}/{first['files']}/")  # removed by this run
    copy = download_index(index, first)  # the reader's pointer is stale: it retries
    assert json.load(open(f"{copy}/index_infos.json"))["files"] == third["files"]
    assert SearchIndex.open(index).ntotal == 3
