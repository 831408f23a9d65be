"""Dataflow-ready: the job translates for DataflowRunner, and the source
distribution the workers install holds everything they need.

Nothing here reaches Google Cloud: the job is built with --dry_run --no_auth
(the runner translates it, stages nothing, submits nothing), and the network
guard checks that no connection or name lookup left the machine.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gcs_emulator import NetworkGuard, forget_beam_credentials
from jobs import run_job
import pipeline
from paths import ROOT
from pipeline.runner import dry_run_flag as _dry_run_flag

DOC = ROOT / "README.md"
PACKAGES = ("pipeline", "transforms", "schemas")
DATA_FILES = ("transforms/model/data/imagenet_labels_1001.txt",)
BRIEF_COMMAND = (
    "--runner DataflowRunner --dry_run --no_auth --project my-project "
    "--region us-central1 --temp_location gs://bucket/tmp --setup_file ./setup.py "
    "--input gs://bucket/images/*.jpg --output gs://bucket/out "
    "--model_handle gs://bucket/models/mobilenet_v2_100_224")


def _documented_commands() -> list[list[str]]:
    """The Dataflow commands of the README, in order, variables filled in
    (a later block may use the variables an earlier one set)."""
    text = DOC.read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    commands, variables = [], {}
    for block in [b for b in blocks if "--runner DataflowRunner" in b]:
        variables.update(re.findall(r"^(\w+)=(\S+)", block, re.M))
        command = block.split("python -m pipeline run", 1)[1].replace("\\\n", " ")
        for name, value in variables.items():
            command = command.replace(f"${name}", value)
        assert "$" not in command, command
        commands.append(shlex.split(command))
    return commands


class _Captured:
    runner = None


@pytest.fixture()
def dataflow_dry_run(monkeypatch):
    """Runs the CLI in-process from the repository root and returns the
    DataflowRunner that translated the job; checks that nothing was loaded,
    listed or fetched and that the run stayed on this machine."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    import pipeline.job as job
    from transforms import listing

    monkeypatch.chdir(ROOT)  # --setup_file ./setup.py
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    touched = []
    monkeypatch.setattr(job, "load_model", lambda *a: touched.append(("load", a)))
    monkeypatch.setattr(listing, "check_inputs",
                        lambda *a: touched.append(("list", a)))
    captured = _Captured()
    real_run = DataflowRunner.run_pipeline

    def spy(self, pipeline, options, pipeline_proto=None):
        captured.runner = self
        return real_run(self, pipeline, options, pipeline_proto)
    monkeypatch.setattr(DataflowRunner, "run_pipeline", spy)
    staging_dirs = []

    def run(args: list[str]) -> int:
        forget_beam_credentials()  # any gs:// access would search for them
        guard = NetworkGuard()
        with guard.watch():
            code = run_job(*args)
        assert guard.outside == [] and guard.credential_searches == []
        assert touched == []
        if captured.runner is not None:
            staging_dirs.extend(_artifacts(captured.runner).values())
        return code

    run.captured = captured
    yield run
    # Beam leaves the files it would have staged in a temp folder: ours to remove.
    for path in {Path(p).parent for p in staging_dirs}:
        if str(path).startswith(tempfile.gettempdir()) and path.name.startswith("tmp"):
            shutil.rmtree(path, ignore_errors=True)


def _artifacts(runner) -> dict[str, str]:
    """staged name -> local file, of the job's (single) environment."""
    from apache_beam.portability.api import beam_runner_api_pb2 as pb
    (env,) = runner.proto_pipeline.components.environments.values()
    staged = {}
    for dep in env.dependencies:
        path = pb.ArtifactFilePayload.FromString(dep.type_payload).path
        name = pb.ArtifactStagingToRolePayload.FromString(dep.role_payload).staged_name
        staged[name] = path
    return staged


def _check_translated_job(runner) -> None:
    from apache_beam.portability import common_urns
    proto = runner.proto_pipeline
    names = {t.unique_name for t in proto.components.transforms.values()}
    for stage in ("List", "EmbedImages/ReadDecodeResize", "EmbedImages/Embed",
                  "EmbedImages/Embed/RunInference", "WriteDataset/WriteEmbeddings",
                  "WriteDataset/WriteErrors", "WriteDataset/Summarize"):
        assert stage in names, sorted(names)
    (env,) = proto.components.environments.values()
    assert env.urn == common_urns.environments.DOCKER.urn
    artifacts = _artifacts(runner)
    # --setup_file: the project as a source distribution for the workers.
    with tarfile.open(artifacts["workflow.tar.gz"]) as sdist:
        members = {m.split("/", 1)[1] for m in sdist.getnames() if "/" in m}
    assert "pipeline/job.py" in members and "transforms/inference.py" in members
    assert set(DATA_FILES) <= members
    assert runner.job.options.view_as(
        __import__("apache_beam").options.pipeline_options.SetupOptions
    ).setup_file == "./setup.py"


def test_dataflow_dry_run_translates_the_job(dataflow_dry_run):
    assert dataflow_dry_run(BRIEF_COMMAND.split()) == 0
    runner = dataflow_dry_run.captured.runner
    assert runner is not None, "DataflowRunner was not used"
    _check_translated_job(runner)
    from apache_beam.options.pipeline_options import GoogleCloudOptions
    cloud = runner.job.options.view_as(GoogleCloudOptions)
    assert (cloud.project, cloud.region) == ("my-project", "us-central1")
    assert cloud.temp_location.startswith("gs://bucket/tmp")


@pytest.mark.parametrize("which", [0, 1], ids=["cpu", "gpu"])
def test_the_documented_dataflow_command_translates(dataflow_dry_run, which):
    """the README's commands, exactly, plus --dry_run --no_auth."""
    from apache_beam.options.pipeline_options import (DebugOptions,
                                                      WorkerOptions)
    commands = _documented_commands()
    assert len(commands) == 2
    args = commands[which]
    assert "--setup_file" in args and "DataflowRunner" in args
    assert dataflow_dry_run([*args, "--dry_run", "--no_auth"]) == 0
    runner = dataflow_dry_run.captured.runner
    _check_translated_job(runner)
    options = runner.job.options
    documented = dict(zip(args[::2], args[1::2]))
    assert options.view_as(WorkerOptions).machine_type == documented["--machine_type"]
    if "--max_num_workers" in documented:
        assert options.view_as(WorkerOptions).max_num_workers == int(
            documented["--max_num_workers"])
    assert "use_runner_v2" in options.view_as(DebugOptions).experiments


def test_invalid_dataflow_options_are_a_clear_error(dataflow_dry_run, capsys):
    # Beam wants a real project id: "p" is refused before anything runs.
    args = BRIEF_COMMAND.replace("--project my-project", "--project p").split()
    assert dataflow_dry_run(args) == 2
    err = capsys.readouterr().err
    assert "error: Pipeline has validations errors: Invalid Project ID (p)" in err
    assert "Traceback" not in err
    assert dataflow_dry_run.captured.runner is None


@pytest.mark.parametrize("args, expected", [
    (["--dry_run", "--x", "1"], ["--dry_run=True", "--x", "1"]),
    (["--x", "1", "--dry_run"], ["--x", "1", "--dry_run=True"]),
    (["--dry_run", "True"], ["--dry_run=True"]),
    (["--dry_run=true"], ["--dry_run=True"]),
    (["--dry_run", "False", "--x"], ["--x"]),  # Beam would read "False" as true
    (["--dry_run=0"], []),
    (["--x", "--y"], ["--x", "--y"]),
])
def test_dry_run_flag_forms(args, expected):
    assert _dry_run_flag(args) == expected


# --- the source distribution ------------------------------------------------------

@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """`python setup.py sdist`, as Beam's stager runs it for --setup_file;
    egg-info kept out of the working tree."""
    out = tmp_path_factory.mktemp("sdist")
    r = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base",
                        str(out), "sdist", "--dist-dir", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (archive,) = out.glob("*.tar.gz")
    return archive


def _sdist_members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read()
                for m in tar.getmembers() if m.isfile()}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_sdist_holds_every_module_and_data_file_workers_need(sdist):
    members = _sdist_members(sdist)
    modules = {p.relative_to(ROOT).as_posix() for package in PACKAGES
               for p in (ROOT / package).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert "transforms/model/loading.py" in modules
    missing = sorted(modules - set(members))
    assert not missing, f"modules the workers would lack: {missing}"
    for name in (*DATA_FILES, "setup.py", "README.md", "constraints.txt",
                 "MANIFEST.in", "PKG-INFO"):
        assert name in members, name
    for name in (*DATA_FILES, "setup.py"):
        assert members[name] == (ROOT / name).read_bytes(), name
    labels = members["transforms/model/data/imagenet_labels_1001.txt"].decode().splitlines()
    assert len(labels) == 1001 and labels[0] == "background"


@pytest.fixture(scope="module")
def pip_resolution(sdist, tmp_path_factory) -> dict:
    """pip's own resolver, without an index: the sdist (with its test and
    samples extras) and constraints.txt, against what is installed. The
    requirements are the ones pip reads from the sdist's setup.py, as on a
    worker."""
    out = tmp_path_factory.mktemp("pip_report")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "install",
         "--dry-run", "--no-index", "--no-build-isolation", "--report",
         str(out / "report.json"), "-c", str(ROOT / "constraints.txt"),
         f"{sdist}[test,samples]"],
        capture_output=True, text=True, timeout=300, cwd=out)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "report.json").read_text())
    return {"stdout": r.stdout, "install": report["install"]}


def test_sdist_requirements_admit_the_pinned_versions(pip_resolution):
    (ours,) = [i for i in pip_resolution["install"]
               if i["metadata"]["name"] == "mobilenet-embed"]
    requirements = [Requirement(r) for r in ours["metadata"]["requires_dist"]]
    pins = _constraints()
    core = [r for r in requirements if r.marker is None]
    assert {canonicalize_name(r.name) for r in core} >= {
        "apache-beam", "tensorflow", "tensorflow-hub", "tf-keras", "numpy",
        "pyarrow", "pillow", "google-cloud-storage"}
    assert any(canonicalize_name(r.name) == "gcp-storage-emulator"
               for r in requirements if r.marker is not None)
    for r in requirements:
        name = canonicalize_name(r.name)
        assert name in pins, f"{r} is not pinned in constraints.txt"
        assert r.specifier.contains(pins[name], prereleases=True), (
            f"setup.py wants {r}, constraints.txt pins {pins[name]}")
    beam = next(r for r in core if canonicalize_name(r.name) == "apache-beam")
    assert "gcp" in beam.extras  # gs:// and DataflowRunner


def test_sdist_installs_and_resolves_offline_against_the_constraints(
        sdist, pip_resolution, tmp_path):
    """Everything the sdist and its extras need, transitively, is satisfied
    by the pinned set (pip would install nothing but the package); then the
    installed package works from elsewhere, as on a worker."""
    would = re.search(r"Would install (.*)", pip_resolution["stdout"])
    assert would and would.group(1).split() == [
        f"mobilenet-embed-{pipeline.__version__}"], (
        pip_resolution["stdout"])
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

    # What a worker does with --setup_file: install the sdist, then import.
    target = tmp_path / "site"
    r = subprocess.run([*pip, "install", "--no-deps", "--no-index",
                        "--no-build-isolation", "--target", str(target), str(sdist)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = ("import pipeline, pipeline.job, pipeline.staging, pipeline.show, "
             "schemas, transforms.inference, transforms.report\n"
             "from transforms.model.labels import imagenet_labels\n"
             "assert len(imagenet_labels()) == 1001\n"
             "print(pipeline.__file__)")
    env = dict(os.environ, PYTHONPATH=str(target), TF_CPP_MIN_LOG_LEVEL="3")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(target)), r.stdout
