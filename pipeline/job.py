"""The embedding job: check everything that can fail early, build the Beam
graph, run it, report.

  list -> read+decode+resize -> RunInference -> write Parquet -> summarize

Checks before any image is read: the model loads (and gives the weights
digest the workers must match), the output is not one made with another
model or preprocessing, the inputs list at least one file.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from typing import Optional

import apache_beam as beam
from apache_beam.options.pipeline_options import (DirectOptions,
                                                  PipelineOptions,
                                                  StandardOptions)

import pipeline
from transforms.model import catalog
from transforms.model.labels import LABEL_SET, imagenet_labels
from transforms.model.loading import (LoadedModel, ModelSpec, cached_metadata,
                                    load_model, resolve_model)
from pipeline.options import EmbedOptions
from schemas import SCHEMA_VERSION
from transforms import listing
from transforms.decode import DecodeLimits, PreprocessSettings, ReadDecodeResize
from transforms.uris import redact
from transforms.inference import (Embed, MobileNetV2Handler, configure_tensorflow,
                                  default_max_batch_size)
from transforms.report import CountProgress, ProgressMonitor, Summarize
from transforms.write import (EMBEDDINGS, ERRORS, EmbeddingRows, ErrorRows,
                              OutputLayout, WriteParquetFiles, read_json,
                              write_json)

LOG = logging.getLogger("mobilenet_embed")
LOCAL_RUNNERS = ("FnApiRunner",)
# Identity of a dataset: rows made under a different value cannot be mixed.
_DATASET_IDENTITY = ("schema_version", "model", "weights_sha256", "feature_dim",
                     "preprocessing")


class JobError(Exception):
    """A problem the user can fix; reported as one message, exit code 2."""


@dataclasses.dataclass
class Plan:
    """Everything decided before the graph is built."""
    options: PipelineOptions
    embed: EmbedOptions
    spec: ModelSpec
    # The launcher's own copy: None in a --dry_run, and where only worker
    # processes run the model and its metadata came from the graph cache.
    model: Optional[LoadedModel]
    dry_run: bool
    settings: PreprocessSettings
    limits: DecodeLimits
    layout: OutputLayout
    metadata: dict
    patterns: list[str]
    existing_files: list[str]
    run_id: str
    started_at: float
    progress_dir: Optional[str]


def model_spec(embed: EmbedOptions) -> ModelSpec:
    source = embed.model_source
    if source is None:
        source = "saved_model" if embed.model_handle else "tfhub"
    if source == "random" and embed.model_handle:
        raise JobError("--model_source random takes no --model_handle")
    if embed.feature_vector_handle and not embed.model_handle:
        raise JobError("--feature_vector_handle needs --model_handle")
    try:
        return ModelSpec(variant=embed.model, source=source,
                         handle=embed.model_handle,
                         feature_handle=embed.feature_vector_handle,
                         hub_version=embed.hub_version, seed=embed.seed)
    except ValueError as e:
        raise JobError(str(e)) from None


def _extensions(value: Optional[str]):
    if value is None:
        return listing.DEFAULT_EXTENSIONS
    if value.strip() == "*":
        return None
    return tuple(e.strip().lstrip(".").lower() for e in value.split(",") if e.strip())


def _choose_runner(options: PipelineOptions) -> str:
    standard = options.view_as(StandardOptions)
    # Beam's DirectRunner tries the Prism runner first, which downloads a
    # binary at start: offline that fails or hangs. FnApiRunner is Beam's
    # own local batch runner and needs no network.
    if standard.runner in (None, "DirectRunner", "SwitchingDirectRunner"):
        if standard.runner:
            LOG.info("running %s as FnApiRunner (no Prism download)",
                     standard.runner)
        standard.runner = "FnApiRunner"
    return standard.runner


# Resident memory of one worker process with TensorFlow and the model loaded
# (measured: about 1.0-1.4 GB; see benchmarks/).
_WORKER_MEMORY = 1.5 * 2**30


def _use_every_core(options: PipelineOptions, embed: EmbedOptions,
                    argv: list[str]) -> None:
    """Local runs default to one worker process per core, one TF thread each.

    Measured on 2 cores (benchmarks/): the real 1.0_224 model embeds 101
    images/s end to end this way against 56 in one process, where decoding
    and inference take turns on one thread. Explicit --direct_* options win;
    in any multi-process layout the cores are split between the processes'
    TensorFlow threads unless --tf_*_threads say otherwise.
    """
    direct = options.view_as(DirectOptions)
    cores = os.cpu_count() or 1
    if not any(a.split("=")[0] in ("--direct_running_mode", "--direct_num_workers")
               for a in argv):
        import psutil
        workers = min(cores, max(1, int(
            psutil.virtual_memory().available // _WORKER_MEMORY)))
        if workers < 2:
            return
        direct.direct_running_mode = "multi_processing"
        direct.direct_num_workers = workers
    elif direct.direct_running_mode != "multi_processing":
        return
    # N processes share the cores: TensorFlow's default of a thread per core
    # in each would oversubscribe them (measured 0.74 x the raw model rate
    # with 2 processes x 2 threads on 2 cores, against 0.87 with 1 each).
    workers = max(1, direct.direct_num_workers or cores)
    threads = max(1, cores // workers)
    if not embed.tf_intra_op_threads:
        embed.tf_intra_op_threads = threads
    if not embed.tf_inter_op_threads:
        embed.tf_inter_op_threads = 1
    LOG.info("local run: %d worker processes, %d TensorFlow thread(s) each "
             "(--direct_running_mode in_memory for one process)", workers,
             embed.tf_intra_op_threads)


def check_dataset(layout: OutputLayout, metadata: dict, overwrite: bool) -> str:
    """Refuse to mix rows from another model or preprocessing; say what is there."""
    recorded = read_json(layout.dataset_json)
    if recorded is None:
        parts = layout.parts(EMBEDDINGS)
        if parts:
            import pyarrow.parquet as pq
            from apache_beam.io.filesystems import FileSystems

            from schemas import read_metadata
            with FileSystems.open(parts[0]) as f:
                recorded = read_metadata(pq.read_schema(f))
    if recorded is not None:
        differing = [k for k in _DATASET_IDENTITY
                     if _identity(k, recorded.get(k)) != _identity(k, metadata.get(k))]
        if differing and not overwrite:
            details = "; ".join(f"{k}: existing {recorded.get(k)!r} vs now "
                                f"{metadata.get(k)!r}" for k in differing)
            raise JobError(
                f"{layout.root} holds embeddings made differently ({details}). "
                "Use another --output, or pass --overwrite to replace them.")
        if differing:
            _remove_outputs(layout)
            recorded = None
    if recorded is None:
        write_json(layout.dataset_json, {
            **{k: metadata[k] for k in metadata},
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(
                timespec="seconds")})
        return "new"
    return "resume"


def _identity(key: str, value) -> str:
    """The part of a metadata value that decides whether rows can be mixed."""
    if key == "preprocessing" and value:
        settings = json.loads(value)
        settings.pop("pillow", None)  # recorded, but an upgrade should not block resume
        return json.dumps(settings, sort_keys=True)
    return str(value)


def _remove_outputs(layout: OutputLayout) -> None:
    from apache_beam.io.filesystems import FileSystems
    LOG.warning("--overwrite: removing the existing outputs in %s", layout.root)
    doomed = layout.parts(EMBEDDINGS) + layout.parts(ERRORS)
    for path in (layout.dataset_json, layout.summary_json):
        if FileSystems.exists(path):
            doomed.append(path)
    if doomed:
        FileSystems.delete(doomed)


def plan(argv: list[str]) -> Plan:
    started_at = time.time()
    options = PipelineOptions(argv)
    embed = options.view_as(EmbedOptions)
    if not embed.output:
        raise JobError("--output is required (a local folder or gs:// URI)")
    runner = _choose_runner(options)
    try:
        catalog.get_variant(embed.model)
    except catalog.UnknownModelError as e:
        raise JobError(str(e)) from None
    if embed.min_batch_size < 1 or (embed.max_batch_size is not None and
                                    embed.max_batch_size < embed.min_batch_size):
        raise JobError(f"--min_batch_size {embed.min_batch_size} and "
                       f"--max_batch_size {embed.max_batch_size}: need "
                       "1 <= min <= max")
    spec = model_spec(embed)
    patterns = [listing.normalize_pattern(p) for arg in embed.input
                for p in arg.split(",") if p.strip()]
    manifest = embed.manifest
    if manifest and listing.is_local(manifest):
        manifest = embed.manifest = os.path.abspath(manifest)
    dry_run = _is_dry_run(options)
    if not dry_run:
        try:
            listing.check_inputs(patterns, manifest)
        except listing.ListingError as e:
            raise JobError(str(e)) from None

    variant = catalog.get_variant(spec.variant)
    settings = PreprocessSettings(
        height=variant.input_size, width=variant.input_size,
        resize_mode=embed.resize_mode, crop_fraction=embed.crop_fraction,
        reduced_jpeg_decode=not embed.no_reduced_jpeg_decode)
    limits = DecodeLimits(max_bytes=embed.max_bytes, max_pixels=embed.max_pixels)
    if not embed.max_batch_size:
        embed.max_batch_size = max(embed.min_batch_size,
                                   default_max_batch_size(variant.input_size))
    if runner in LOCAL_RUNNERS:
        _use_every_core(options, embed, argv)
    in_process = (runner in LOCAL_RUNNERS and options.view_as(
        DirectOptions).direct_running_mode in (None, "in_memory"))
    if in_process:
        # The launcher is the worker: TF must get its threads before it starts.
        configure_tensorflow(embed.tf_intra_op_threads, embed.tf_inter_op_threads)
    layout = OutputLayout(embed.output)
    if dry_run:
        # Graph only: nothing is read, loaded or written.
        model = None
        model_metadata = {
            "model": spec.variant, "model_source": spec.source,
            "model_handle": spec.describe(), "weights_sha256": "unknown (dry run)",
            "heads": "unknown (dry run)", "feature_dim": variant.feature_dim}
    else:
        model, model_metadata = _launcher_model(spec, in_process)
    metadata = {
        "schema_version": SCHEMA_VERSION,
        "project_version": pipeline.__version__,
        **model_metadata,
        "preprocessing": json.dumps(settings.to_metadata(), sort_keys=True),
        "labels": LABEL_SET,
    }
    mode = "dry run" if dry_run else check_dataset(layout, metadata,
                                                   embed.overwrite)
    existing = layout.parts(EMBEDDINGS) if not dry_run else []
    if mode == "resume" and existing:
        LOG.info("resuming: %d files already in %s/embeddings; images in "
                 "them are skipped", len(existing), layout.root)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + \
        "-" + uuid.uuid4().hex[:6]
    progress_dir = None
    if embed.progress == "on" or (embed.progress == "auto"
                                  and runner in LOCAL_RUNNERS):
        progress_dir = tempfile.mkdtemp(prefix="mobilenet_embed_progress_")
    return Plan(options, embed, spec, model, dry_run, settings, limits, layout,
                metadata, patterns, existing, run_id, started_at, progress_dir)


def _launcher_model(spec: ModelSpec, in_process: bool
                    ) -> tuple[Optional[LoadedModel], dict]:
    """The model's metadata before any image is read, and the model itself
    where this process will run it.

    Where only worker processes run it (multi-process, Dataflow), a model
    whose frozen graph is cached on this machine is not loaded here: that
    would add seconds to start-up (measured 5-6 s of 15-18 for a local
    multi-process run) only to read the weights digest. Otherwise it is
    loaded, which checks it and warms the cache for the workers.
    Raises ModelUnavailableError either way when the model cannot be had.
    """
    paths = None
    if not in_process:
        paths = resolve_model(spec)  # once: a gs:// model is listed once here
        metadata = cached_metadata(spec, paths)
        if metadata:
            LOG.info("model %s found in the graph cache (weights sha256 %s); "
                     "the workers load it", spec.describe(),
                     metadata["weights_sha256"][:16])
            return None, metadata
    LOG.info("loading %s (%s)", spec.variant, spec.describe())
    model = load_model(spec, paths)
    LOG.info("model ready: %s; weights sha256 %s", model.heads,
             model.weights_sha256[:16])
    return model, model.metadata()


def build(p: beam.Pipeline, plan_: Plan) -> None:
    """The Beam graph of one run."""
    embed = plan_.embed
    listed = p | "List" >> listing.ListImages(
        plan_.patterns, embed.manifest, plan_.existing_files,
        _extensions(embed.extensions))
    decoded = listed["refs"] | "ReadDecodeResize" >> beam.ParDo(
        ReadDecodeResize(plan_.settings, plan_.limits)).with_outputs(
            ReadDecodeResize.FAILED, main="images")
    handler = MobileNetV2Handler(
        plan_.spec, min_batch_size=embed.min_batch_size,
        max_batch_size=embed.max_batch_size, large_model=embed.large_model,
        model_copies=embed.model_copies,
        expected_weights_sha256=(None if plan_.dry_run
                                 else plan_.metadata["weights_sha256"]),
        intra_op_threads=embed.tf_intra_op_threads,
        inter_op_threads=embed.tf_inter_op_threads)
    embedded = decoded.images | "Embed" >> Embed(handler)
    rows = embedded.embedded
    failures = ((listed[listing.ListImages.FAILED],
                 decoded[ReadDecodeResize.FAILED], embedded[Embed.FAILED])
                | "AllFailures" >> beam.Flatten())
    if plan_.progress_dir:
        rows = rows | "CountEmbedded" >> beam.ParDo(
            CountProgress(plan_.progress_dir, EMBEDDINGS))
        failures = failures | "CountFailed" >> beam.ParDo(
            CountProgress(plan_.progress_dir, ERRORS))
    write = dict(layout=plan_.layout, run_id=plan_.run_id,
                 metadata=plan_.metadata, rows_per_file=embed.rows_per_file)
    written = rows | "WriteEmbeddings" >> beam.ParDo(WriteParquetFiles(
        kind=EMBEDDINGS, rows=EmbeddingRows(
            plan_.spec.variant, int(plan_.metadata["feature_dim"]),
            imagenet_labels()),
        **write)).with_outputs(WriteParquetFiles.FAILED, main="committed")
    failures = ((failures, written[WriteParquetFiles.FAILED])
                | "WithWriteFailures" >> beam.Flatten())
    committed = (
        (written.committed,
         failures | "WriteErrors" >> beam.ParDo(WriteParquetFiles(
             kind=ERRORS, rows=ErrorRows(), **write)))
        | "AllCommitted" >> beam.Flatten())
    header = {
        "project_version": pipeline.__version__,
        "output": plan_.layout.root,
        "inputs": [redact(p) for p in plan_.patterns],
        "manifest": redact(embed.manifest) if embed.manifest else None,
        "runner": plan_.options.view_as(StandardOptions).runner,
        "model": {k: plan_.metadata[k] for k in (
            "model", "model_source", "model_handle", "weights_sha256", "heads",
            "feature_dim")},
        "preprocessing": plan_.settings.to_metadata(),
    }
    _ = ((committed, listed[listing.ListImages.STATS],
          listed[listing.ListImages.REDUNDANT])
         | "Summarize" >> Summarize(plan_.layout, plan_.run_id,
                                    plan_.started_at, header))


def _print_metrics(result) -> None:
    try:
        counters = result.metrics().query()["counters"]
    except Exception:  # some runners expose no metrics
        return
    totals: dict[str, int] = {}
    for counter in counters:
        if counter.key.metric.namespace in ("mobilenet_embed",):
            name = counter.key.metric.name
            totals[name] = totals.get(name, 0) + (counter.committed or 0)
    if totals:
        LOG.info("Beam counters: %s", ", ".join(
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
        f"dataset:  {summary['dataset_rows']} rows in embeddings/",
    ]
    if not summary["accounting"]["ok"]:
        lines.append(f"ACCOUNTING MISMATCH: {summary['accounting']['unaccounted']}"
                     " images unaccounted for")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    plan_ = plan(argv)
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
        state = result.wait_until_finish()
    finally:
        if monitor:
            monitor.stop()
            shutil.rmtree(plan_.progress_dir, ignore_errors=True)
    _print_metrics(result)
    summary = read_json(plan_.layout.summary_json)
    if summary is None or summary.get("run_id") != plan_.run_id:
        LOG.error("the job ended (%s) without writing its summary", state)
        return 3
    print(format_summary(summary), file=sys.stderr)
    attempted = summary["counts"]["embedded"] + summary["counts"]["failed"]
    rate = summary["counts"]["failed"] / attempted if attempted else 0.0
    if not summary["accounting"]["ok"]:
        return 3
    if rate > plan_.embed.max_failure_rate:
        LOG.error("failure rate %.1f%% is above --max_failure_rate %.1f%%; see "
                  "%s/errors/", 100 * rate, 100 * plan_.embed.max_failure_rate,
                  plan_.layout.root)
        return 1
    return 0


def _is_dry_run(options: PipelineOptions) -> bool:
    from apache_beam.options.pipeline_options import TestOptions
    return bool(options.view_as(TestOptions).dry_run)
