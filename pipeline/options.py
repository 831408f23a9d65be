"""Command-line options of the embedding job, as a Beam PipelineOptions view.

Beam's own options (--runner, --project, --region, --temp_location,
--setup_file, --direct_num_workers, --direct_running_mode, ...) pass through
untouched, as in Beam's examples.
"""
from __future__ import annotations

import argparse

from apache_beam.options.pipeline_options import PipelineOptions

from transforms.decode import JPEG_DECODERS, RESIZE_MODES
from transforms.model import catalog
from transforms.model.loading import RUNTIMES, SOURCES
from transforms.model.quantize import CALIBRATION_IMAGES, PRECISIONS


# argparse turns a ValueError/TypeError of a `type` into "invalid <name>
# value"; an ArgumentTypeError's message is shown as it is.
def _positive_fraction(value: str) -> float:
    number = _number(value, float)
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return number


def _fraction(value: str) -> float:
    number = _number(value, float)
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in [0, 1]")
    return number


def _positive_int(value: str) -> int:
    number = _number(value, int)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _count(value: str) -> int:
    number = _number(value, int)
    if number < 0:
        raise argparse.ArgumentTypeError(
            f"{value} is negative (0 means the default)")
    return number


def _number(value: str, kind):
    try:
        return kind(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None


class EmbedOptions(PipelineOptions):

    @classmethod
    def _add_argparse_args(cls, parser):
        io = parser.add_argument_group("inputs and outputs")
        io.add_argument(
            "--input", action="append", default=[],
            help="Glob of images, local or gs:// (repeatable; '**' recurses; "
                 "a folder means every image under it).")
        io.add_argument(
            "--manifest", default=None,
            help="A .txt (one URI a line), .csv or .parquet file listing the "
                 "images: column 'uri' and an optional 'id' used as image_id. "
                 "Relative entries are relative to the manifest's folder.")
        io.add_argument(
            "--output", default=None,
            help="Output folder, local or gs://: embeddings/, errors/, "
                 "run_summary.json.")
        io.add_argument(
            "--extensions", default=None,
            help="Comma-separated file extensions a glob keeps (default: "
                 "common image types); '*' keeps every file. Manifests are "
                 "never filtered.")
        io.add_argument(
            "--overwrite", action="store_true",
            help="Replace an output made with another model or preprocessing "
                 "instead of refusing to mix them.")
        io.add_argument(
            "--rows_per_file", type=_positive_int, default=4096,
            help="Rows per Parquet file; a killed run resumes from whole "
                 "files, so smaller files lose less work.")
        io.add_argument(
            "--max_failure_rate", type=_fraction, default=0.05,
            help="Exit non-zero (after writing everything) when more than "
                 "this fraction of the images attempted failed.")

        model = parser.add_argument_group("model")
        model.add_argument(
            "--model", default=catalog.DEFAULT_MODEL,
            help="Catalog name (see `mobilenet-embed models`).")
        model.add_argument(
            "--model_source", default=None, choices=SOURCES,
            help="tfhub (default), saved_model (implied by --model_handle "
                 "with a path) or random (seeded random weights, for smoke "
                 "runs and benchmarks; recorded as such in the output).")
        model.add_argument(
            "--model_handle", default=None,
            help="SavedModel folder (local or gs://) in the /3 layout, or a "
                 "folder holding classification/ and feature_vector/ (/4-/5 "
                 "layout), or a TF-Hub handle URL.")
        model.add_argument(
            "--feature_vector_handle", default=None,
            help="The feature-vector SavedModel, when --model_handle is a "
                 "/4-/5 classification model stored elsewhere.")
        model.add_argument(
            "--hub_version", type=int, default=catalog.DEFAULT_HUB_VERSION,
            choices=catalog.HUB_VERSIONS,
            help="TF-Hub module version for the tfhub source.")
        model.add_argument("--seed", type=int, default=0,
                           help="Seed of the random source.")

        pre = parser.add_argument_group("decoding and preprocessing")
        pre.add_argument(
            "--resize_mode", default="stretch", choices=RESIZE_MODES,
            help="stretch: the whole image to HxW, as the modules expect; "
                 "center_crop: a central crop of the target aspect, then resize.")
        pre.add_argument("--crop_fraction", type=_positive_fraction,
                         default=0.875,
                         help="center_crop only: share of the image kept.")
        pre.add_argument(
            "--jpeg_decoder", default="simplejpeg", choices=JPEG_DECODERS,
            help="simplejpeg: plain JPEGs through libjpeg-turbo's M/8 DCT "
                 "scaling (faster at small sizes; the others, and damaged "
                 "files, through Pillow); pillow: every JPEG through Pillow.")
        pre.add_argument(
            "--no_reduced_jpeg_decode", action="store_true",
            help="Always decode JPEGs at full size (slower; the default "
                 "decodes large JPEGs at a reduced size within tolerance).")
        pre.add_argument("--max_bytes", type=_positive_int, default=64 * 2**20,
                         help="Files larger than this fail (stage read).")
        pre.add_argument("--max_pixels", type=_positive_int, default=128_000_000,
                         help="Images declaring more pixels fail before "
                              "decoding (decompression bombs).")

        run = parser.add_argument_group("inference and throughput")
        run.add_argument("--min_batch_size", type=_positive_int, default=1)
        run.add_argument(
            "--max_batch_size", type=_positive_int, default=None,
            help="Images per model call at most. Default: the pixels of 16 "
                 "images at 224x224 (16 at 224, 31 at 160, 49 at 128, 64 at "
                 "96): bounds each worker's activation memory, and as "
                 "fast as larger batches with one TensorFlow thread per "
                 "process (benchmarks/).")
        run.add_argument(
            "--large_model", action="store_true",
            help="One model copy per machine, shared by its worker processes "
                 "(RunInference's large_model), instead of one per process.")
        run.add_argument(
            "--model_copies", type=_positive_int, default=None,
            help="With --large_model: how many copies per machine.")
        run.add_argument(
            "--runtime", default="auto", choices=RUNTIMES,
            help="What runs the model (TensorFlow always loads it). auto: "
                 "the faster here of ONNX Runtime (its CUDA provider where "
                 "onnxruntime-gpu and a GPU are there) and OpenVINO, each "
                 "checked against TensorFlow's outputs on a probe batch and "
                 "timed at the job's batch and threads (the choice cached per "
                 "machine, recorded in the metadata); TensorFlow where none "
                 "matches or the conversion fails (one warning says why), or "
                 "where a GPU is present that only TensorFlow can use. "
                 "onnxruntime, openvino or tensorflow: that one, no fallback.")
        run.add_argument(
            "--precision", default="fp32", choices=PRECISIONS,
            help="fp32, or int8: the model quantized statically (calibrated "
                 f"on the first {CALIBRATION_IMAGES} input images, or on "
                 "--calibration_input), run on ONNX Runtime or OpenVINO, "
                 "whichever is faster here, after an accuracy guard against "
                 "fp32 (below its limits: fp32, with one warning). auto: "
                 "int8 where the guard passes and the CPU has VNNI/AMX, else "
                 "fp32. Recorded; datasets of different precision are not "
                 "mixed.")
        run.add_argument(
            "--calibration_input", default=None,
            help="Glob of images to calibrate int8 on instead of the first "
                 "inputs (the guard then checks it on the first inputs).")
        run.add_argument("--tf_intra_op_threads", type=_count, default=0,
                         help="TensorFlow intra-op threads (0: TF default).")
        run.add_argument("--tf_inter_op_threads", type=_count, default=0,
                         help="TensorFlow inter-op threads (0: TF default).")
        run.add_argument(
            "--progress", default="auto", choices=("auto", "on", "off"),
            help="Progress line on stderr (auto: local runners only).")
        run.add_argument(
            "--verbose", action="store_true",
            help="Show TensorFlow's, absl's and Beam's start-up and worker "
                 "logs, and tracebacks (hidden by default).")
