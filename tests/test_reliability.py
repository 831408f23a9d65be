"""Nothing lost, under every way a user can run it: each case here was found
by trying to break the job, reproduced first, then fixed.

Every listed image ends as exactly one row (embeddings/ or errors/), no id is
in the dataset twice, and every failure the user can cause is one line and
the documented exit code (2: the command; 3: the job; 1: too many failures).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import read_embeddings, read_errors, run_job, sample_photos, summary

RANDOM_SMALL = ("--model", "mobilenet_v2_035_96", "--model_source", "random")


def _photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(sample_photos().glob("*.png"))
    out = []
    for i in range(n):
        target = folder / f"p{start + i:02d}.png"
        shutil.copy(sources[(start + i) % len(sources)], target)
        out.append(target)
    return out


def _broken(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)  # a PNG cut short
    return path


def _all_ids(out: Path) -> list[str]:
    ids = read_embeddings(out).column("image_id").to_pylist()
    errors = read_errors(out)
    return ids + (errors.column("image_id").to_pylist() if errors else [])


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err), err
    return errors[0]


# 1. A narrower re-run keeps the earlier error rows of images it did not list.
def test_narrower_rerun_keeps_error_rows_of_images_it_did_not_list(tmp_path):
    root = tmp_path / "in"
    _photos(root / "a", 3)
    _photos(root / "b", 3, start=3)
    bad_a = _broken(root / "a" / "bad_a.png")
    bad_b = _broken(root / "b" / "bad_b.png")
    out = tmp_path / "out"
    assert run_job("--input", root, "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "0.5") == 0
    assert sorted(read_errors(out).column("image_id").to_pylist()) == \
        sorted([str(bad_a), str(bad_b)])
    assert run_job("--input", root / "b", "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "0.5") == 0
    failed = read_errors(out).column("image_id").to_pylist()
    assert sorted(failed) == sorted([str(bad_a), str(bad_b)])  # each once
    ids = _all_ids(out)
    assert len(ids) == len(set(ids)) == 8


def test_an_image_embedded_later_loses_its_old_error_row(tmp_path):
    folder = tmp_path / "in"
    photos = _photos(folder, 4)
    good = photos[0].read_bytes()
    _broken(photos[0])
    out = tmp_path / "out"
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "0.5") == 0
    assert read_errors(out).num_rows == 1
    photos[0].write_bytes(good)
    # Only the repaired file is listed: its old error row must go.
    assert run_job("--input", photos[0], "--output", out, *RANDOM_SMALL) == 0
    assert read_errors(out) is None
    assert sorted(_all_ids(out)) == sorted(str(p) for p in photos)


# 2. One run at a time per output.
def _lock(out: Path, pid: int, run_id: str = "other-run") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "_lock.json").write_text(json.dumps(
        {"run_id": run_id, "host": socket.gethostname(), "pid": pid,
         "started_at": "2026-01-01T00:00:00+00:00"}))


def test_an_output_another_live_run_holds_is_refused(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 2)
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _lock(out, holder.pid)
        assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 2
        line = _one_line_error(capsys)
        assert "being written by another run" in line and "other-run" in line
        assert not (out / "embeddings").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "in"
    _photos(folder, 2)
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock(out, dead.pid)
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 0
    assert "taking over the lock" in caplog.text
    assert not (out / "_lock.json").exists()  # released at the end
    assert read_embeddings(out).num_rows == 2


def test_two_jobs_started_together_never_duplicate_rows(tmp_path):
    folder = tmp_path / "in"
    _photos(folder, 12)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "pipeline", "run", "--input", str(folder),
               "--output", str(out), *RANDOM_SMALL, "--progress", "off",
               "--direct_running_mode", "in_memory"]
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    results = []
    for job in (first, second):
        _, err = job.communicate(timeout=600)
        results.append((job.returncode, err))
    codes = sorted(code for code, _ in results)
    # Either one was refused while the other held the lock, or they ran one
    # after the other and the second found everything embedded.
    assert codes in ([0, 2], [0, 0]), results
    refused = [err for code, err in results if code == 2]
    assert all("being written by another run" in err for err in refused)
    ids = read_embeddings(out).column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 12
    assert summary(out)["dataset_rows"] == 12


# 3. What killed runs leave behind is cleaned up by the next one.
def test_staging_files_and_progress_folders_of_dead_runs_are_removed(tmp_path):
    folder = tmp_path / "in"
    _photos(folder, 2)
    out = tmp_path / "out"
    staging = out / "_staging"
    staging.mkdir(parents=True)
    leftover = staging / "embeddings-20200101T000000Z-dead01-abc.parquet.inprogress"
    leftover.write_bytes(b"PAR1 half a file")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    progress = Path(tempfile.gettempdir()) / f"mobilenet_embed_progress_{dead.pid}_x1"
    progress.mkdir(exist_ok=True)
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 0
    assert not leftover.exists() and not staging.exists()
    run_job_with_progress = run_job("--input", folder, "--output", out,
                                    *RANDOM_SMALL, "--progress", "on")
    assert run_job_with_progress == 0
    assert not progress.exists()


# 4. Failures the user causes: one line, exit 2 (or 3 for the job itself).
@pytest.mark.parametrize("option, value, named", [
    ("--max_bytes", "0", "--max_bytes"),
    ("--max_pixels", "-5", "--max_pixels"),
    ("--tf_intra_op_threads", "-1", "--tf_intra_op_threads"),
    ("--rows_per_file", "0", "--rows_per_file"),
    ("--max_failure_rate", "1.5", "--max_failure_rate"),
    ("--max_batch_size", "many", "--max_batch_size"),
])
def test_bad_option_values_are_one_line_and_exit_2(tmp_path, capsys, option,
                                                   value, named):
    folder = tmp_path / "in"
    _photos(folder, 1)
    assert run_job("--input", folder, "--output", tmp_path / "out",
                   *RANDOM_SMALL, option, value) == 2
    line = _one_line_error(capsys)
    assert named in line and value in line
    assert "usage:" not in capsys.readouterr().err


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 1)
    target = tmp_path / "out.parquet"
    target.write_text("not a folder")
    assert run_job("--input", folder, "--output", target, *RANDOM_SMALL) == 2
    assert "is a file" in _one_line_error(capsys)
    assert target.read_text() == "not a folder"


def test_output_that_cannot_be_written_is_refused(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert run_job("--input", folder, "--output", blocker / "out",
                   *RANDOM_SMALL) == 2
    assert "cannot write to" in _one_line_error(capsys)


def test_malformed_dataset_json_is_named(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 2)
    out = tmp_path / "out"
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 0
    (out / "_dataset.json").write_text("{ this is not json")
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 2
    line = _one_line_error(capsys)
    assert "_dataset.json" in line and "delete it" in line


def test_a_truncated_part_is_set_aside_and_its_images_embedded_again(tmp_path,
                                                                     caplog):
    folder = tmp_path / "in"
    _photos(folder, 6)
    out = tmp_path / "out"
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL,
                   "--rows_per_file", "2", "--max_batch_size", "2") == 0
    parts = sorted((out / "embeddings").glob("*.parquet"))
    assert len(parts) >= 2
    damaged = parts[0]
    lost = pq.read_table(damaged, columns=["image_id"]).column(0).to_pylist()
    damaged.write_bytes(damaged.read_bytes()[:100])
    caplog.clear()
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 0
    assert damaged.name in caplog.text  # named
    assert (out / "_set_aside" / "embeddings" / damaged.name).exists()
    assert summary(out)["counts"]["embedded"] == len(lost)
    ids = read_embeddings(out).column("image_id").to_pylist()
    assert sorted(ids) == sorted(str(p) for p in folder.iterdir())


# 5. Misspelled options are refused, Beam's own pass through.
def test_unknown_options_are_refused_by_name(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 1)
    assert run_job("--input", folder, "--output", tmp_path / "out",
                   *RANDOM_SMALL, "--max_batchsize", "4", "--progres", "off") == 2
    line = _one_line_error(capsys)
    assert "--max_batchsize" in line and "--progres" in line
    assert not (tmp_path / "out").exists()
    assert run_job("--input", folder, "--output", tmp_path / "out", *RANDOM_SMALL,
                   "--direct_num_workers", "1", "--experiments", "x") == 0


# 6 and 7. Credentials never in a message; local names are never "redacted".
def test_duplicate_id_message_does_not_quote_a_password(tmp_path):
    folder = tmp_path / "in"
    (photo,) = _photos(folder, 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,uri\nsame,http://alice:SECRETPW@host.invalid/a.jpg\n"
                        f"same,{photo}\n")
    out = tmp_path / "out"
    assert run_job("--manifest", manifest, "--output", out, *RANDOM_SMALL,
                   "--max_failure_rate", "1") in (0, 1)
    for path in out.rglob("*"):
        if path.is_file():
            assert b"SECRETPW" not in path.read_bytes(), path
    (row,) = read_errors(out).to_pylist()
    assert row["error_class"] == "DuplicateImageId"


def test_local_files_with_query_like_names_stay_distinct(tmp_path):
    folder = tmp_path / "in"
    sources = _photos(tmp_path / "src", 2)
    folder.mkdir()
    shutil.copy(sources[0], folder / "a?sig=1.png")
    shutil.copy(sources[1], folder / "a?sig=2.png")
    out = tmp_path / "out"
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 0
    assert sorted(read_embeddings(out).column("image_id").to_pylist()) == \
        sorted([str(folder / "a?sig=1.png"), str(folder / "a?sig=2.png")])
    assert read_errors(out) is None


# 9. No images is a problem with the command.
def test_inputs_without_images_exit_2(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    assert run_job("--input", folder, "--output", tmp_path / "out",
                   *RANDOM_SMALL) == 2
    assert "no images" in _one_line_error(capsys)
    _photos(folder, 1)
    assert run_job("--input", folder, "--output", tmp_path / "out2",
                   *RANDOM_SMALL, "--extensions", ",") == 2
    assert "--extensions" in _one_line_error(capsys)


# 10. The same re-run gives the same exit code.
def test_identical_rerun_keeps_the_exit_code(tmp_path):
    folder = tmp_path / "in"
    _photos(folder, 12)
    _broken(folder / "bad.png")
    out = tmp_path / "out"
    args = ("--input", folder, "--output", out, *RANDOM_SMALL,
            "--max_failure_rate", "0.1")  # 1 of 13 = 7.7 %
    assert run_job(*args) == 0
    assert run_job(*args) == 0
    s = summary(out)
    assert s["counts"]["failed"] == 1 and s["counts"]["skipped_already_embedded"] == 12
    assert s["failure_rate"]["value"] == pytest.approx(1 / 13, abs=1e-4)
    assert "listed" in s["failure_rate"]["over"]
    assert run_job(*args[:-1], "0.05") == 1  # and the rule still bites


# 11. An output a glob would reach is refused.
def test_output_inside_the_input_is_refused(tmp_path, capsys):
    folder = tmp_path / "in"
    _photos(folder, 1)
    assert run_job("--input", folder, "--output", folder / "out", *RANDOM_SMALL,
                   "--extensions", "*") == 2
    assert "inside --input" in _one_line_error(capsys)
    # A glob that cannot reach it is fine.
    assert run_job("--input", f"{folder}/*.png", "--output", folder / "out",
                   *RANDOM_SMALL) == 0


# 12. Smaller ones.
def test_show_of_a_missing_folder_exits_2(tmp_path, capsys):
    from pipeline.cli import main
    assert main(["show", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in _one_line_error(capsys)


def test_the_dataset_rule_holds_after_everything(tmp_path):
    """Property over a sequence of runs: one row per listed image."""
    root = tmp_path / "in"
    _photos(root / "x", 4)
    _photos(root / "y", 4, start=4)
    _broken(root / "y" / "bad.png")
    out = tmp_path / "out"
    for target in (root / "x", root, root / "y", root):
        assert run_job("--input", target, "--output", out, *RANDOM_SMALL,
                       "--max_failure_rate", "0.5") == 0
        ids = _all_ids(out)
        assert len(ids) == len(set(ids))
    assert len(_all_ids(out)) == 9


def test_a_job_that_fails_while_writing_is_one_line_and_exit_3(tmp_path, capsys,
                                                                 caplog):
    """The stand-in for a full or vanished disk: the folder parts go into
    cannot be created once the run is under way."""
    folder = tmp_path / "in"
    _photos(folder, 2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "embeddings").write_text("a file where the parts' folder goes")
    assert run_job("--input", folder, "--output", out, *RANDOM_SMALL) == 3
    failed = [r for r in caplog.records if "the job failed" in r.getMessage()]
    assert len(failed) == 1 and "\n" not in failed[0].getMessage()
    assert "Traceback" not in capsys.readouterr().err
    assert not (out / "_lock.json").exists()  # released even so
