"""`mobilenet-embed export` on a real dataset, each format checked with the
store's own client running offline: LanceDB, Qdrant (local mode), Milvus
Lite, Vertex AI Vector Search JSON (against the documented format) and
BigQuery (load files, schema and Beam's vector writer's rows). Idempotence,
a grown dataset, another model refused, one writer per target, atomic
replace of file sets, bad targets in one line, Dataflow's dry run."""
from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from corpus import file_permissions_enforced
from gcs_emulator import gcs_emulator  # noqa: F401 (a fixture)
from jobs import matrix, read_embeddings, run_job, sample_photos
from pipeline.commands.export import export_main
from transforms.dataset import FolderLock

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png"]
MORE = ["horse.png", "motorcycle_left.png"]
VERTEX_KEYS = {"id", "embedding", "sparse_embedding", "restricts",
               "numeric_restricts", "crowding_tag"}  # the documented fields


def unit(x):
    x = np.asarray(x, np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """out: 5 photos; grown: the same plus 2; other: another model."""
    root = tmp_path_factory.mktemp("export")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(sample_photos() / name, photos / name)
    out, grown, other = root / "out", root / "grown", root / "other"
    assert run_job("--input", str(photos), "--output", str(out), "--model_source", "random") == 0
    shutil.copytree(out, grown)
    for name in MORE:
        shutil.copy(sample_photos() / name, photos / name)
    assert run_job("--input", str(photos), "--output", str(grown), "--model_source", "random") == 0
    assert run_job("--input", str(photos), "--output", str(other), "--model_source", "random",
                   "--model", "mobilenet_v2_050_160") == 0
    table = read_embeddings(out)
    return {"root": root, "out": out, "grown": grown, "other": other,
            "ids": table.column("image_id").to_pylist(),
            "vectors": unit(matrix(table, "feature_vector")),
            "top1": [t[0] for t in table.column("top5_labels").to_pylist()],
            "sha": table.column("content_sha256").to_pylist()}


def export(*args) -> int:
    return export_main([str(a) for a in args] + ["--direct_running_mode", "in_memory"])


def one_line_error(capsys, *words) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines()
           if not line.startswith("exporting ")]  # the progress line
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def vertex_rows(folder):
    files = sorted(p for p in os.listdir(folder) if p.endswith(".json"))
    rows = [json.loads(line) for f in files
            for line in (folder / f).read_text().splitlines()]
    return files, rows


# --- Vertex AI Vector Search ---------------------------------------------------

def test_vertex_json_has_restricts_and_crowding_tag_as_documented(data, tmp_path):
    to = tmp_path / "vertex"
    assert export(data["out"], "--format", "vertex", "--to", to, "--restrict",
                  "content_sha256", "--crowding_tag", "folder", "--shards", "2") == 0
    files, rows = vertex_rows(to)
    assert 1 <= len(files) <= 5000 and len(files) == 2  # one file per shard
    assert all(f.startswith("embeddings-") and f.endswith(".json") for f in files)
    assert sorted(r["id"] for r in rows) == sorted(data["ids"])
    by_id = {r["id"]: r for r in rows}
    for i, image_id in enumerate(data["ids"]):
        row = by_id[image_id]
        assert set(row) <= VERTEX_KEYS and isinstance(row["embedding"], list)
        np.testing.assert_allclose(row["embedding"], data["vectors"][i], atol=1e-6)
        assert row["restricts"] == [{"namespace": "label", "allow": [data["top1"][i]]},
                                    {"namespace": "content_sha256", "allow": [data["sha"][i]]}]
        assert row["crowding_tag"] == os.path.dirname(image_id)
    manifest = json.loads((to / "_export.manifest").read_text())
    assert manifest["rows"] == len(rows) and sorted(manifest["files"]) == files
    assert manifest["identity"]["feature_dim"] == "1280"
    assert not [p for p in os.listdir(to) if p.startswith("_staging")]


def test_reexport_replaces_the_set_and_a_shrunk_dataset_leaves_no_stale_rows(data, tmp_path):
    shrunk = tmp_path / "shrunk"
    shutil.copytree(data["out"], shrunk)
    to = tmp_path / "vertex"
    assert export(shrunk, "--format", "vertex", "--to", to, "--shards", "3") == 0
    first, rows = vertex_rows(to)
    assert len(rows) == len(PHOTOS) and len(first) == 3
    assert export(shrunk, "--format", "vertex", "--to", to) == 0  # the same again
    second, rows = vertex_rows(to)
    assert len(rows) == len(PHOTOS) and not set(first) & set(second)
    # dedup removed two rows: the part is rewritten with fewer rows
    (part,) = (shrunk / "embeddings").iterdir()
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 3), part)
    assert export(shrunk, "--format", "vertex", "--to", to) == 0
    _, rows = vertex_rows(to)
    assert sorted(r["id"] for r in rows) == sorted(table.column("image_id").to_pylist()[:3])


def test_interrupted_exports_leftovers_are_removed(data, tmp_path):
    to = tmp_path / "vertex"
    assert export(data["out"], "--format", "vertex", "--to", to) == 0
    # a run killed after moving its files, before its manifest: ours, unnamed
    (to / "embeddings-deadbeef0000-00000-of-00001.json").write_text('{"id":"x","embedding":[1]}\n')
    (to / "_staging-deadbeef0000").mkdir()
    (to / "_staging-deadbeef0000" / "embeddings-00000-of-00001.json").write_text("{}\n")
    assert export(data["out"], "--format", "vertex", "--to", to) == 0
    _, rows = vertex_rows(to)
    assert sorted(r["id"] for r in rows) == sorted(data["ids"])
    assert sorted(os.listdir(to)) == sorted(
        ["_export.manifest"] + json.loads((to / "_export.manifest").read_text())["files"])


def test_a_failing_export_keeps_the_previous_set_and_exits_3(data, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(data["out"], damaged)
    to = tmp_path / "vertex"
    assert export(damaged, "--format", "vertex", "--to", to) == 0
    before = {p: (to / p).read_bytes() for p in os.listdir(to)}
    (part,) = (damaged / "embeddings").iterdir()
    data_bytes = bytearray(part.read_bytes())
    footer = pq.ParquetFile(part).metadata.serialized_size + 8
    for i in range(4, len(data_bytes) - footer - 4, 97):  # the pages, not the footer
        data_bytes[i] ^= 0xFF
    part.write_bytes(bytes(data_bytes))
    capsys.readouterr()
    assert export(damaged, "--format", "vertex", "--to", to) == 3
    one_line_error(capsys, "export pipeline failed")
    assert {p: (to / p).read_bytes() for p in os.listdir(to)} == before


def test_files_this_command_did_not_write_are_refused_unless_overwrite(data, tmp_path, capsys):
    to = tmp_path / "vertex"
    to.mkdir()
    (to / "notes.json").write_text("{}")
    capsys.readouterr()
    assert export(data["out"], "--format", "vertex", "--to", to) == 2
    one_line_error(capsys, "notes.json", "--overwrite")
    assert os.listdir(to) == ["notes.json"]
    assert export(data["out"], "--format", "vertex", "--to", to, "--overwrite") == 0
    assert "notes.json" not in os.listdir(to)


def test_another_models_export_is_refused_unless_overwrite(data, tmp_path, capsys):
    for fmt, to in (("vertex", tmp_path / "v"), ("lancedb", tmp_path / "l")):
        assert export(data["out"], "--format", fmt, "--to", to) == 0
        before = sorted(os.listdir(to))
        capsys.readouterr()
        assert export(data["other"], "--format", fmt, "--to", to) == 2
        one_line_error(capsys, "mobilenet_v2_050_160", "--overwrite")
        assert sorted(os.listdir(to)) == before
        assert export(data["other"], "--format", fmt, "--to", to, "--overwrite") == 0
    import lancedb
    table = lancedb.connect(str(tmp_path / "l")).open_table("images")
    assert json.loads(table.schema.metadata[b"mobilenet_embed.identity"])["model"] == \
        "mobilenet_v2_050_160"
    _, rows = vertex_rows(tmp_path / "v")
    assert len(rows) == len(PHOTOS) + len(MORE)


def test_a_second_export_to_a_locked_target_is_refused(data, tmp_path, capsys):
    to = tmp_path / "vertex"
    to.mkdir()
    lock = FolderLock(str(to / "_export.lock"), str(to))
    lock.acquire("running-export")  # held by this live process
    capsys.readouterr()
    assert export(data["out"], "--format", "vertex", "--to", to) == 2
    one_line_error(capsys, "being written by another run", "running-export")
    assert os.listdir(to) == ["_export.lock"]
    lock.release("running-export")
    assert export(data["out"], "--format", "vertex", "--to", to) == 0
    assert "_export.lock" not in os.listdir(to)


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_a_bad_target_is_one_line_exit_2_and_nothing_made(data, tmp_path, capsys, case):
    note = tmp_path / "note.txt"
    note.write_text("mine")
    locked = tmp_path / "locked"
    locked.mkdir()
    to = {"file": note, "under_a_file": note / "vertex",
          "read_only": locked / "vertex"}[case]
    capsys.readouterr()
    if case == "read_only":
        locked.chmod(0o500)
        with file_permissions_enforced() as enforced:
            if not enforced:
                pytest.skip("cannot drop root's permission override here")
            code = export(data["out"], "--format", "vertex", "--to", to)
        locked.chmod(0o700)
    else:
        code = export(data["out"], "--format", "vertex", "--to", to)
    assert code == 2
    one_line_error(capsys, str(to))
    assert note.read_text() == "mine" and os.listdir(locked) == []


# --- LanceDB, Qdrant, Milvus: the real clients ------------------------------------

def test_lancedb_table_opens_and_finds_each_rows_own_vector(data, tmp_path):
    import lancedb
    to = tmp_path / "lance"
    assert export(data["out"], "--format", "lancedb", "--to", to) == 0
    table = lancedb.connect(str(to)).open_table("images")
    assert table.count_rows() == len(PHOTOS)
    schema = table.schema
    assert str(schema.field("vector").type) == "fixed_size_list<item: float>[1280]"
    assert schema.metadata[b"dims"] == b"1280" and schema.metadata[b"model"] == \
        b"mobilenet_v2_100_224"
    for i, image_id in enumerate(data["ids"]):
        hit = table.search(data["vectors"][i].astype(np.float32)).metric("cosine") \
            .limit(1).to_list()[0]
        assert hit["id"] == image_id and hit["label"] == data["top1"][i]
    # idempotent; a grown dataset adds only its new rows
    assert export(data["out"], "--format", "lancedb", "--to", to) == 0
    assert table.count_rows() == len(PHOTOS)
    assert export(data["grown"], "--format", "lancedb", "--to", to) == 0
    assert lancedb.connect(str(to)).open_table("images").count_rows() == len(PHOTOS) + len(MORE)


def test_qdrant_local_collection_counts_and_finds_each_rows_own_vector(data, tmp_path):
    from qdrant_client import QdrantClient
    to = tmp_path / "qdrant"
    for dataset, expected in ((data["out"], 5), (data["out"], 5), (data["grown"], 7)):
        assert export(dataset, "--format", "qdrant", "--to", to, "--restrict",
                      "content_sha256") == 0
        client = QdrantClient(path=str(to))
        try:
            assert client.count("images", exact=True).count == expected
        finally:
            client.close()
    client = QdrantClient(path=str(to))
    try:
        info = client.get_collection("images")
        assert info.config.metadata["model"] == "mobilenet_v2_100_224"
        for i, image_id in enumerate(data["ids"]):
            hit = client.query_points("images", query=data["vectors"][i].tolist(),
                                      using="dense", limit=1).points[0]
            assert hit.payload["image_id"] == image_id
            assert hit.payload["label"] == data["top1"][i]
            assert hit.payload["content_sha256"] == [data["sha"][i]]
            assert hit.score == pytest.approx(1.0, abs=1e-5)
    finally:
        client.close()


def test_milvus_lite_collection_counts_and_finds_each_rows_own_vector(data, tmp_path):
    from pymilvus import MilvusClient
    to = tmp_path / "milvus.db"
    for dataset, expected in ((data["out"], 5), (data["out"], 5), (data["grown"], 7)):
        assert export(dataset, "--format", "milvus", "--to", to) == 0
        client = MilvusClient(str(to))
        try:
            count = client.query("images", filter="", output_fields=["count(*)"])
            assert count[0]["count(*)"] == expected
        finally:
            client.close()
    client = MilvusClient(str(to))
    try:
        hits = client.search("images", data=[v.tolist() for v in data["vectors"]], limit=1,
                             output_fields=["label", "uri"])
        for i, image_id in enumerate(data["ids"]):
            assert hits[i][0]["id"] == image_id
            assert hits[i][0]["entity"]["label"] == data["top1"][i]
    finally:
        client.close()


# --- BigQuery ------------------------------------------------------------------

def test_bigquery_files_schema_sql_and_the_vector_writers_rows(data, tmp_path):
    from transforms.sinks import VectorRecord
    from transforms.sinks.bigquery import WriteToBigQueryVectors
    to = tmp_path / "bq"
    assert export(data["out"], "--format", "bigquery", "--to", to,
                  "--restrict", "content_sha256") == 0
    fields = json.loads((to / "schema.json").read_text())
    assert {f["name"]: (f["type"], f["mode"]) for f in fields}["embedding"] == \
        ("FLOAT64", "REPEATED")
    rows = [json.loads(line) for f in sorted(to.glob("rows-*.json"))
            for line in f.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(data["ids"])
    required = [f["name"] for f in fields if f["mode"] == "REQUIRED"]
    for row in rows:
        assert set(row) <= {f["name"] for f in fields}
        assert all(row[name] is not None for name in required)
        assert len(row["embedding"]) == 1280 and None not in row["embedding"]
    sql = (to / "vector_search.sql").read_text()
    assert "CREATE VECTOR INDEX" in sql and "VECTOR_SEARCH(" in sql
    # The Dataflow path: Beam's BigQueryVectorWriterConfig with this schema.
    sink = WriteToBigQueryVectors("project.dataset.images", restricts=["content_sha256"])
    assert sink.config().schema_config.schema == {"fields": fields}
    records = [VectorRecord(r["id"], r["uri"], np.array(r["embedding"], np.float32),
                            r["label"], tuple(r["top5_labels"]), r["model"],
                            (("content_sha256", (r["content_sha256"],)),)) for r in rows]
    beam_rows = sink.rows(records)
    assert [b.id for b in beam_rows] == [r["id"] for r in rows]
    assert beam_rows[0].embedding == pytest.approx(rows[0]["embedding"])
    assert beam_rows[0].content_sha256 == rows[0]["content_sha256"]


# --- Dataflow ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt, to, stage", [
    ("vertex", "gs://bucket/vertex", "Write/WriteShards"),
    ("bigquery", "gs://bucket/bq", "Write/WriteShards"),
    ("lancedb", "gs://bucket/lance", "Write/MergeInsert"),
    ("qdrant", "https://qdrant.example.com:6333", "Write/WriteToQdrant"),
    ("milvus", "https://milvus.example.com:19530", "Write/WriteToMilvus"),
])
def test_dataflow_dry_run_builds_the_export_graph(data, monkeypatch, capsys, fmt, to, stage):
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
    captured = {}
    real = DataflowRunner.run_pipeline

    def spy(self, pipeline, options, pipeline_proto=None):
        captured["runner"] = self
        return real(self, pipeline, options, pipeline_proto)
    monkeypatch.setattr(DataflowRunner, "run_pipeline", spy)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    code = export_main([str(data["out"]), "--format", fmt, "--to", to,
                        "--runner", "DataflowRunner", "--dry_run", "--no_auth",
                        "--project", "my-project", "--region", "us-central1",
                        "--temp_location", "gs://bucket/tmp"])
    assert code == 0, capsys.readouterr().err
    names = {t.unique_name for t in
             captured["runner"].proto_pipeline.components.transforms.values()}
    for name in ("RowGroups", "Spread", "ReadRecords", stage):
        assert name in names, sorted(names)
    assert "dry run" in capsys.readouterr().out


# --- the sinks in a Beam user's own pipeline ------------------------------------

def test_a_beam_user_writes_embed_images_output_into_stores(tmp_path):
    import apache_beam as beam
    import lancedb

    from transforms import EmbedImages, ModelSpec
    from transforms.composite import dataset_metadata
    from transforms.sinks import (ToVectorRecords, WriteToLanceDB, WriteVertexFiles,
                                  store_identity)
    spec = ModelSpec("mobilenet_v2_035_96", source="random")
    metadata = dataset_metadata(spec)
    uris = [str(sample_photos() / name) for name in PHOTOS[:3]]
    with beam.Pipeline(runner="FnApiRunner") as p:
        out = p | beam.Create(uris) | EmbedImages(spec)
        records = out[EmbedImages.EMBEDDED] | ToVectorRecords(metadata, crowding="folder")
        records | WriteToLanceDB(str(tmp_path / "lance"), store_identity(metadata))
        records | WriteVertexFiles(str(tmp_path / "vertex" / "embeddings"), num_shards=1)
    table = lancedb.connect(str(tmp_path / "lance")).open_table("images")
    assert sorted(table.to_arrow().column("id").to_pylist()) == sorted(uris)
    _, rows = vertex_rows(tmp_path / "vertex")
    assert sorted(r["id"] for r in rows) == sorted(uris)
    assert {r["crowding_tag"] for r in rows} == {str(sample_photos())}
    vectors = np.array([r["embedding"] for r in rows])
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


def test_lancedb_ivf_pq_index_is_built_and_searched(tmp_path):
    import apache_beam as beam
    import lancedb

    from transforms.sinks import VectorRecord, WriteToLanceDB
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, 64))
    x = unit(centers[rng.integers(0, 20, 600)] + 0.3 * rng.normal(size=(600, 64)))
    records = [VectorRecord(f"img{i}", f"/a/{i}.jpg", x[i].astype(np.float32), "cat",
                            ("cat",) * 5, "m") for i in range(len(x))]
    identity = {"model": "m", "weights_sha256": "0" * 64, "feature_dim": "64",
                "model_handle": "random", "dataset": "synthetic"}
    with beam.Pipeline(runner="FnApiRunner") as p:
        p | beam.Create(records) | WriteToLanceDB(str(tmp_path), identity, index=True)
    table = lancedb.connect(str(tmp_path)).open_table("images")
    (index,) = table.list_indices()
    assert index.index_type == "IvfPq" and table.count_rows() == 600
    found = [table.search(x[i].astype(np.float32)).metric("cosine").nprobes(8)
             .refine_factor(20).limit(1).to_list()[0]["id"] for i in range(0, 600, 30)]
    assert found == [f"img{i}" for i in range(0, 600, 30)]


@pytest.mark.parametrize("args, words", [
    (["--format", "qdrant", "--to", "http://127.0.0.1:9"], ["cannot open qdrant"]),
    (["--format", "vertex", "--to", "{tmp}/v", "--restrict", "no_such_column"],
     ["no column no_such_column"]),
    (["--format", "milvus", "--to", "{tmp}/m.txt"], ["Milvus Lite file"]),
    (["--format", "vertex", "--to", "{tmp}/v", "--shards", "0"], ["--shards"]),
])
def test_bad_store_options_are_one_line_exit_2(data, tmp_path, capsys, args, words):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    capsys.readouterr()
    assert export(data["out"], *args) == 2
    one_line_error(capsys, *words)
    assert not (tmp_path / "v").exists()


def test_vertex_export_from_and_to_a_bucket_replaces_the_set(data, gcs_emulator):
    bucket = "export-test"
    gcs_emulator.create_bucket(bucket)
    gcs_emulator.upload_tree(data["out"], f"gs://{bucket}/out")
    to = f"gs://{bucket}/vertex"
    assert export(f"gs://{bucket}/out", "--format", "vertex", "--to", to, "--shards", "2") == 0
    first = sorted(gcs_emulator.list(f"{to}/"))
    assert export(f"gs://{bucket}/out", "--format", "vertex", "--to", to) == 0
    second = sorted(gcs_emulator.list(f"{to}/"))
    names = [u.rsplit("/", 1)[-1] for u in second]
    assert "_export.manifest" in names and "_export.lock" not in names
    assert not any("_staging" in u for u in second) and not set(first) & set(
        u for u in second if u.endswith(".json"))
    rows = [json.loads(line) for u in second if u.endswith(".json")
            for line in gcs_emulator.read(u).decode().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(data["ids"])


@pytest.mark.parametrize("fmt, module", [("lancedb", "lancedb"), ("qdrant", "qdrant_client")])
def test_a_missing_client_library_names_the_extra(data, tmp_path, capsys, monkeypatch,
                                                   fmt, module):
    monkeypatch.setitem(sys.modules, module, None)  # as in the lean install
    capsys.readouterr()
    assert export(data["out"], "--format", fmt, "--to", tmp_path / fmt) == 2
    one_line_error(capsys, f"mobilenet-embed[{fmt}]")
    assert not (tmp_path / fmt).exists()


def test_a_local_dry_run_builds_the_graph_and_writes_nothing(data, tmp_path, capsys):
    for fmt in ("vertex", "lancedb", "qdrant"):
        assert export(data["out"], "--format", fmt, "--to", tmp_path / fmt, "--dry_run") == 0
        assert "dry run" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []


# --- A store equals the dataset ---------------------------------------------------

def _synthetic(root, n, seed=0):
    from synthetic_dataset import write_dataset
    rng = np.random.default_rng(seed)
    vectors = np.maximum(rng.normal(size=(n, 32)), 0).astype(np.float32) + 0.01
    return write_dataset(root, vectors, [f"img{seed}-{i:04d}" for i in range(n)],
                         rows_per_part=40, row_group=16)


def _store_rows(fmt, to):
    from transforms.sinks.lancedb_sink import LanceDBConfig
    from transforms.sinks.milvus_sink import MilvusConfig
    from transforms.sinks.qdrant_sink import QdrantConfig, QdrantTarget
    config = {"lancedb": lambda: LanceDBConfig(str(to), {}),
              "qdrant": lambda: QdrantConfig(QdrantTarget(path=str(to)), {}),
              "milvus": lambda: MilvusConfig(str(to), {})}[fmt]()
    return config.count(), sorted(config.stored_ids())


@pytest.mark.parametrize("fmt, name", [("lancedb", "l"), ("qdrant", "q"), ("milvus", "m.db")])
def test_reexport_after_the_dataset_shrinks_deletes_the_stale_rows(tmp_path, fmt, name):
    ds = _synthetic(tmp_path / "ds", 120)
    to = tmp_path / name
    assert export(ds, "--format", fmt, "--to", to) == 0
    assert _store_rows(fmt, to)[0] == 120
    parts = sorted((ds / "embeddings").iterdir())
    parts[1].unlink()  # 40 rows gone
    left = sorted(i for p in parts if p.exists()
                  for i in pq.read_table(p, columns=["image_id"]).column("image_id").to_pylist())
    assert export(ds, "--format", fmt, "--to", to) == 0
    assert _store_rows(fmt, to) == (80, left)


@pytest.mark.parametrize("fmt, name", [("lancedb", "l"), ("qdrant", "q"), ("milvus", "m.db")])
def test_another_dataset_into_the_same_store_is_refused_unless_overwrite(tmp_path, capsys,
                                                                         fmt, name):
    first, second = _synthetic(tmp_path / "a", 50), _synthetic(tmp_path / "b", 30, seed=1)
    to = tmp_path / name
    assert export(first, "--format", fmt, "--to", to) == 0
    capsys.readouterr()
    assert export(second, "--format", fmt, "--to", to) == 2
    one_line_error(capsys, "dataset", str(tmp_path / "a"), "--overwrite")
    assert _store_rows(fmt, to)[0] == 50
    assert export(second, "--format", fmt, "--to", to, "--overwrite") == 0
    assert _store_rows(fmt, to)[0] == 30


def test_qdrant_export_prints_no_beam_type_hint_warnings(tmp_path, caplog):
    import logging
    ds = _synthetic(tmp_path / "ds", 20)
    with caplog.at_level(logging.WARNING):
        assert export(ds, "--format", "qdrant", "--to", tmp_path / "q") == 0
    assert not [r for r in caplog.records if "type hint" in r.getMessage()]


def test_a_part_without_feature_vectors_is_one_line_naming_it(data, tmp_path, capsys):
    # issue 25: a part with the dataset's metadata but no feature_vector
    # column ended `export` in a KeyError traceback.
    copy = tmp_path / "out"
    shutil.copytree(data["out"], copy)
    part = sorted((copy / "embeddings").glob("*.parquet"))[0]
    bad = copy / "embeddings" / "part-zz-foreign.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["feature_vector"]), bad)
    capsys.readouterr()
    assert export(copy, "--format", "vertex", "--to", tmp_path / "vx") == 2
    line = one_line_error(capsys, bad.name, "feature_vector")
    assert "Traceback" not in line
    assert not (tmp_path / "vx").exists() or not os.listdir(tmp_path / "vx")
