"""`mobilenet-embed show OUTPUT`: what a run produced, readable in a terminal."""
from __future__ import annotations

import argparse
import json

import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

from schemas import read_metadata
from transforms.write import EMBEDDINGS, ERRORS, OutputLayout, read_json


def _read(path: str, columns: list[str]):
    with FileSystems.open(path) as f:
        return pq.read_table(f, columns=columns)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenet-embed show")
    parser.add_argument("output")
    parser.add_argument("--limit", type=int, default=5)
    args = parser.parse_args(argv)
    layout = OutputLayout(args.output)
    summary = read_json(layout.summary_json)
    if summary:
        print(f"last run {summary['run_id']}: {json.dumps(summary['counts'])}")
    parts = layout.parts(EMBEDDINGS)
    print(f"{len(parts)} Parquet file(s) in {layout.join(EMBEDDINGS)}")
    if parts:
        with FileSystems.open(parts[0]) as f:
            schema = pq.read_schema(f)
        meta = read_metadata(schema)
        print(f"model {meta.get('model')} ({meta.get('model_source')}: "
              f"{meta.get('model_handle')}), weights sha256 "
              f"{meta.get('weights_sha256', '')[:16]}..., features "
              f"{meta.get('feature_dim')}")
        shown = 0
        for path in parts:
            table = _read(path, ["image_id", "top5_labels", "top5_probabilities",
                                 "feature_vector"])
            for row in table.slice(0, args.limit - shown).to_pylist():
                top = ", ".join(f"{label} {p:.2f}" for label, p in zip(
                    row["top5_labels"][:3], row["top5_probabilities"][:3]))
                head = " ".join(f"{v:.3f}" for v in row["feature_vector"][:4])
                print(f"  {row['image_id']}\n    top-3: {top}\n    "
                      f"feature_vector[:4]: {head} ...")
                shown += 1
            if shown >= args.limit:
                break
    errors = layout.parts(ERRORS)
    for path in errors:
        table = _read(path, ["uri", "stage", "error_class", "message"])
        for row in table.slice(0, args.limit).to_pylist():
            print(f"  failed [{row['stage']}/{row['error_class']}] {row['uri']}: "
                  f"{row['message']}")
    return 0
