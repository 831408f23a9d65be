"""`mobilenet-embed feast OUT --to REPO` and the real Feast on it: `feast
apply`, `feast materialize-incremental` into the SQLite online store,
get_online_features returns each image's vector, get_historical_features
joins on the event timestamps."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jobs import matrix, read_embeddings, run_job, sample_photos
from pipeline.commands.export import feast_main

PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png"]
FEAST = str(Path(sys.executable).parent / "feast")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("feast")
    photos, out = root / "photos", root / "out"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(sample_photos() / name, photos / name)
    assert run_job("--input", str(photos), "--output", str(out), "--model_source", "random") == 0
    return root, out


def feast(repo: Path, *args: str) -> str:
    env = {**os.environ, "FEAST_USAGE": "False"}
    done = subprocess.run([FEAST, *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# Feast's own process (as a user's would be): it replaces the interpreter's
# stderr handlers, which pytest's capture does not survive.
QUERY = r"""
import json, sys
import pandas as pd
from feast import FeatureStore
ids, times = json.loads(sys.argv[1])
store = FeatureStore(repo_path=".")
online = store.get_online_features(
    features=["image_embeddings:feature_vector", "image_embeddings:top5_labels",
              "image_embeddings:model"],
    entity_rows=[{"image_id": i} for i in ids]).to_dict()
entity_df = pd.DataFrame({
    "image_id": [ids[0], ids[1]],
    "event_timestamp": [pd.Timestamp(times[0]) + pd.Timedelta(seconds=1),
                        pd.Timestamp(times[1]) - pd.Timedelta(days=1)]})
joined = store.get_historical_features(
    entity_df=entity_df, features=["image_embeddings:feature_vector"]).to_df()
historical = {}
for _, row in joined.iterrows():
    v = row["feature_vector"]
    historical[row["image_id"]] = None if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) \
        else [float(x) for x in v]
print("RESULT" + json.dumps({"online": online, "historical": historical}))
"""


def test_feast_apply_materialize_online_and_historical(dataset, capsys):
    root, out = dataset
    repo = root / "repo"
    assert feast_main([str(out), "--to", str(repo)]) == 0
    assert "feast apply" in capsys.readouterr().out
    feast(repo, "apply")
    feast(repo, "materialize-incremental", "2100-01-01T00:00:00")
    table = read_embeddings(out)
    ids = table.column("image_id").to_pylist()
    vectors = matrix(table, "feature_vector")
    times = [t.isoformat() for t in table.column("event_timestamp").to_pylist()]
    done = subprocess.run([sys.executable, "-c", QUERY, json.dumps([ids, times])], cwd=repo,
                          env={**os.environ, "FEAST_USAGE": "False"}, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    online = result["online"]
    assert online["image_id"] == ids
    for i in range(len(ids)):
        np.testing.assert_array_equal(np.asarray(online["feature_vector"][i], np.float32),
                                      vectors[i])
    assert online["model"] == ["mobilenet_v2_100_224"] * len(ids)
    assert online["top5_labels"] == table.column("top5_labels").to_pylist()
    # Point-in-time join: asked for after its event, a row gets the vector;
    # asked for before it, nothing (Feast leaves it empty or drops it).
    historical = result["historical"]
    np.testing.assert_array_equal(np.asarray(historical[ids[0]], np.float32), vectors[0])
    assert historical.get(ids[1]) is None


def test_feast_repo_refuses_foreign_files_and_bad_targets(dataset, capsys):
    root, out = dataset
    mine = root / "mine"
    mine.mkdir()
    (mine / "features.py").write_text("# my own features\n")
    note = root / "note.txt"
    note.write_text("x")
    capsys.readouterr()
    for to in (mine, note, note / "repo"):
        assert feast_main([str(out), "--to", str(to)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(to) in err[0], err
    assert (mine / "features.py").read_text() == "# my own features\n"
    assert feast_main([str(out), "--to", str(mine), "--overwrite"]) == 0
    # its own files are replaced without --overwrite
    assert feast_main([str(out), "--to", str(mine)]) == 0


def test_the_next_hint_is_shell_quoted(dataset, capsys):
    # issue 25 (minor): a repository path with spaces or quotes must paste
    # into a shell as one word.
    root, out = dataset
    repo = root / "my repo's \"feast\""
    capsys.readouterr()
    assert feast_main([str(out), "--to", str(repo)]) == 0
    (hint,) = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith("next: ")]
    import shlex
    words = shlex.split(hint[len("next: "):])
    assert words[:2] == ["cd", str(repo)] and words[2] == "&&"
