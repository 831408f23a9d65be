"""`mobilenet-embed fetch-model`: get a TF-Hub module now, optionally copy it.

Resolves the module through tensorflow_hub (downloading into its cache,
TFHUB_CACHE_DIR honoured) and prints where it is. With --to, also copies the
SavedModel folder there (gs:// or local): Dataflow workers often have no
internet access, so stage the module once where TF-Hub is reachable and run
the job with --model_handle <that folder>.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket

from transforms.model import catalog
from transforms.model.sources import resolve_hub
from transforms.model.spec import ModelSpec

LOG = logging.getLogger(__name__)


def copy_tree(local_dir: str, target: str) -> int:
    """Copy every file under local_dir to target (a gs:// URI or a path)."""
    from apache_beam.io.filesystems import FileSystems
    count = 0
    for root, _, files in os.walk(local_dir):
        for name in files:
            source = os.path.join(root, name)
            relative = os.path.relpath(source, local_dir).replace(os.sep, "/")
            destination = FileSystems.join(target.rstrip("/"), relative)
            if "://" not in destination:
                os.makedirs(os.path.dirname(destination), exist_ok=True)
            with open(source, "rb") as src, FileSystems.create(destination) as dst:
                for block in iter(lambda: src.read(1 << 20), b""):
                    dst.write(block)
            count += 1
    return count


def main(argv: list[str]) -> int:
    from apache_beam.io.filesystems import FileSystems
    parser = argparse.ArgumentParser(prog="mobilenet-embed fetch-model",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("--model", default=catalog.DEFAULT_MODEL)
    parser.add_argument("--hub_version", type=int,
                        default=catalog.DEFAULT_HUB_VERSION,
                        choices=catalog.HUB_VERSIONS)
    parser.add_argument("--to", default=None,
                        help="Copy the module to this folder, e.g. "
                             "gs://bucket/models/mobilenet_v2_100_224")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="Network timeout in seconds (a dropped "
                             "connection fails instead of hanging).")
    args = parser.parse_args(argv)
    socket.setdefaulttimeout(args.timeout)
    spec = ModelSpec(variant=args.model, source="tfhub",
                     hub_version=args.hub_version)
    handles = spec.hub_handles()
    local = [resolve_hub(handle, spec) for handle in handles]
    for handle, path in zip(handles, local):
        print(f"{handle} -> {path}")
    if args.to:
        # /3: one module with both heads; /4-/5: classification/ and
        # feature_vector/, the layout --model_handle reads back.
        targets = [args.to] if len(handles) == 1 else [
            FileSystems.join(args.to.rstrip("/"), head)
            for head in ("classification", "feature_vector")]
        for path, target in zip(local, targets):
            count = copy_tree(path, target)
            LOG.info("copied %s (%d files) to %s", path, count, target)
        print(f"staged; run with --model {args.model} --model_handle {args.to}")
    return 0
