"""The index built as a Beam pipeline (pipeline/search/build.py), and the index
folder's safety rules (issue 18): one writer, unbuildable keys and bad
targets in one line with nothing half-made, damaged indexes rebuilt.

Real runs throughout: FnApiRunner (in memory, or two worker processes),
real faiss shards merged on disk, a real job's dataset for the commands.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import faiss
import numpy as np
import pytest

from corpus import file_permissions_enforced
from gcs_emulator import NetworkGuard, forget_beam_credentials, gcs_emulator  # noqa: F401
from jobs import run_job, sample_photos
from paths import ROOT
from pipeline.search import ArrayVectors, SearchIndex, build_index
from pipeline.search.build import build_index_beam
from pipeline.search.index import INDEX_INFOS, LOCK
from pipeline.commands.search import index_main, query_main
from transforms.dataset import FolderLock

IN_MEMORY = ["--direct_running_mode", "in_memory"]
TWO_WORKERS = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]


def clustered(n: int, d: int = 32, centers: int = 40, spread: float = 1.0,
              seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = np.maximum(rng.normal(size=(centers, d)), 0)
    x = c[rng.integers(0, centers, n)] + spread * rng.normal(size=(n, d))
    return np.maximum(x, 0).astype(np.float32)


def quiet(_message: str) -> None:
    pass


def ids(n: int, start: int = 0) -> list[str]:
    return [f"img{i:06d}" for i in range(start, start + n)]


class Without(ArrayVectors):
    """The same vectors with some parts gone (rows a re-run removed)."""
    def __init__(self, vectors, image_ids, gone, **kw):
        super().__init__(vectors, image_ids=image_ids, **kw)
        self.gone = set(gone)

    def parts(self):
        return [p for p in super().parts() if p[0] not in self.gone]


MADE_BY = {"model": "m", "weights_sha256": "w"}


# --- the Beam build ------------------------------------------------------------

def test_sharded_beam_build_matches_in_process_recall_and_merged_lists(tmp_path):
    x = clustered(4000)
    source = ArrayVectors(x, image_ids=ids(4000), part_rows=700, made_by=MADE_BY)
    beam_infos = build_index_beam(source, str(tmp_path / "beam"), index_key="IVF64,Flat",
                                  recall_queries=300, shards=3, beam_argv=TWO_WORKERS,
                                  progress=quiet)
    one = build_index(source, str(tmp_path / "one"), index_key="IVF64,Flat",
                      recall_queries=300, progress=quiet)
    assert beam_infos["engine"] == "beam" and one["engine"] == "in-process"
    assert beam_infos["shards"] == 3 and beam_infos["rows"] == 4000
    assert len(beam_infos["workers"]["peak_rss_bytes_by_process"]) >= 1
    for stage in ("measure_s", "sample_s", "train_s", "add_s", "merge_s", "tune_s"):
        assert stage in beam_infos["build_seconds"]
    # Same recall, each against its own exact search, at the tuned nprobe.
    assert abs(beam_infos["recall_at_10"] - one["recall_at_10"]) <= 0.01
    beam = SearchIndex.open(str(tmp_path / "beam"))
    ref = SearchIndex.open(str(tmp_path / "one"))
    # Recall@10 of both against NumPy's exact search, at one nprobe.
    queries = clustered(200, seed=9)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    truth = np.argsort(-(q @ unit.T), axis=1)[:, :10]
    recalls = []
    for index in (beam, ref):
        faiss.ParameterSpace().set_index_parameter(index.index, "nprobe", 8)
        _, rows = index.index.search(q, 10)
        labels = np.array([[int(index.image_ids[r].as_py()[3:]) for r in row] for row in rows])
        recalls.append(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(labels, truth)]))
    assert abs(recalls[0] - recalls[1]) <= 0.01
    # The merged inverted lists hold exactly the shards' lists.
    files = tmp_path / "beam" / beam_infos["files"]
    merged = faiss.extract_index_ivf(beam.index)
    sizes = np.zeros(merged.nlist, np.int64)
    for shard in sorted((files / "shards").iterdir()):
        loaded = faiss.read_index(str(shard))  # kept: ivf is a view of it
        ivf = faiss.extract_index_ivf(loaded)
        sizes += [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    assert sizes.tolist() == [merged.invlists.list_size(i) for i in range(merged.nlist)]
    assert sizes.sum() == 4000 and (files / "lists.ivfdata").exists()


def test_a_grown_dataset_adds_shards_and_removed_parts_leave_the_index(tmp_path):
    x = clustered(5000, seed=4)
    to = str(tmp_path / "index")
    first = build_index_beam(ArrayVectors(x[:3000], image_ids=ids(3000), part_rows=1000,
                                          made_by=MADE_BY),
                             to, index_key="IVF32,SQ8", recall_queries=200, shards=2,
                             beam_argv=IN_MEMORY, progress=quiet)
    assert first["rerank"] and first["rows"] == 3000
    grown = ArrayVectors(x, image_ids=ids(5000), part_rows=1000, made_by=MADE_BY)
    second = build_index_beam(grown, to, index_key="IVF32,SQ8", recall_queries=200,
                              shards=2, beam_argv=IN_MEMORY, progress=quiet)
    assert second["incremental"] and second["rows_added"] == 2000
    assert second["shards"] == 4 and second["shards_added"] == 2
    builds = [p for p in os.listdir(to) if p.startswith("build-")]
    assert builds == [second["files"]] and not os.path.exists(os.path.join(to, "_work"))
    # The trained quantizer was kept: the centroids are the first build's.
    index = SearchIndex.open(to)
    assert index.ntotal == 5000
    # Every row finds itself first, re-ranked on its exact vector.
    probe = [0, 2999, 3000, 4999]
    found = index.search(x[probe], 1)
    assert [r[0].image_id for r in found] == [ids(5000)[i] for i in probe]

    # A re-run removed the part of rows 1000..1999: they leave the index.
    shrunk = Without(x, ids(5000), {"rows-0000001000"}, part_rows=1000, made_by=MADE_BY)
    third = build_index_beam(shrunk, to, index_key="IVF32,SQ8", recall_queries=200,
                             shards=2, beam_argv=IN_MEMORY, progress=quiet)
    assert third["incremental"] and third["rows_removed"] == 1000
    assert third["rows_added"] == 0 and third["rows"] == 4000
    index = SearchIndex.open(to)
    assert index.ntotal == 4000
    hits = {n.image_id for r in index.search(x[1000:2000:50], 10) for n in r}
    assert not hits & set(ids(1000, 1000)) and None not in hits
    assert third["recall_at_10"] >= 0.95


KILL_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_search_beam import clustered, ids, MADE_BY
    from pipeline.search import ArrayVectors
    from pipeline.search.build import build_index_beam
    x = clustered(12000, d=64, seed=11)
    infos = build_index_beam(ArrayVectors(x, image_ids=ids(12000), part_rows=500,
                                          made_by=MADE_BY),
                             sys.argv[1], index_key="IVF64,Flat", recall_queries=200,
                             shards=24, beam_argv={argv!r}, progress=print)
    print("RECALL", infos["recall_at_10"], infos["rows"])
""")


def test_a_build_killed_mid_add_resumes_to_the_clean_result(tmp_path):
    script = tmp_path / "build.py"
    script.write_text(KILL_SCRIPT.format(tests=str(ROOT / "tests"), argv=IN_MEMORY))
    to = tmp_path / "index"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(script), str(to)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 60
    done_dirs = []
    while time.time() < deadline and proc.poll() is None:
        done_dirs = list((to / "_work").glob("*/done/*.npz")) if (to / "_work").exists() else []
        if done_dirs:
            break
        time.sleep(0.01)
    assert done_dirs, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    # Killed mid-add: no index was committed, nothing half-made is named.
    assert not (to / INDEX_INFOS).exists()
    assert not list(to.glob("build-*"))
    with pytest.raises(Exception, match="no index"):
        SearchIndex.open(str(to))

    again = subprocess.run([sys.executable, str(script), str(to)], env=env,
                           capture_output=True, text=True, check=True)
    assert "resuming" in again.stdout
    clean = subprocess.run([sys.executable, str(script), str(tmp_path / "clean")], env=env,
                           capture_output=True, text=True, check=True)
    resumed_line = [l for l in again.stdout.splitlines() if l.startswith("RECALL")]
    clean_line = [l for l in clean.stdout.splitlines() if l.startswith("RECALL")]
    assert resumed_line == clean_line and clean_line[0].endswith(" 12000")
    assert SearchIndex.open(str(to)).ntotal == 12000


# --- the command on a real dataset ------------------------------------------------

@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam-index")
    photos, out = root / "photos", root / "out"
    photos.mkdir()
    for path in sorted(p for p in sample_photos().iterdir()
                       if p.suffix in (".png", ".jpg"))[:14]:
        shutil.copy(path, photos / path.name)
    assert run_job("--input", str(photos), "--output", str(out), "--model_source", "random") == 0
    return out


def one_line(capsys, code: int, expected: int, *words: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == expected, captured
    # Progress lines may come first; the failure is one last line.
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert "Traceback" not in captured.err
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_index_command_builds_on_beam_and_query_json_stays_clean(dataset, tmp_path, capsys):
    to = tmp_path / "ivf"
    assert index_main([str(dataset), "--to", str(to), "--index_key", "IVF2,Flat",
                       "--shards", "2"] + IN_MEMORY) == 0
    assert "beam, 2 shards" in capsys.readouterr().out
    infos = json.loads((to / INDEX_INFOS).read_text())
    assert infos["engine"] == "beam" and infos["runner"].startswith("FnApiRunner")
    # The launcher's memory: peak RSS and, within it, what is not mapped files.
    assert 0 < infos["peak_anonymous_memory_bytes"] <= infos["peak_memory_bytes"]
    ids_ = SearchIndex.open(str(to)).image_ids.to_pylist()
    assert query_main([str(dataset), "--index", str(to), "--id", ids_[0], "--k", "1",
                       "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out)["neighbors"]  # stdout is nothing but the JSON


def test_dataflow_dry_run_builds_the_graph_and_writes_nothing(dataset, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    to = tmp_path / "never"
    forget_beam_credentials()
    guard = NetworkGuard()
    with guard.watch():
        code = index_main([str(dataset), "--to", str(to), "--index_key", "IVF2,Flat",
                           "--runner", "DataflowRunner", "--project", "my-project",
                           "--region", "us-central1", "--temp_location", "gs://bucket/tmp",
                           "--setup_file", "./setup.py", "--dry_run", "--no_auth"])
    assert code == 0, capsys.readouterr()
    assert "dry run" in capsys.readouterr().out
    assert guard.outside == [] and not to.exists()


# --- issue 18: the index folder's safety rules -------------------------------------

@pytest.mark.parametrize("key", ["IVF0,Flat", "IVF1024,Flat", "OPQ16,IVF4,PQ16",
                                 "IDMap,Flat", "PCA1000,Flat", "PCA64,IVF2,Flat"])
def test_a_key_that_cannot_be_built_is_one_line_and_leaves_no_folder(dataset, tmp_path,
                                                                     capsys, key):
    to = tmp_path / "to"
    code = index_main([str(dataset), "--to", str(to), "--index_key", key] + IN_MEMORY)
    one_line(capsys, code, 2, key)
    assert not to.exists()


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_a_bad_target_is_one_line(dataset, tmp_path, capsys, case):
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    locked = tmp_path / "locked"
    locked.mkdir()
    to = {"file": afile, "under_a_file": afile / "index",
          "read_only": locked / "index"}[case]
    if case == "read_only":
        locked.chmod(0o500)
        try:
            with file_permissions_enforced() as enforced:
                if not enforced:
                    pytest.skip("cannot drop root's permission override here")
                code = index_main([str(dataset), "--to", str(to)])
        finally:
            locked.chmod(0o700)
    else:
        code = index_main([str(dataset), "--to", str(to)])
    one_line(capsys, code, 2, str(to))
    assert afile.read_text() == "mine" and os.listdir(locked) == []


def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(dataset, tmp_path, capsys):
    to = tmp_path / "index"
    to.mkdir()
    lock = FolderLock(str(to / LOCK), str(to))
    lock.acquire("someone-else")  # this process is alive: a live holder
    one_line(capsys, index_main([str(dataset), "--to", str(to)]), 2,
             "being written by another run", "someone-else")
    assert not (to / INDEX_INFOS).exists()
    lock.release("someone-else")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (to / LOCK).write_text(json.dumps({"run_id": "dead", "host": os.uname().nodename,
                                       "pid": int(dead.stdout), "started_at": "then"}))
    assert index_main([str(dataset), "--to", str(to)]) == 0
    assert not (to / LOCK).exists()


def test_two_builds_at_once_never_leave_infos_naming_a_missing_build(dataset, tmp_path):
    to = tmp_path / "index"
    cmd = [sys.executable, "-m", "pipeline", "index", str(dataset), "--to", str(to),
           "--rebuild", "--index_key", "HNSW32,Flat"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(1):
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
        results = [(p.wait(), p.communicate()[1]) for p in procs]
        assert 0 in [code for code, _ in results], results
        for code, err in results:
            assert "Traceback" not in err, err
            if code:
                assert code == 2 and "being written by another run" in err, err
        infos = json.loads((to / INDEX_INFOS).read_text())
        assert (to / infos["files"] / "index.faiss").exists()
        assert [p.name for p in to.glob("build-*")] == [infos["files"]]
        assert SearchIndex.open(str(to)).ntotal == infos["rows"]


@pytest.mark.parametrize("damage", ["empty", "garbage", "infos", "ivfdata"])
def test_a_damaged_index_is_rebuilt(dataset, tmp_path, capsys, damage):
    to = tmp_path / "index"
    key = ["--index_key", "IVF2,Flat"] + IN_MEMORY if damage == "ivfdata" else []
    assert index_main([str(dataset), "--to", str(to)] + key) == 0
    infos = json.loads((to / INDEX_INFOS).read_text())
    files = to / infos["files"]
    if damage == "empty":
        (files / "index.faiss").write_bytes(b"")
    elif damage == "garbage":
        (files / "index.faiss").write_bytes(b"not an index" * 10)
    elif damage == "infos":
        (to / INDEX_INFOS).write_text("{ half")
    else:
        (files / "shards" / infos["shard_list"][0]["name"]).with_suffix(".faiss").write_bytes(b"")
        (files / "trained.faiss").write_bytes(b"")
    capsys.readouterr()
    assert index_main([str(dataset), "--to", str(to)] + key) == 0
    captured = capsys.readouterr()
    assert "building it again" in captured.err and "Traceback" not in captured.err
    again = json.loads((to / INDEX_INFOS).read_text())
    assert again["files"] != infos["files"] and not again["incremental"]
    assert SearchIndex.open(str(to)).ntotal == again["rows"]


@pytest.mark.parametrize("layout", ["merged", "stacked"])
def test_a_beam_build_into_a_bucket_is_searched_and_grown_there(dataset, gcs_emulator,
                                                                tmp_path, capsys, layout):
    bucket = f"beam-index-{layout}"
    gcs_emulator.create_bucket(bucket)
    gcs_emulator.upload_tree(dataset, f"gs://{bucket}/out")
    out = f"gs://{bucket}/out"
    args = [out, "--index_key", "IVF2,Flat", "--shards", "2", "--layout", layout] + IN_MEMORY
    assert index_main(args) == 0, capsys.readouterr()
    infos = json.loads(gcs_emulator.read(f"{out}/index/{INDEX_INFOS}"))
    stored = {u.split(f"/{infos['files']}/", 1)[1]
              for u in gcs_emulator.list(f"{out}/index/{infos['files']}/")}
    assert {"index.faiss", "rows.parquet", "trained.faiss"} <= stored
    assert ("lists.ivfdata" in stored) == (layout == "merged")
    assert sum(s.startswith("shards/") for s in stored) == 2
    assert not gcs_emulator.list(f"{out}/index/_work/")
    capsys.readouterr()
    first_id = SearchIndex.open(f"{out}/index").image_ids[0].as_py()
    assert query_main([out, "--id", first_id, "--k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["neighbors"]
    # Again: nothing new, the committed shards are kept and merged again.
    assert index_main(args) == 0
    again = json.loads(gcs_emulator.read(f"{out}/index/{INDEX_INFOS}"))
    assert again["incremental"] and again["rows_added"] == 0 and again["rows"] == infos["rows"]
    # On gs:// the replaced build stays until the next run (a reader may
    # still be copying it: issue 25), and goes then.
    assert again["files"] != infos["files"]
    assert gcs_emulator.list(f"{out}/index/{infos['files']}/")
    assert index_main(args) == 0
    assert not gcs_emulator.list(f"{out}/index/{infos['files']}/")


def test_stacked_shards_search_exactly_like_the_merged_index(tmp_path):
    x = clustered(3000, seed=12)
    source = ArrayVectors(x, image_ids=ids(3000), part_rows=500, made_by=MADE_BY)
    infos = {}
    for layout in ("merged", "stacked"):
        infos[layout] = build_index_beam(source, str(tmp_path / layout), index_key="IVF32,SQ8",
                                         recall_queries=200, shards=3, layout=layout,
                                         beam_argv=IN_MEMORY, progress=quiet)
    stacked_files = tmp_path / "stacked" / infos["stacked"]["files"]
    assert infos["stacked"]["layout"] == "stacked" and not (stacked_files / "lists.ivfdata").exists()
    assert infos["stacked"]["recall_at_10"] == infos["merged"]["recall_at_10"]
    merged, stacked = (SearchIndex.open(str(tmp_path / l)) for l in ("merged", "stacked"))
    assert merged.ntotal == stacked.ntotal == 3000
    q = clustered(50, seed=13)
    for a, b in zip(merged.search_rows(q, 10), stacked.search_rows(q, 10)):
        np.testing.assert_array_equal(a, b)
    # Grown, the stacked index adds a shard and still merges nothing.
    grown = ArrayVectors(np.concatenate([x, clustered(500, seed=14)]), image_ids=ids(3500),
                         part_rows=500, made_by=MADE_BY)
    again = build_index_beam(grown, str(tmp_path / "stacked"), index_key="IVF32,SQ8",
                             recall_queries=200, shards=1, layout="stacked",
                             beam_argv=IN_MEMORY, progress=quiet)
    assert again["incremental"] and len(again["stacked_shards"]) == 4
    assert SearchIndex.open(str(tmp_path / "stacked")).ntotal == 3500
