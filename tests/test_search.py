"""Similarity search: the index library on vectors in memory (exact search
against NumPy, recall measured and tuned, re-ranking, incremental adds,
atomic commits, auto's choice), dedup against brute force, and the commands
on a real job's output, including every bad input's one-line exit 2."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.search import (ArrayVectors, SearchError, SearchIndex, build_index,
                             choose_index, parse_size)
from pipeline.search.dedup import clusters, find_duplicates, near_pairs
from pipeline.search.dedup_beam import read_table
from pipeline.search.index import GIB, INDEX_INFOS
from pipeline.commands.export import export_main
from pipeline.commands.search import dedup_main, index_main, query_main
from jobs import matrix, read_embeddings, run_job, sample_photos


def clustered(n: int, d: int = 64, centers: int = 50, spread: float = 0.6,
              seed: int = 0) -> np.ndarray:
    """Non-negative clustered vectors, like ReLU features."""
    rng = np.random.default_rng(seed)
    c = np.maximum(rng.normal(size=(centers, d)), 0)
    x = c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))
    return np.maximum(x, 0).astype(np.float32)


def unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def quiet(_message: str) -> None:
    pass


# --- the library on vectors in memory -------------------------------------------

def test_exact_search_equals_numpy_brute_force(tmp_path):
    x = clustered(800, d=48, seed=1)
    infos = build_index(ArrayVectors(x), str(tmp_path), progress=quiet)
    assert infos["index_key"] == "Flat"
    assert infos["recall_at_1"] == 1.0 and infos["recall_at_10"] == 1.0
    index = SearchIndex.open(str(tmp_path))
    queries = clustered(25, d=48, seed=2)
    scores, rows = index.search_rows(queries, 10)
    expected = unit(queries) @ unit(x).T
    order = np.argsort(-expected, axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, 1), atol=1e-5)
    first = index.search(queries[:1], 3)[0]
    assert [n.image_id for n in first] == [str(r) for r in order[0, :3]]


def test_recall_is_measured_against_exact_search_and_tuned(tmp_path):
    x = clustered(6000, d=32, centers=40, spread=1.0, seed=3)
    infos = build_index(ArrayVectors(x), str(tmp_path), index_key="IVF64,Flat",
                        target_recall=0.95, recall_queries=300, progress=quiet)
    assert infos["target_met"] and infos["recall_at_10"] >= 0.95
    tried = [t["nprobe"] for t in infos["tuning"]]
    assert tried == sorted(tried) and tried[-1] == infos["search_parameters"]["nprobe"]
    # The recorded recall agrees with one computed here from scratch.
    index = SearchIndex.open(str(tmp_path))
    rng = np.random.default_rng(7)
    qi = rng.choice(len(x), 200, replace=False)
    exact = unit(x[qi]) @ unit(x).T
    exact[np.arange(len(qi)), qi] = -np.inf  # each query without itself
    kth = np.sort(exact, axis=1)[:, -10]
    scores, rows = index.search_rows(x[qi], 11)
    hits = []
    for i in range(len(qi)):
        found = [s for s, r in zip(scores[i], rows[i]) if r != qi[i]][:10]
        hits.append(np.mean(np.array(found) >= kth[i] - 1e-4))
    assert abs(np.mean(hits) - infos["recall_at_10"]) < 0.05
    assert infos["latency_ms"]["p50"] > 0 and infos["latency_ms"]["p95"] >= infos["latency_ms"]["p50"]


def test_compressed_codes_are_reranked_on_exact_vectors(tmp_path):
    x = clustered(3000, d=32, seed=4)
    infos = build_index(ArrayVectors(x), str(tmp_path), index_key="IVF16,SQ8",
                        recall_queries=100, progress=quiet)
    assert infos["rerank"] == {"exact": True, "candidates_per_k": 2}
    index = SearchIndex.open(str(tmp_path))
    scores, rows = index.search_rows(x[:20], 5)
    np.testing.assert_allclose(
        scores, np.einsum("nd,nkd->nk", unit(x[:20]), unit(x)[rows]), atol=1e-5)


def test_a_grown_dataset_is_added_to_and_commits_replace_atomically(tmp_path):
    x = clustered(1500, d=32, seed=5)
    first = build_index(ArrayVectors(x[:1000], image_ids=[f"img{i}" for i in range(1000)]),
                        str(tmp_path), progress=quiet)
    grown = ArrayVectors(x, image_ids=[f"img{i}" for i in range(1500)])
    second = build_index(grown, str(tmp_path), progress=quiet)
    assert (first["incremental"], second["incremental"]) == (False, True)
    assert (second["rows"], second["rows_added"]) == (1500, 500)
    # One build folder left, the one index_infos.json names.
    builds = [p for p in os.listdir(tmp_path) if p.startswith("build-")]
    assert builds == [second["files"]]
    added = SearchIndex.open(str(tmp_path))
    fresh_dir = tmp_path / "fresh"
    build_index(grown, str(fresh_dir), progress=quiet)
    fresh = SearchIndex.open(str(fresh_dir))
    q = clustered(10, d=32, seed=6)
    assert [[n.image_id for n in r] for r in added.search(q, 5)] == \
        [[n.image_id for n in r] for r in fresh.search(q, 5)]


def test_an_index_of_other_vectors_is_refused_unless_rebuilt(tmp_path):
    x = clustered(300, d=16, seed=8)
    build_index(ArrayVectors(x, made_by={"model": "a", "weights_sha256": "1"}),
                str(tmp_path), progress=quiet)
    other = ArrayVectors(x, made_by={"model": "b", "weights_sha256": "2"})
    with pytest.raises(SearchError, match="built from other vectors.*--rebuild"):
        build_index(other, str(tmp_path), progress=quiet)
    assert build_index(other, str(tmp_path), rebuild=True, progress=quiet)["model"] == "b"


@pytest.mark.parametrize("rows,memory,key,rerank", [
    (5_000, 8 * GIB, "Flat", False),
    (100_000, 8 * GIB, "HNSW32,Flat", False),
    # A graph of 100k x 1280 floats (0.5 GiB) does not fit 70% of 512 MiB.
    (100_000, GIB // 2, "IVF512,SQ8", True),
    (1_000_000, 8 * GIB, "IVF2048,SQ8", True),
    # 10M 8-bit codes are 11.9 GiB, over 70% of 8 GiB: 160-byte PQ codes.
    (10_000_000, 8 * GIB, "IVF8192,PQ160", True),
    (10_000_000, 32 * GIB, "IVF8192,SQ8", True),
])
def test_auto_choice_follows_size_and_memory(rows, memory, key, rerank):
    choice = choose_index(rows, 1280, memory)
    assert (choice.key, choice.rerank) == (key, rerank)
    assert choice.estimated_bytes <= 0.7 * memory


def test_auto_refuses_what_cannot_fit():
    with pytest.raises(SearchError, match="do not fit --max_memory"):
        choose_index(100_000_000, 1280, GIB)


@pytest.mark.parametrize("text,value", [("8G", 8 * GIB), ("8GiB", 8 * GIB),
                                        ("512m", 512 << 20), ("1.5g", int(1.5 * GIB)),
                                        ("1000", 1000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["lots", "-1G", "0"])
def test_parse_size_refuses(text):
    with pytest.raises(SearchError, match="--max_memory"):
        parse_size(text)


def test_a_bad_factory_string_is_one_line(tmp_path):
    with pytest.raises(SearchError, match="not a faiss index factory string"):
        build_index(ArrayVectors(clustered(100, d=16)), str(tmp_path),
                    index_key="IVFbogus", progress=quiet)


def test_near_pairs_equal_brute_force_and_clusters_pick_the_largest(tmp_path):
    rng = np.random.default_rng(9)
    base = clustered(300, d=32, centers=300, spread=0.2, seed=9)
    copies = base[:40] + 0.05 * rng.random((40, 32)).astype(np.float32)
    x = np.concatenate([base, copies])
    ids = [f"b{i:03d}" for i in range(300)] + [f"c{i:03d}" for i in range(40)]
    source = ArrayVectors(x, image_ids=ids)
    build_index(source, str(tmp_path), progress=quiet)
    index = SearchIndex.open(str(tmp_path))
    threshold = 0.95
    found = {(a, b) for a, b, _ in near_pairs(index, source, threshold, start_k=2)}
    sims = unit(x) @ unit(x).T
    expected = {(ids[i], ids[j]) if ids[i] < ids[j] else (ids[j], ids[i])
                for i in range(len(x)) for j in range(i + 1, len(x)) if sims[i, j] >= threshold}
    assert found == expected and len(expected) >= 40
    assert clusters([("a", "b"), ("b", "c"), ("x", "y")], {"c": 100, "a": 10}) == \
        [["c", "a", "b"], ["x", "y"]]


def test_exact_copies_come_first_and_are_not_repeated_as_near(tmp_path):
    x = clustered(50, d=16, centers=50, spread=0.1, seed=10)
    x[1] = x[0]  # the same bytes embed to the same vector
    ids = [f"i{i:02d}" for i in range(50)]
    source = ArrayVectors(x, image_ids=ids)
    build_index(source, str(tmp_path), progress=quiet)
    digests = [(i, "same" if i in ("i00", "i01") else i, 100 if i == "i01" else 10)
               for i in ids]
    result = find_duplicates(SearchIndex.open(str(tmp_path)), source, digests, 0.999)
    pairs = result.pairs.to_pylist()
    assert {"image_id_a": "i01", "image_id_b": "i00", "similarity": 1.0,
            "kind": "exact"} in pairs
    assert not [p for p in pairs if p["kind"] == "near"
                and {p["image_id_a"], p["image_id_b"]} == {"i00", "i01"}]
    rep = [r for r in result.clusters.to_pylist() if r["is_representative"]]
    assert rep[0]["image_id"] == "i01"  # more pixels
    assert result.counts["exact_pairs"] == 1


# --- the commands on a real job's output -----------------------------------------

PHOTOS = ["astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png",
          "camera.png", "coins.png", "horse.png"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    photos, out = root / "photos", root / "out"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(sample_photos() / name, photos / name)
    shutil.copy(sample_photos() / "astronaut.png", photos / "astronaut_copy.png")
    assert run_job("--input", str(photos), "--output", str(out), "--model_source", "random") == 0
    assert index_main([str(out)]) == 0
    return root, out


def test_index_infos_records_what_was_built_and_measured(dataset):
    _, out = dataset
    infos = json.loads((out / "index" / INDEX_INFOS).read_text())
    table = read_embeddings(out)
    assert infos["rows"] == table.num_rows == len(PHOTOS) + 1
    assert infos["dimension"] == 1280 and infos["index_key"] == "Flat"
    meta = json.loads((out / "_dataset.json").read_text())
    assert infos["weights_sha256"] == meta["weights_sha256"]
    for key in ("recall_at_1", "recall_at_10", "latency_ms", "build_seconds",
                "size_on_disk_bytes", "peak_memory_bytes", "metric", "model"):
        assert key in infos
    assert (out / "index" / infos["files"] / "index.faiss").exists()


def test_query_by_id_prints_json_neighbours_equal_to_numpy(dataset, capsys):
    _, out = dataset
    table = read_embeddings(out)
    ids = table.column("image_id").to_pylist()
    vectors = unit(matrix(table, "feature_vector"))
    target = [i for i in ids if i.endswith("coffee.png")][0]
    capsys.readouterr()
    assert query_main([str(out), "--id", target, "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip())
    sims = dict(zip(ids, vectors @ vectors[ids.index(target)]))
    del sims[target]
    expected = sorted(sims.values(), reverse=True)[:3]
    assert answer["query"] == target
    # Best first, each score the NumPy cosine of that row (the astronaut and
    # its byte copy tie, so ids are compared through their scores).
    got = answer["neighbors"]
    assert [n["score"] for n in got] == pytest.approx(expected, abs=1e-4)
    assert [n["score"] for n in got] == pytest.approx(
        [float(sims[n["image_id"]]) for n in got], abs=1e-4)
    assert set(answer["neighbors"][0]) == {"image_id", "uri", "score"}


def test_query_with_k_above_the_rows_says_why_fewer(dataset, capsys):
    # issue 25 (4): fewer than k neighbours never pass without a word.
    _, out = dataset
    ids = read_embeddings(out).column("image_id").to_pylist()
    capsys.readouterr()
    assert query_main([str(out), "--id", ids[0], "--k", "500", "--json"]) == 0
    captured = capsys.readouterr()
    answer = json.loads(captured.out.strip())
    assert len(answer["neighbors"]) == len(ids) - 1
    assert "note" in answer and str(len(ids) - 1) in answer["note"]
    (warning,) = captured.err.strip().splitlines()
    assert warning.startswith("warning: ") and answer["note"] in warning


def test_query_by_image_embeds_like_the_dataset(dataset, capsys):
    root, out = dataset
    capsys.readouterr()
    assert query_main([str(out), "--image", str(root / "photos" / "chelsea.png"),
                       "--k", "1", "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["neighbors"][0]
    assert best["image_id"].endswith("chelsea.png")
    assert best["score"] == pytest.approx(1.0, abs=1e-4)


def test_a_query_image_that_does_not_decode_is_its_own_error_line(dataset, capsys):
    root, out = dataset
    broken = root / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    capsys.readouterr()
    code = query_main([str(out), "--image", str(broken), str(root / "photos" / "coins.png"),
                       "--k", "2", "--json"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.strip().splitlines()]
    assert code == 2
    assert lines[0]["query"] == str(broken) and "error" in lines[0]
    assert lines[1]["neighbors"][0]["image_id"].endswith("coins.png")
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "broken.jpg" in errors[0]


def test_manifest_queries_write_parquet(dataset, tmp_path):
    root, out = dataset
    manifest = tmp_path / "queries.txt"
    manifest.write_text(f"{root / 'photos' / 'horse.png'}\n{root / 'photos' / 'camera.png'}\n")
    assert query_main([str(out), "--manifest", str(manifest), "--k", "4",
                       "--output", str(tmp_path / "res")]) == 0
    table = pq.read_table(tmp_path / "res" / "results.parquet")
    assert table.num_rows == 8
    assert table.column("rank").to_pylist() == [1, 2, 3, 4] * 2
    assert set(table.column_names) >= {"query", "rank", "image_id", "score"}


def test_dedup_finds_the_exact_copy_and_writes_pairs_and_clusters(dataset, tmp_path):
    _, out = dataset
    assert dedup_main([str(out), "--threshold", "0.9999", "--to", str(tmp_path / "d")]) == 0
    pairs = read_table(str(tmp_path / "d"), "pairs").to_pylist()
    exact = [p for p in pairs if p["kind"] == "exact"]
    assert len(exact) == 1
    assert {os.path.basename(exact[0]["image_id_a"]),
            os.path.basename(exact[0]["image_id_b"])} == {"astronaut.png", "astronaut_copy.png"}
    clusters_table = read_table(str(tmp_path / "d"), "clusters")
    assert clusters_table.column_names == ["cluster_id", "image_id", "is_representative"]
    counts = json.loads((tmp_path / "d" / "dedup_summary.json").read_text())
    assert counts["exact_pairs"] == 1 and counts["images"] == len(PHOTOS) + 1


def test_export_vertex_writes_unit_vectors_as_jsonl(dataset, tmp_path):
    _, out = dataset
    assert export_main([str(out), "--format", "vertex", "--to", str(tmp_path / "v")]) == 0
    lines = [json.loads(line) for f in sorted((tmp_path / "v").glob("*.json"))
             for line in f.read_text().splitlines()]
    assert len(lines) == len(PHOTOS) + 1
    assert set(lines[0]) == {"id", "embedding", "restricts"}
    assert np.linalg.norm(lines[0]["embedding"]) == pytest.approx(1.0, abs=1e-5)


# --- bad input: one line, exit 2 ---------------------------------------------------

def expect_error(capsys, code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    for word in words:
        assert word in err[0], err[0]
    return err[0]


def test_bad_input_is_one_line_and_exit_2(dataset, tmp_path, capsys):
    root, out = dataset
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(capsys, index_main([str(empty)]), str(empty))
    # A dataset whose run embedded nothing: its record, no embeddings.
    shutil.copy(out / "_dataset.json", empty / "_dataset.json")
    expect_error(capsys, index_main([str(empty)]), str(empty), "embeddings")
    expect_error(capsys, index_main([str(tmp_path / "absent")]), "does not exist")
    expect_error(capsys, query_main([str(out), "--id", "x", "--k", "0"]), "--k")
    expect_error(capsys, dedup_main([str(out), "--threshold", "1.5"]), "--threshold", "[-1, 1]")
    expect_error(capsys, dedup_main([str(out), "--threshold", "-1.01"]), "--threshold")
    expect_error(capsys, query_main([str(out), "--id", "x", "--index", str(tmp_path / "none")]),
                 "no index")
    expect_error(capsys, query_main([str(out), "--image", str(root / "nothing.png")]),
                 "nothing.png")
    expect_error(capsys, index_main([str(out), "--max_memory", "lots"]), "--max_memory")


def test_mixed_models_and_foreign_indexes_are_refused(dataset, tmp_path, capsys):
    root, out = dataset
    other = tmp_path / "other"
    assert run_job("--input", str(root / "photos"), "--output", str(other),
                   "--model_source", "random", "--model", "mobilenet_v2_050_96") == 0
    # An index of this dataset, asked to serve the other one.
    capsys.readouterr()
    expect_error(capsys, query_main([str(other), "--id", "x", "--index", str(out / "index")]),
                 "index was built from other vectors")
    expect_error(capsys, index_main([str(other), "--to", str(out / "index")]),
                 "built from other vectors", "--rebuild")
    # A part of another model copied into the dataset.
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    part = sorted((other / "embeddings").iterdir())[0]
    shutil.copy(part, mixed / "embeddings" / ("part-zz-" + part.name[5:]))
    expect_error(capsys, index_main([str(mixed)]), "mixes models")


def test_the_duckdb_recipe_in_the_docs_agrees_with_query(dataset, capsys):
    """The README's DuckDB recipe, run as written, ranks like `query --id`."""
    duckdb = pytest.importorskip("duckdb")
    _, out = dataset
    ids = read_embeddings(out).column("image_id").to_pylist()
    target = [i for i in ids if i.endswith("horse.png")][0]
    sql = f"""
        WITH e AS (SELECT image_id, feature_vector::FLOAT[1280] AS v
                   FROM read_parquet('{out}/embeddings/*.parquet'))
        SELECT e.image_id, array_cosine_similarity(e.v, q.v) AS score
        FROM e, (SELECT v FROM e WHERE image_id = '{target}') AS q
        WHERE e.image_id <> '{target}'
        ORDER BY score DESC LIMIT 5"""
    rows = duckdb.sql(sql).fetchall()
    capsys.readouterr()
    assert query_main([str(out), "--id", target, "--k", "5", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["neighbors"]
    assert [s for _, s in rows] == pytest.approx([n["score"] for n in ours], abs=1e-4)


def test_a_grown_compressed_index_keeps_its_vectors_file_in_step(tmp_path):
    """Adding to an index with re-ranking appends to the exact vectors too:
    every row, old or new, finds itself first with its exact score."""
    x = clustered(2000, d=32, centers=200, spread=0.3, seed=11)
    ids = [f"img{i}" for i in range(2000)]
    build_index(ArrayVectors(x[:1200], image_ids=ids[:1200]), str(tmp_path),
                index_key="IVF16,SQ8", recall_queries=100, progress=quiet)
    grown = build_index(ArrayVectors(x, image_ids=ids), str(tmp_path),
                        index_key="IVF16,SQ8", recall_queries=100, progress=quiet)
    assert grown["incremental"] and grown["rows_added"] == 800
    index = SearchIndex.open(str(tmp_path))
    probe = np.array([0, 1199, 1200, 1999])
    found = index.search(x[probe], 1)
    assert [f[0].image_id for f in found] == [ids[i] for i in probe]
    assert [f[0].score for f in found] == pytest.approx([1.0] * 4, abs=1e-5)


def test_query_preprocessing_is_rebuilt_from_the_record():
    """Queries are preprocessed as the dataset was, whichever JPEG decoder it
    used; library versions alone never block them; a real difference does."""
    from pipeline.search import SearchError
    from pipeline.search.source import preprocess_settings
    from transforms.decode import PreprocessSettings
    for settings in (PreprocessSettings(224, 224),
                     PreprocessSettings(160, 160, jpeg_decoder="pillow"),
                     PreprocessSettings(96, 96, resize_mode="center_crop",
                                        crop_fraction=0.8)):
        record = settings.to_metadata()
        record.update(pillow="0.0", library_versions={"libheif": "0.0"})
        assert preprocess_settings(record) == settings
    record = PreprocessSettings(224, 224).to_metadata()
    record["formats"] = ["JPEG"]  # made by a version that decoded otherwise
    with pytest.raises(SearchError, match="formats"):
        preprocess_settings(record)


def test_query_images_are_embedded_a_batch_at_a_time_in_order(dataset, capsys, monkeypatch):
    # Batches of 2 over 5 queries with broken images in two different batches:
    # every good image still finds itself, every broken one is its own error.
    import pipeline.search.source as source
    monkeypatch.setattr(source, "QUERY_BATCH", 2)
    root, out = dataset
    broken = root / "broken2.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    photos = [root / "photos" / name for name in ("chelsea.png", "coins.png", "horse.png")]
    queries = [photos[0], broken, photos[1], broken, photos[2]]
    capsys.readouterr()
    code = query_main([str(out), "--image", *map(str, queries), "--k", "1", "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert code == 2 and len(lines) == 5
    for query, line in zip(queries, lines):
        if query == broken:
            assert "error" in line
        else:
            assert line["neighbors"][0]["image_id"].endswith(query.name)
            assert line["neighbors"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_dedup_searches_harder_than_the_tuned_queries(tmp_path):
    # A pair the index misses is a duplicate left in: dedup multiplies the
    # tuned nprobe / efSearch (nprobe never past the number of lists).
    from pipeline.search.dedup_beam import SEARCH_EFFORT
    data = unit(clustered(3000, d=32))
    for key, name in (("IVF16,Flat", "nprobe"), ("HNSW16,Flat", "efSearch")):
        to = str(tmp_path / name)
        build_index(ArrayVectors(data), to, index_key=key, progress=quiet)
        index = SearchIndex.open(to)
        tuned = int(index.params[name])
        params = index.search_harder(SEARCH_EFFORT)
        expected = tuned * SEARCH_EFFORT
        if name == "nprobe":
            expected = min(16, expected)
        assert params[name] == expected and SEARCH_EFFORT > 1
        import faiss
        if name == "nprobe":
            assert faiss.extract_index_ivf(index.index).nprobe == expected
        else:
            assert faiss.downcast_index(index.index).hnsw.efSearch == expected


def test_search_returns_k_where_the_index_holds_k_rows(tmp_path):
    # issue 25 (4): IVF16 tuned to a low nprobe on 3,000 rows returns fewer
    # than k=200 rows from the probed lists; search fills the rest by
    # searching harder, and leaves the tuned parameters as they were.
    import faiss
    data = unit(clustered(3000, d=32))
    to = str(tmp_path / "ivf")
    build_index(ArrayVectors(data), to, index_key="IVF16,Flat", progress=quiet)
    index = SearchIndex.open(to)
    index.params = {"nprobe": 1}
    index._apply(index.params)  # pylint: disable=protected-access
    queries = data[:20]
    _, tuned_rows = index.search_rows(queries, 200)
    assert ((tuned_rows >= 0).sum(axis=1) < 200).any()  # the tuned search falls short
    found = index.search(queries, 200)
    assert [len(n) for n in found] == [200] * 20
    assert faiss.extract_index_ivf(index.index).nprobe == 1 and index.params == {"nprobe": 1}
    for row in found:  # distinct rows, best first, scores as computed exactly
        assert len({n.row for n in row}) == 200
        scores = np.array([n.score for n in row])
        assert (np.diff(scores) <= 1e-6).all()
        np.testing.assert_allclose(scores, data[[n.row for n in row]] @ queries[found.index(row)],
                                   atol=1e-4)


@pytest.mark.parametrize("command", ["index", "dedup"])
def test_a_part_without_feature_vectors_is_one_line_naming_it(dataset, tmp_path, capsys,
                                                               command):
    # issue 25: a part with the dataset's metadata but no feature_vector
    # column ended `index` in "IndexError: index out of bounds" and a traceback.
    _, out = dataset
    copy = tmp_path / "out"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("index", "duplicates"))
    part = sorted((copy / "embeddings").glob("*.parquet"))[0]
    table = pq.read_table(part)
    bad = copy / "embeddings" / "part-zz-foreign.parquet"
    pq.write_table(table.drop_columns(["feature_vector"]), bad)
    capsys.readouterr()
    main = {"index": index_main, "dedup": dedup_main}[command]
    assert main([str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert bad.name in err[0] and "feature_vector" in err[0] and "Traceback" not in err[0]
