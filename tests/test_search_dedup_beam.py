"""dedup as a Beam pipeline, on datasets written with planted duplicates:
pairs and clusters equal a brute-force computation (NumPy all-pairs cosine,
union-find), exact copies by digest, components that need several pipelines,
the index built when missing, the --max_pairs bound (estimate before the
pass, hard stop during it), a killed or failed run leaving the previous
results in service, and the Dataflow translation (--dry_run)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from gcs_emulator import gcs_emulator  # noqa: F401 (a fixture)
from paths import ROOT
from pipeline.search.dedup_beam import read_summary, read_table
from pipeline.commands.search import dedup_main
from synthetic_dataset import planted, write_dataset

TWO_WORKERS = ["--direct_running_mode", "multi_processing", "--direct_num_workers", "2"]
ONE_WORKER = ["--direct_running_mode", "in_memory"]


def brute_force(x, ids, digests, pixels, threshold):
    """(exact pairs, near pairs, clusters as {frozenset: representative})."""
    u = x.astype(np.float64)
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sims = u @ u.T
    gaps = np.abs(sims - threshold)
    assert gaps.min() > 1e-4, "a pair sits on the threshold: pick another"
    by_digest: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        by_digest.setdefault(d, []).append(i)
    exact = set()
    for members in by_digest.values():
        if len(members) > 1:
            members.sort(key=lambda i: (-pixels[i], ids[i]))
            exact |= {(ids[members[0]], ids[o]) for o in members[1:]}
    near = {(ids[i], ids[j]) if ids[i] < ids[j] else (ids[j], ids[i])
            for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1)))
            if digests[i] != digests[j]}
    parent = {}

    def find(a):
        while parent.setdefault(a, a) != a:
            a = parent[a]
        return a
    for a, b in exact | near:
        parent[find(a)] = find(b)
    comps: dict[str, set] = {}
    for a in list(parent):
        comps.setdefault(find(a), set()).add(a)
    size = dict(zip(ids, pixels))
    clusters = {frozenset(m): min(m, key=lambda i: (-size[i], i)) for m in comps.values()}
    return exact, near, clusters


def found(to: Path):
    pairs = read_table(str(to), "pairs").to_pylist()
    exact = {(p["image_id_a"], p["image_id_b"]) for p in pairs if p["kind"] == "exact"}
    near = {(p["image_id_a"], p["image_id_b"]) for p in pairs if p["kind"] == "near"}
    assert len(exact) + len(near) == len(pairs), "a pair written twice"
    by_cluster: dict[int, list] = {}
    for row in read_table(str(to), "clusters").to_pylist():
        by_cluster.setdefault(row["cluster_id"], []).append(row)
    clusters = {}
    for rows in by_cluster.values():
        reps = [r["image_id"] for r in rows if r["is_representative"]]
        assert len(reps) == 1
        clusters[frozenset(r["image_id"] for r in rows)] = reps[0]
    return exact, near, clusters, pairs


@pytest.fixture(scope="module")
def planted_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("dedup") / "out"
    data = planted(700, dim=32, groups=25, copies=3, exact=12, seed=3)
    write_dataset(root, *data, rows_per_part=300, row_group=128)
    return root, data


def indexed(root: Path) -> Path:
    """The dataset with its index (the first test builds it through dedup)."""
    if not (root / "index").exists():
        from pipeline.search.api import build_dataset_index
        build_dataset_index(str(root), to=str(root / "index"), progress=lambda m: None)
    return root


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_pairs_and_clusters_equal_brute_force_on_two_workers(planted_dataset, capsys):
    root, (x, ids, digests, pixels) = planted_dataset
    threshold = 0.97
    assert not (root / "index").exists()
    capsys.readouterr()
    assert dedup_main([str(root), "--threshold", str(threshold), "--shard_rows", "100",
                       *TWO_WORKERS]) == 0
    err = capsys.readouterr().err
    assert "no index in" in err and "building one first" in err  # and it did
    assert (root / "index").is_dir()
    exact, near, clusters = brute_force(x, ids, digests, pixels, threshold)
    got_exact, got_near, got_clusters, pairs = found(root / "duplicates")
    assert len(exact) == 12 and len(near) >= 25 * 6
    assert got_exact == exact
    assert got_near == near
    assert got_clusters == clusters
    sims = {(p["image_id_a"], p["image_id_b"]): p["similarity"] for p in pairs}
    pos = {i: n for n, i in enumerate(ids)}
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    for a, b in list(near)[:50]:
        assert sims[(a, b)] == pytest.approx(float(u[pos[a]] @ u[pos[b]]), abs=1e-4)
    summary = read_summary(str(root / "duplicates"))
    assert summary["images"] == 700 and summary["exact_pairs"] == 12
    assert summary["near_pairs"] == len(near) and summary["clusters"] == len(clusters)
    assert summary["largest_cluster"] == max(len(c) for c in clusters)
    assert summary["engine"] == "beam" and "2 local worker" in summary["runner"]
    assert summary["index"]["built_now"] is True
    # The estimate came from a sample and is of the right order.
    assert summary["estimate"]["sampled_rows"] > 0
    assert 0.2 * len(pairs) <= summary["estimate"]["expected_pairs"] <= 5 * len(pairs)
    # Nothing else is left in the results folder.
    assert sorted(os.listdir(root / "duplicates")) == sorted(
        ["dedup_summary.json", summary["files"]])
    assert sorted(os.listdir(root / "duplicates" / summary["files"])) == ["clusters", "pairs"]


def test_a_long_chain_takes_several_component_pipelines(tmp_path):
    """A path of 40 rows (each only close to its two neighbours), ids in
    random order: one large-star/small-star round per pipeline cannot finish
    it; the launcher runs pipelines until the star check passes."""
    rng = np.random.default_rng(7)
    n_chain, dim = 40, 16
    angles = np.radians(2.2) * np.arange(n_chain)
    chain = np.zeros((n_chain, dim), np.float32)
    chain[:, 0], chain[:, 1] = np.cos(angles), np.sin(angles)
    others = rng.normal(size=(60, dim)).astype(np.float32)
    others[:, :2] = 0
    x = np.concatenate([chain, others])
    ids = [f"r{v:03d}" for v in rng.permutation(len(x))]
    pixels = rng.integers(10, 1000, len(x)).tolist()
    digests = [f"d{i}" for i in range(len(x))]
    write_dataset(tmp_path / "out", x, ids, digests, pixels)
    threshold = 0.999
    assert dedup_main([str(tmp_path / "out"), "--threshold", str(threshold),
                       "--rounds", "1", *ONE_WORKER]) == 0
    exact, near, clusters = brute_force(x, ids, digests, pixels, threshold)
    assert len(near) == n_chain - 1 and len(clusters) == 1
    _, got_near, got_clusters, _ = found(tmp_path / "out" / "duplicates")
    assert got_near == near and got_clusters == clusters
    summary = read_summary(str(tmp_path / "out" / "duplicates"))
    assert summary["component_pipelines"] > 1
    assert summary["largest_cluster"] == n_chain


def test_too_low_a_threshold_is_refused_from_the_estimate(planted_dataset, tmp_path, capsys):
    root = indexed(planted_dataset[0])
    to = tmp_path / "d"
    capsys.readouterr()
    assert dedup_main([str(root), "--threshold", "0.3", "--max_pairs", "5000",
                       "--to", str(to), *ONE_WORKER]) == 2
    line = one_error_line(capsys)
    assert "pairs expected at --threshold 0.3" in line and "--max_pairs 5,000" in line
    assert "raise --threshold" in line
    assert not to.exists()
    # The default bound follows --max_memory: 1 MiB holds 748 pairs.
    assert dedup_main([str(root), "--threshold", "0.3", "--max_memory", "1M",
                       "--to", str(to), *ONE_WORKER]) == 2
    assert "--max_pairs 748" in one_error_line(capsys)
    assert dedup_main([str(root), "--max_pairs", "0", "--to", str(to)]) == 2
    assert "--max_pairs" in one_error_line(capsys)


def test_a_failed_run_leaves_the_previous_results(planted_dataset, tmp_path, capsys):
    root = indexed(planted_dataset[0])
    to = tmp_path / "d"
    assert dedup_main([str(root), "--threshold", "0.97", "--to", str(to), *ONE_WORKER]) == 0
    before = read_summary(str(to))
    pairs_before = read_table(str(to), "pairs")
    capsys.readouterr()
    # Past the estimate, over the bound during the pass: the hard stop.
    assert dedup_main([str(root), "--threshold", "0.5", "--skip_estimate",
                       "--max_pairs", "1000", "--to", str(to), *ONE_WORKER]) == 3
    line = one_error_line(capsys)
    assert "--max_pairs 1000" in line and "the dedup pipeline failed" in line
    assert read_summary(str(to)) == before
    assert read_table(str(to), "pairs").equals(pairs_before)
    assert sorted(os.listdir(to)) == sorted(["dedup_summary.json", before["files"]])


def test_a_killed_run_leaves_the_previous_results(planted_dataset, tmp_path):
    root = indexed(planted_dataset[0])
    to = tmp_path / "d"
    assert dedup_main([str(root), "--threshold", "0.97", "--to", str(to), *ONE_WORKER]) == 0
    before = read_summary(str(to))
    code = ("import sys; from pipeline.commands.search import dedup_main; "
            "sys.exit(dedup_main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), "--threshold", "0.9",
                             "--to", str(to), *ONE_WORKER], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def writing() -> bool:  # its pipeline has begun writing its own run folder
        return any(p.name.startswith("run-") and p.name != before["files"]
                   for p in to.iterdir())
    deadline = time.monotonic() + 60
    while not writing() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert (to / "_lock.json").exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_summary(str(to)) == before
    assert len(read_table(str(to), "pairs")) == before["exact_pairs"] + before["near_pairs"]
    assert writing()  # what it left is not in service, and goes with the next run:
    # the next run takes the dead run's lock over and clears it.
    assert dedup_main([str(root), "--threshold", "0.97", "--to", str(to), *ONE_WORKER]) == 0
    after = read_summary(str(to))
    assert after["files"] != before["files"]
    assert sorted(os.listdir(to)) == sorted(["dedup_summary.json", after["files"]])


def test_dataflow_dry_run_translates_the_dedup_job(monkeypatch, capsys):
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    from gcs_emulator import NetworkGuard, forget_beam_credentials
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    captured = []
    real_run = DataflowRunner.run_pipeline

    def spy(self, pipeline, options, pipeline_proto=None):
        captured.append(self)
        return real_run(self, pipeline, options, pipeline_proto)
    monkeypatch.setattr(DataflowRunner, "run_pipeline", spy)
    forget_beam_credentials()
    guard = NetworkGuard()
    with guard.watch():
        code = dedup_main(["gs://bucket/out", "--threshold", "0.9", "--runner",
                           "DataflowRunner", "--dry_run", "--no_auth", "--project",
                           "my-project", "--region", "us-central1", "--temp_location",
                           "gs://bucket/tmp", "--setup_file", "./setup.py"])
    assert code == 0, capsys.readouterr().err
    assert guard.outside == [] and guard.credential_searches == []
    assert "dry run" in capsys.readouterr().out
    (runner,) = captured
    names = {t.unique_name for t in runner.proto_pipeline.components.transforms.values()}
    for stage in ("PlanShards", "NearPairs", "GroupDigests", "ExactGroups", "OncePerPair",
                  "JoinDigestA", "JoinDigestB", "DropExactCopies", "HardStop", "WritePairs",
                  "Components/LargeStar1/Group",
                  "Components/SmallStar1/Group", "Components/Check/Sum",
                  "Representative", "WriteClusters"):
        assert stage in names, sorted(names)
    # Local paths cannot reach Dataflow's workers: one line, exit 2.
    assert dedup_main(["/tmp/out", "--runner", "DataflowRunner", "--dry_run", "--no_auth",
                       "--project", "p", "--region", "us-central1",
                       "--temp_location", "gs://bucket/tmp"]) == 2
    assert "gs://" in one_error_line(capsys)


def test_the_blow_up_of_the_issue_is_refused_before_the_pass(tmp_path, capsys):
    """2,200 rows at a low threshold gave 2.4M pairs (1.1 GB, in one
    process) without a word: now the estimate from a sample stops it in one
    line, before any pair is written, and the in-process call stops too."""
    from pipeline.search import find_dataset_duplicates
    from pipeline.search.errors import SearchError
    x, ids, digests, pixels = planted(2200, dim=16, groups=0, exact=0, seed=5)
    write_dataset(tmp_path / "out", x, ids, digests, pixels)
    capsys.readouterr()
    started = time.monotonic()
    assert dedup_main([str(tmp_path / "out"), "--threshold", "-1", "--max_memory", "1G",
                       *ONE_WORKER]) == 2
    notice, line = capsys.readouterr().err.strip().splitlines()
    assert "building one first" in notice and line.startswith("error: ")
    assert "about 2,41" in line and "--max_pairs 766,958" in line, line
    assert time.monotonic() - started < 30
    assert not (tmp_path / "out" / "duplicates").exists()
    with pytest.raises(SearchError, match="more than 1,000 near-duplicate pairs"):
        find_dataset_duplicates(str(tmp_path / "out"), threshold=-1, max_pairs=1000)


def test_bad_targets_and_a_second_writer_are_one_line(planted_dataset, tmp_path, capsys):
    root = indexed(planted_dataset[0])
    a_file = tmp_path / "file"
    a_file.write_text("not a folder")
    capsys.readouterr()
    for to in (a_file, a_file / "under"):
        assert dedup_main([str(root), "--threshold", "0.97", "--to", str(to),
                           *ONE_WORKER]) == 2
        assert str(to) in one_error_line(capsys)  # before any index is built
    assert a_file.read_text() == "not a folder"
    assert dedup_main([str(tmp_path / "absent"), *ONE_WORKER]) == 2
    assert "does not exist" in one_error_line(capsys)
    assert not (tmp_path / "absent").exists()
    # Another live run holds the results folder: refused, its lock kept.
    to = tmp_path / "held"
    to.mkdir()
    holder = {"run_id": "other", "host": os.uname().nodename, "pid": os.getpid(),
              "started_at": "2026-01-01T00:00:00+00:00"}
    (to / "_lock.json").write_text(json.dumps(holder))
    assert dedup_main([str(root), "--threshold", "0.97", "--to", str(to), *ONE_WORKER]) == 2
    assert "being written by another run (other" in one_error_line(capsys)
    assert json.loads((to / "_lock.json").read_text()) == holder
    assert sorted(os.listdir(to)) == ["_lock.json"]


def test_over_gs_results_replace_the_previous_run(gcs_emulator, tmp_path, capsys):
    """On a bucket (the GCS emulator): the index built first, results as
    parts, and a second run's commit removes the first run's objects."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    gcs = gcs_emulator
    x, ids, digests, pixels = planted(300, dim=16, groups=5, exact=3, seed=11)
    write_dataset(tmp_path / "out", x, ids, digests, pixels, rows_per_part=150)
    gcs.create_bucket("dedup-test")
    gcs.upload_tree(tmp_path / "out", "gs://dedup-test/out")
    out = "gs://dedup-test/out"
    capsys.readouterr()
    assert dedup_main([out, "--threshold", "0.97", *ONE_WORKER]) == 0
    assert "building one first" in capsys.readouterr().err
    first = json.loads(gcs.read(f"{out}/duplicates/dedup_summary.json"))
    assert dedup_main([out, "--threshold", "0.97", *ONE_WORKER]) == 0
    second = json.loads(gcs.read(f"{out}/duplicates/dedup_summary.json"))
    objects = gcs.list(f"{out}/duplicates/")
    assert second["files"] != first["files"]
    assert not [o for o in objects if first["files"] in o]
    assert f"{out}/duplicates/_lock.json" not in objects
    assert not [o for o in objects if "/_stats/" in o or "/_cc/" in o or "beam-temp" in o]
    parts = [o for o in objects if "/pairs/" in o]
    pairs = pa.concat_tables([pq.read_table(io.BytesIO(gcs.read(p))) for p in parts])
    exact, near, _ = brute_force(x, ids, digests, pixels, 0.97)
    assert pairs.num_rows == len(exact) + len(near) == second["exact_pairs"] + \
        second["near_pairs"]
