"""The embedding job: check everything that can fail early, build the Beam
graph, run it, report.

  list -> read+decode+resize -> RunInference -> write Parquet -> summarize

Checks before any image is read: the options parse and are in range, the
model loads (and gives the weights digest the workers must match), the
inputs list at least one file, the output is a folder no other run is
writing and not one made with another model or preprocessing.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import uuid
from typing import Optional

import apache_beam as beam
import psutil
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions, TestOptions)

import pipeline
from pipeline import calibration
from pipeline import runner as beam_runner
from pipeline.options import EmbedOptions
from schemas import METRICS_NAMESPACE, DatasetMetadata, ModelInfo
from transforms import listing
from transforms.composite import EmbedImages, WriteEmbeddingDataset
from transforms.dataset import EMBEDDINGS, ERRORS, Dataset, DatasetError
from transforms.decode import DecodeLimits, PreprocessSettings
from transforms.inference import configure_threads, default_max_batch_size
from transforms.model import catalog
from transforms.model.labels import LABEL_SET
from transforms.model.loading import (ModelSpec, cached_info, load_model,
                                      resolve_model)
from transforms.report import (PROGRESS_PREFIX, CountProgress,
                               ProgressMonitor, failure_rate)
from transforms.uris import is_local, redact

LOG = logging.getLogger("mobilenet_embed")
LOCAL_RUNNERS = beam_runner.LOCAL_RUNNERS


class JobError(Exception):
    """A problem the user can fix; reported as one message, exit code 2."""


@dataclasses.dataclass
class Plan:
    """Everything decided before the graph is built."""
    options: PipelineOptions
    embed: EmbedOptions
    spec: ModelSpec
    dry_run: bool
    settings: PreprocessSettings
    limits: DecodeLimits
    dataset: Dataset
    metadata: DatasetMetadata
    patterns: list[str]
    existing_parts: list[tuple[str, str]]
    run_id: str
    started_at: float
    progress_dir: Optional[str]


# --- the steps of planning a run ----------------------------------------------------

def parse_options(argv: list[str]) -> tuple[PipelineOptions, EmbedOptions]:
    unknown = beam_runner.unknown_beam_flags(argv, JobError)
    if unknown:
        raise JobError(f"unknown option(s): {' '.join(unknown)} (see "
                       "`mobilenet-embed run --help`; Beam's own options pass "
                       "through)")
    options = PipelineOptions(argv)
    embed = options.view_as(EmbedOptions)
    if not embed.output:
        raise JobError("--output is required (a local folder or gs:// URI)")
    if embed.min_batch_size < 1 or (embed.max_batch_size is not None and
                                    embed.max_batch_size < embed.min_batch_size):
        raise JobError(f"--min_batch_size {embed.min_batch_size} and "
                       f"--max_batch_size {embed.max_batch_size}: need "
                       "1 <= min <= max")
    return options, embed


def _choose_runner(options: PipelineOptions) -> str:
    return beam_runner.choose_runner(options)


def model_spec(embed: EmbedOptions) -> ModelSpec:
    source = embed.model_source
    if source is None:
        source = "saved_model" if embed.model_handle else "tfhub"
    if source == "random" and embed.model_handle:
        raise JobError("--model_source random takes no --model_handle")
    if embed.feature_vector_handle and not embed.model_handle:
        raise JobError("--feature_vector_handle needs --model_handle")
    if embed.precision == "int8" and embed.runtime == "tensorflow":
        raise JobError("--precision int8 runs on ONNX Runtime or OpenVINO; "
                       "--runtime tensorflow is fp32 only")
    if embed.calibration_input and embed.precision == "fp32":
        raise JobError("--calibration_input calibrates int8: use it with "
                       "--precision int8 or auto")
    try:
        # The batch the engines are timed at: the job's largest.
        batch = embed.max_batch_size or max(embed.min_batch_size, default_max_batch_size(
            catalog.get_variant(embed.model).input_size))
        return ModelSpec(variant=embed.model, source=source,
                         handle=embed.model_handle,
                         feature_handle=embed.feature_vector_handle,
                         hub_version=embed.hub_version, seed=embed.seed,
                         runtime=embed.runtime,
                         batch_size=batch)
    except (ValueError, catalog.UnknownModelError) as e:
        raise JobError(str(e)) from None


def _extensions(value: Optional[str]) -> Optional[tuple[str, ...]]:
    if value is None:
        return listing.DEFAULT_EXTENSIONS
    if value.strip() == "*":
        return None
    extensions = tuple(e.strip().lstrip(".").lower() for e in value.split(",")
                       if e.strip().lstrip("."))
    if not extensions:
        raise JobError(f"--extensions {value!r} names no extension (use e.g. "
                       "'jpg,png', or '*' for every file)")
    return extensions


def _inputs(embed: EmbedOptions, dry_run: bool) -> list[str]:
    """The glob patterns; the manifest made absolute. Checked to list
    something, except in a dry run (nothing is read then)."""
    patterns = [listing.normalize_pattern(p) for arg in embed.input
                for p in arg.split(",") if p.strip()]
    _extensions(embed.extensions)  # a bad value fails before anything runs
    if embed.manifest and is_local(embed.manifest):
        embed.manifest = os.path.abspath(os.path.expanduser(embed.manifest))
    _refuse_output_inside_inputs(embed.output, patterns)
    if not dry_run:
        try:
            listing.check_inputs(patterns, embed.manifest)
        except listing.ListingError as e:
            raise JobError(str(e)) from None
    return patterns


def _refuse_output_inside_inputs(output: str, patterns: list[str]) -> None:
    """An output folder a glob reaches would be embedded by the next run."""
    dataset = Dataset(output)
    probes = [dataset.part_path(EMBEDDINGS, "run", "x"), dataset.dataset_json]
    for pattern in patterns:
        matches = _glob_regex(pattern).fullmatch
        if any(matches(probe) for probe in probes):
            raise JobError(f"--output {dataset.shown} is inside --input "
                           f"{redact(pattern)}: the job would list its own "
                           "files; choose an output folder outside the inputs")


def _glob_regex(pattern: str) -> "re.Pattern":
    """A glob as Beam matches it: '**' crosses folders, '*' and '?' do not."""
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcard = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcard.get(p, re.escape(p)) for p in parts))


def _preprocessing(embed: EmbedOptions, variant: catalog.Variant
                   ) -> tuple[PreprocessSettings, DecodeLimits]:
    try:
        settings = PreprocessSettings(
            height=variant.input_size, width=variant.input_size,
            resize_mode=embed.resize_mode, crop_fraction=embed.crop_fraction,
            reduced_jpeg_decode=not embed.no_reduced_jpeg_decode,
            jpeg_decoder=embed.jpeg_decoder)
        limits = DecodeLimits(max_bytes=embed.max_bytes,
                              max_pixels=embed.max_pixels)
    except ValueError as e:
        raise JobError(str(e)) from None
    if not embed.max_batch_size:
        embed.max_batch_size = max(embed.min_batch_size,
                                   default_max_batch_size(variant.input_size))
    return settings, limits


# Resident memory of one worker process with TensorFlow and the model loaded
# (measured: about 1.0-1.4 GB; see benchmarks/).
_WORKER_MEMORY = 1.5 * 2**30


def _process_layout(options: PipelineOptions, embed: EmbedOptions,
                    argv: list[str], runner: str) -> bool:
    """Local runs default to one worker process per core, one TF thread each.

    Measured on 2 cores (benchmarks/): the real 1.0_224 model embeds about
    1.6x the images/s end to end this way than in one process, where
    decoding and inference take turns on one thread. Explicit --direct_*
    options win; in any multi-process layout the cores are split between the
    processes' TensorFlow threads unless --tf_*_threads say otherwise.
    Returns whether the launcher process runs the model itself.
    """
    if runner not in LOCAL_RUNNERS:
        return False
    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    beam_runner.local_workers(options, argv, _WORKER_MEMORY, runner)
    if direct.direct_running_mode in (None, "in_memory"):
        # The launcher is the worker: TF must get its threads before it starts.
        configure_threads(embed.tf_intra_op_threads, embed.tf_inter_op_threads)
        return True
    if direct.direct_running_mode != "multi_processing":
        return False
    # N processes share the cores: TensorFlow's default of a thread per core
    # in each would oversubscribe them (measured 0.74 x the raw model rate
    # with 2 processes x 2 threads on 2 cores, against 0.87 with 1 each).
    workers = max(1, direct.direct_num_workers or cores)
    if not embed.tf_intra_op_threads:
        embed.tf_intra_op_threads = max(1, cores // workers)
    if not embed.tf_inter_op_threads:
        embed.tf_inter_op_threads = 1
    LOG.info("local run: %d worker processes, %d TensorFlow thread(s) each "
             "(--direct_running_mode in_memory for one process)", workers,
             embed.tf_intra_op_threads)
    return False


def _model_info(spec: ModelSpec, in_process: bool, dry_run: bool,
                embed: Optional[EmbedOptions] = None,
                preprocessing: Optional[tuple[PreprocessSettings, DecodeLimits]] = None,
                patterns: Optional[list[str]] = None
                ) -> tuple[ModelInfo, ModelSpec]:
    """The model's metadata before any image is read, and the spec the
    workers load.

    The launcher loads the model, which checks it, records its weights
    digest and the runtime that runs it, and fills the on-disk caches
    (frozen graph, ONNX conversion) so that local workers only read them.
    Local workers are then told the runtime the launcher settled on (after
    its parity check), so every row is made the way the metadata says.
    With --runtime tensorflow, a launcher that does not run the model itself
    reads a cached model's metadata instead: loading TensorFlow there costs
    seconds of start-up for nothing but the digest.
    With --precision int8 or auto, `calibration.decide` settles fp32 or
    int8 first (sample, quantization, guard); an int8 model that passed is
    the one recorded and run.
    Raises ModelUnavailableError when the model cannot be had.
    """
    precision = embed.precision if embed else "fp32"
    if dry_run:  # graph only: nothing is read, loaded or written
        variant = catalog.get_variant(spec.variant)
        return ModelInfo(spec.variant, spec.source, spec.describe(),
                         "unknown (dry run)", "unknown (dry run)",
                         variant.feature_dim, "unknown (dry run)",
                         precision=precision if precision != "auto" else "fp32"
                         ), spec
    fp32_note = ""
    if precision != "fp32":
        settings, limits = preprocessing
        try:
            decision = calibration.decide(
                spec, precision, settings, limits, patterns or [], embed.manifest,
                _extensions(embed.extensions), embed.calibration_input)
        except calibration.CalibrationInputError as e:
            raise JobError(str(e)) from None
        if decision.model is not None:
            model = decision.model
            LOG.info("model ready: %s; runs on %s; weights sha256 %s",
                     model.heads, model.runtime, model.weights_sha256[:16])
            workers = (decision.spec if in_process else
                       dataclasses.replace(decision.spec, engine=model.engine))
            return model.info(), workers
        fp32_note = json.dumps({"fp32_because": decision.reason})
    info, workers = _fp32_model_info(spec, in_process)
    return dataclasses.replace(info, quantization=fp32_note), workers


def _fp32_model_info(spec: ModelSpec, in_process: bool
                     ) -> tuple[ModelInfo, ModelSpec]:
    paths = None
    if not in_process and spec.runtime == "tensorflow":
        paths = resolve_model(spec)  # once: a gs:// model is listed once here
        info = cached_info(spec, paths)
        if info:
            LOG.info("model %s found in the graph cache (weights sha256 %s); "
                     "the workers load it", spec.describe(),
                     info.weights_sha256[:16])
            return info, spec
    LOG.info("loading %s (%s)", spec.variant, spec.describe())
    model = load_model(spec, paths)
    LOG.info("model ready: %s; runs on %s; weights sha256 %s", model.heads,
             model.runtime, model.weights_sha256[:16])
    workers = spec
    if not in_process and spec.runtime == "auto":
        # Local workers share this machine: they run the engine measured
        # here (and still check its parity) instead of timing again.
        workers = dataclasses.replace(spec, runtime=model.engine or "tensorflow")
    return model.info(), workers


def _prepare_output(dataset: Dataset, metadata: DatasetMetadata,
                    overwrite: bool, run_id: str) -> list[tuple[str, str]]:
    """Take the output's lock, check or record its identity, and clean what
    dead runs left; returns the part files already there. The lock is held
    until `run` releases it."""
    dataset.acquire_lock(run_id)
    try:
        mode = dataset.prepare(metadata, overwrite)
        stale = dataset.remove_stale_staging()
        if stale:
            LOG.info("removed %d unfinished file(s) of earlier runs from "
                     "_staging/", stale)
        dataset.set_aside_damaged_parts()
        existing = [(kind, path) for kind in (EMBEDDINGS, ERRORS)
                    for path in dataset.parts(kind)]
    except BaseException:
        dataset.release_lock(run_id)
        raise
    embedded = sum(1 for kind, _ in existing if kind == EMBEDDINGS)
    if mode == "resume" and embedded:
        LOG.info("resuming: %d files already in %s/embeddings; images in "
                 "them are skipped", embedded, dataset.shown)
    return existing


def _progress_dir(embed: EmbedOptions, runner: str) -> Optional[str]:
    if not (embed.progress == "on" or (embed.progress == "auto"
                                       and runner in LOCAL_RUNNERS)):
        return None
    _remove_dead_progress_dirs()
    return tempfile.mkdtemp(prefix=f"{PROGRESS_PREFIX}{os.getpid()}_")


def _remove_dead_progress_dirs() -> None:
    """Progress folders of launchers that were killed before cleaning up."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        if not name.startswith(PROGRESS_PREFIX):
            continue
        pid = name[len(PROGRESS_PREFIX):].split("_", 1)[0]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def plan(argv: list[str]) -> Plan:
    started_at = time.time()
    options, embed = parse_options(argv)
    dry_run = bool(options.view_as(TestOptions).dry_run)
    runner = _choose_runner(options)
    spec = model_spec(embed)
    variant = catalog.get_variant(spec.variant)
    patterns = _inputs(embed, dry_run)
    settings, limits = _preprocessing(embed, variant)
    in_process = _process_layout(options, embed, argv, runner)
    info, worker_spec = _model_info(spec, in_process, dry_run, embed,
                                    (settings, limits), patterns)
    if runner not in LOCAL_RUNNERS and not dry_run:
        # Remote workers run their own parity check and time the engines.
        worker_spec = dataclasses.replace(worker_spec, runtime=spec.runtime,
                                          engine="auto")
        info = dataclasses.replace(
            info, runtime=f"{info.runtime}; checked by the launcher, and again "
                          "by each worker")
    metadata = DatasetMetadata(
        model=info,
        preprocessing=settings.to_metadata(), labels=LABEL_SET,
        project_version=pipeline.__version__)
    dataset = Dataset(embed.output)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + \
        "-" + uuid.uuid4().hex[:6]
    existing = [] if dry_run else _prepare_output(dataset, metadata,
                                                  embed.overwrite, run_id)
    return Plan(options, embed, worker_spec, dry_run, settings, limits, dataset,
                metadata, patterns, existing, run_id, started_at,
                _progress_dir(embed, runner))


# --- the graph ----------------------------------------------------------------------

def build(p: beam.Pipeline, plan_: Plan) -> None:
    """The Beam graph of one run."""
    embed = plan_.embed
    listed = p | "List" >> listing.ListImages(
        plan_.patterns, embed.manifest, plan_.existing_parts,
        _extensions(embed.extensions))
    embedded = listed["refs"] | "EmbedImages" >> EmbedImages(
        plan_.spec, plan_.settings, plan_.limits,
        min_batch_size=embed.min_batch_size,
        max_batch_size=embed.max_batch_size, large_model=embed.large_model,
        model_copies=embed.model_copies,
        expected_weights_sha256=(None if plan_.dry_run
                                 else plan_.metadata.model.weights_sha256),
        intra_op_threads=embed.tf_intra_op_threads,
        inter_op_threads=embed.tf_inter_op_threads)
    rows = embedded[EmbedImages.EMBEDDED]
    failures = ((listed[listing.ListImages.FAILED], embedded[EmbedImages.FAILED])
                | "AllFailures" >> beam.Flatten())
    if plan_.progress_dir:
        rows = rows | "CountEmbedded" >> beam.ParDo(
            CountProgress(plan_.progress_dir, EMBEDDINGS))
        failures = failures | "CountFailed" >> beam.ParDo(
            CountProgress(plan_.progress_dir, ERRORS))
    header = {
        "project_version": pipeline.__version__,
        "output": plan_.dataset.shown,
        "inputs": [redact(p) for p in plan_.patterns],
        "manifest": redact(embed.manifest) if embed.manifest else None,
        "runner": plan_.options.view_as(StandardOptions).runner,
        "model": dataclasses.asdict(plan_.metadata.model),
        "preprocessing": plan_.settings.to_metadata(),
    }
    _ = ({EmbedImages.EMBEDDED: rows, EmbedImages.FAILED: failures,
          WriteEmbeddingDataset.STATS: listed[listing.ListImages.STATS],
          WriteEmbeddingDataset.REDUNDANT: listed[listing.ListImages.REDUNDANT]}
         | "WriteDataset" >> WriteEmbeddingDataset(
             plan_.dataset, plan_.metadata, run_id=plan_.run_id,
             rows_per_file=embed.rows_per_file, started_at=plan_.started_at,
             header=header))


# --- running and reporting --------------------------------------------------------

def _print_metrics(result) -> None:
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners expose no metrics
        return
    totals: dict[str, int] = {}
    for counter in counters:
        if counter.key.metric.namespace == METRICS_NAMESPACE:
            name = counter.key.metric.name
            totals[name] = totals.get(name, 0) + (counter.committed or 0)
    if totals:
        LOG.debug("Beam counters: %s", ", ".join(
            f"{k}={v}" for k, v in sorted(totals.items())))


def format_summary(summary: dict) -> str:
    counts = summary["counts"]
    lines = [
        f"output:   {summary['output']}",
        f"model:    {summary['model']['model']} ({summary['model']['model_source']}: "
        f"{summary['model']['model_handle']})",
        f"listed:   {counts[listing.ENTRIES]} entries "
        f"({counts[listing.DUPLICATES]} duplicates, "
        f"{counts[listing.SKIPPED_EXISTING]} already embedded)",
        f"embedded: {counts['embedded']}   failed: {counts['failed']}"
        + (f" ({', '.join(f'{k}: {v}' for k, v in summary['failures_by_reason'].items())})"
           if counts["failed"] else ""),
        f"time:     {summary['wall_seconds']} s, {summary['images_per_second']} images/s",
        f"dataset:  {summary['dataset_rows']} rows in embeddings/, "
        f"{summary['dataset_error_rows']} in errors/",
    ]
    if not summary["accounting"]["ok"]:
        lines.append(f"ACCOUNTING MISMATCH: {summary['accounting']['unaccounted']}"
                     " images unaccounted for")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    plan_ = plan(argv)
    try:
        return _execute(plan_)
    finally:
        if not plan_.dry_run:
            plan_.dataset.release_lock(plan_.run_id)
        if plan_.progress_dir:
            shutil.rmtree(plan_.progress_dir, ignore_errors=True)


def _execute(plan_: Plan) -> int:
    try:
        p = beam.Pipeline(options=plan_.options)
    except ValueError as e:  # Beam's option checks (project id, region, ...)
        raise JobError(" ".join(str(e).split())) from None
    build(p, plan_)
    monitor = None
    if plan_.progress_dir:
        monitor = ProgressMonitor(plan_.progress_dir)
        monitor.start()
    try:
        result = p.run()
        if plan_.dry_run:
            LOG.info("dry run: the job graph was built; nothing was submitted")
            return 0
        state = beam_runner.wait_guarded(
            result.wait_until_finish, "embedding",
            "whole files already written are kept; a re-run resumes from them")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # pylint: disable=broad-except
        LOG.debug("the job failed", exc_info=True)
        LOG.error("the job failed: %s (whole files already written are kept; "
                  "a re-run resumes from them; --verbose for the traceback)",
                  beam_runner.failure_cause(e))
        return 3
    finally:
        if monitor:
            monitor.stop()
    _print_metrics(result)
    try:
        summary = plan_.dataset.read_summary()
    except DatasetError:
        summary = None
    if summary is None or summary.get("run_id") != plan_.run_id:
        LOG.error("the job ended (%s) without writing its summary", state)
        return 3
    print(format_summary(summary), file=sys.stderr)
    if not summary["accounting"]["ok"]:
        return 3
    counts = summary["counts"]
    if counts[listing.ENTRIES] == 0:
        raise JobError(
            "nothing to embed: the inputs hold no images ("
            f"{counts[listing.NOT_IMAGES]} file(s) matched without an image "
            "extension; see --extensions)")
    rate = failure_rate(summary["counts"])
    if rate > plan_.embed.max_failure_rate:
        LOG.error("failure rate %.1f%% (of the images listed) is above "
                  "--max_failure_rate %.1f%%; see %s/errors/", 100 * rate,
                  100 * plan_.embed.max_failure_rate, plan_.dataset.shown)
        return 1
    return 0
