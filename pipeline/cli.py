"""Command line: `mobilenet-embed` / `python -m pipeline`.

  mobilenet-embed [run] --input ... --output ... [beam options]
  mobilenet-embed models              the catalog, to choose speed vs accuracy
  mobilenet-embed schema [--model M]  the Arrow schemas of the output
  mobilenet-embed fetch-model [--model M] [--to gs://bucket/dir]
                                      download a TF-Hub module (and stage it)
  mobilenet-embed show OUTPUT [--limit N]
                                      a look at an output: summary and rows
  mobilenet-embed index OUTPUT        a similarity index, recall measured
  mobilenet-embed query OUTPUT --image P | --id ID | --manifest F [--k 10]
                                      nearest neighbours of images or rows
  mobilenet-embed dedup OUTPUT        exact and near-duplicate pairs, clusters
  mobilenet-embed gallery OUTPUT --to page.html
                                      neighbours and duplicates, in a browser
  mobilenet-embed export OUTPUT --format vertex|bigquery|lancedb|qdrant|milvus --to T
                                      the vectors into a vector store (Beam)
  mobilenet-embed feast OUTPUT --to REPO
                                      a Feast feature repository over them

Exit codes: 0 done; 1 more failures than --max_failure_rate (outputs are
written); 2 a problem with the command (bad option, unknown model, model not
available, no inputs, output made differently); 3 the job itself failed.
"""
from __future__ import annotations

import logging
import os
import sys

USAGE = __doc__.split("\n\n")[1]


def _setup_logging(verbose: bool) -> None:
    # Before TensorFlow loads (here and, through the environment, in worker
    # processes): its C++ start-up lines (CUDA probing, oneDNN notices) are
    # noise unless asked for; errors still surface as Python exceptions.
    # oneDNN (see transforms.inference.tensorflow_environment) stays on
    # unless the user chose.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    if not verbose:
        from pipeline.console import hide_native_noise
        hide_native_noise()  # before logging binds sys.stderr
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "tensorflow", "absl", "urllib3", "google",
                  "h5py", "keras", "faiss", "tf2onnx", "onnxruntime"):
        logging.getLogger(noisy).setLevel(logging.INFO if verbose
                                          else logging.ERROR)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_drop_known_noise)
    logging.getLogger("tensorflow").addFilter(_drop_known_noise)


# Harmless messages that would bury the useful ones:
# - Beam 2.77's RunInference imports its ModelManager (which needs torch) in
#   the same try as `resource`; without torch it warns at every model load
#   that memory cannot be measured.
# - TF warns once per variable when it loads a TF1 Hub module (/3), whose
#   variables are reference variables; inference does not need them as
#   Python objects.
_NOISE = ("Resource module is not available",
          "because it is a reference variable")


def _drop_known_noise(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not any(text in message for text in _NOISE)


# command -> (module under pipeline/commands, its main). Imported only when
# run, so `mobilenet-embed models` never loads Beam or TensorFlow.
COMMANDS = {"run": ("embed", "run_main"), "models": ("embed", "models_main"),
            "schema": ("embed", "schema_main"),
            "fetch-model": ("embed", "fetch_model_main"),
            "show": ("embed", "show_main"),
            **{name: ("search", f"{name}_main")
               for name in ("index", "query", "dedup", "gallery")},
            "export": ("export", "export_main"), "feast": ("export", "feast_main")}


def command_main(command: str):
    """The `main(argv) -> int` of one command."""
    import importlib
    module, name = COMMANDS[command]
    return getattr(importlib.import_module(f"pipeline.commands.{module}"), name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        if len(argv) < 2:
            print(__doc__.strip())
            if argv:
                return 0
            return 2
    command = "run"
    if argv and not argv[0].startswith("-"):
        command = argv.pop(0)
        if command not in COMMANDS:
            print(f"error: unknown command {command!r}; use one of "
                  f"{', '.join(COMMANDS)}", file=sys.stderr)
            return 2
    if command == "run" and any(a in ("-h", "--help") for a in argv):
        from pipeline.commands.embed import run_help
        return run_help(USAGE)
    _setup_logging("--verbose" in argv)
    from transforms.gcs_auth import use_anonymous_gcs_if_emulated
    use_anonymous_gcs_if_emulated()  # no credential search against an emulator
    from pipeline.job import JobError
    from transforms.dataset import DatasetError
    from transforms.model.catalog import UnknownModelError
    from transforms.model.loading import ModelUnavailableError
    try:
        return command_main(command)(argv)
    except (JobError, DatasetError, ModelUnavailableError,
            UnknownModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; whole files already written are kept and a "
              "re-run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
