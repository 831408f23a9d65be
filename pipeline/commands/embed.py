"""The embedding commands: `run` (the job), `models`, `schema`,
`fetch-model` and `show`. Each `*_main(argv) -> int`."""
from __future__ import annotations

import argparse


def run_main(argv: list[str]) -> int:
    """mobilenet-embed [run] --input ... --output ...: the embedding job."""
    from pipeline import job
    from pipeline.runner import dry_run_flag
    return job.run(dry_run_flag(argv))


def run_help(usage: str) -> int:
    """`run --help`: the job's own options (Beam's pass through)."""
    from pipeline.options import EmbedOptions
    parser = argparse.ArgumentParser(prog="mobilenet-embed run", description=usage)
    # Beam's PipelineOptions seam: the class declares its options there.
    EmbedOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    parser.epilog = ("Beam options (--runner, --project, --region, "
                     "--temp_location, --setup_file, --direct_num_workers, "
                     "--direct_running_mode, ...) pass through to Beam.")
    parser.print_help()
    return 0


def models_main(argv: list[str]) -> int:
    """mobilenet-embed models: the catalog, to choose speed vs accuracy."""
    from transforms.model import catalog
    argparse.ArgumentParser(prog="mobilenet-embed models").parse_args(argv)
    print(catalog.format_table())
    return 0


def schema_main(argv: list[str]) -> int:
    """mobilenet-embed schema [--model M]: the Arrow schemas of the output."""
    from transforms.model import catalog
    from schemas import ERRORS_SCHEMA, embeddings_schema
    parser = argparse.ArgumentParser(prog="mobilenet-embed schema")
    parser.add_argument("--model", default=catalog.DEFAULT_MODEL)
    args = parser.parse_args(argv)
    variant = catalog.get_variant(args.model)
    print(f"embeddings/ ({variant.name}):\n{embeddings_schema(variant.feature_dim)}")
    print(f"\nerrors/:\n{ERRORS_SCHEMA}")
    return 0


def fetch_model_main(argv: list[str]) -> int:
    """mobilenet-embed fetch-model: download a TF-Hub module (and stage it)."""
    from pipeline import staging
    return staging.main(argv)


def show_main(argv: list[str]) -> int:
    """mobilenet-embed show OUTPUT: a look at an output."""
    from pipeline import show
    return show.main(argv)
