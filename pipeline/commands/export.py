"""The export commands: `mobilenet-embed export` (a Beam pipeline into a
vector store or its import files) and `mobilenet-embed feast` (a Feast
feature repository over the dataset). Exit codes as the search commands:
0 done; 2 a problem named in one line; 3 the pipeline failed running."""
from __future__ import annotations

import argparse
import shlex

from pipeline.search.errors import SearchError
from pipeline.commands.common import errors_as_exit_2, say

@errors_as_exit_2
def export_main(argv: list[str]) -> int:
    """mobilenet-embed export OUT --format F --to TARGET: a Beam pipeline."""
    from pipeline.export import FORMATS, export
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed export",
        description="Write the dataset's unit vectors (cosine similarity) into a "
                    "vector store or its import files, as a Beam pipeline. Beam's "
                    "own options (--runner, --direct_num_workers, --dry_run, ...) "
                    "pass through.")
    parser.add_argument("output", help="the dataset folder (local or gs://)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--to", required=True,
                        help="vertex/bigquery: a folder (local or gs://), or bq://P.D.T "
                             "for a BigQuery table; lancedb: a folder or URI; qdrant: a "
                             "folder (local mode) or http(s)://server; milvus: a Milvus "
                             "Lite file (*.db) or http://server:19530")
    parser.add_argument("--restrict", action="append", default=[], metavar="COLUMN",
                        help="a dataset column to filter on (Vertex restricts "
                             "namespace, a payload field / column elsewhere); repeatable")
    parser.add_argument("--crowding_tag", default=None, metavar="COLUMN|folder",
                        help="Vertex crowding tag: the image's folder or a column")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace another model's or dataset's export, or files "
                             "this command did not write")
    parser.add_argument("--shards", type=int, default=None,
                        help="files of a vertex/bigquery export, written in parallel "
                             "(default: one per 50,000 rows, at least one per worker; "
                             "at most 5000)")
    parser.add_argument("--table", default="images",
                        help="table/collection name in the store (images)")
    parser.add_argument("--index", action="store_true",
                        help="lancedb: build an IVF_PQ index (cosine) after writing")
    args, beam_argv = parser.parse_known_args(argv)
    if args.shards is not None and args.shards < 1:
        raise SearchError(f"--shards must be at least 1, got {args.shards}")
    result = export(args.output, args.format, args.to, beam_argv, restricts=args.restrict,
                    crowding=args.crowding_tag, overwrite=args.overwrite,
                    shards=args.shards, table=args.table, index=args.index, progress=say)
    if result.get("dry_run"):
        print(f"dry run: the export graph was built on {result['runner']}; nothing written")
    elif result["files"]:
        print(f"{result['rows']} vectors of {result['dimensions']} dims in "
              f"{sum(1 for f in result['files'] if f.rsplit('/', 1)[-1].startswith(('embeddings-', 'rows-')))} "
              f"file(s) under {result['to']} ({result['distance']})")
    else:
        held = "" if result["store_rows"] is None else f"; it holds {result['store_rows']} rows"
        print(f"{result['rows']} vectors of {result['dimensions']} dims written to "
              f"{args.format} at {result['to']} ({result['distance']}{held})")
    return 0


@errors_as_exit_2
def feast_main(argv: list[str]) -> int:
    """mobilenet-embed feast OUT --to REPO: a Feast repository over the dataset."""
    from pipeline.export.feast_repo import write_repo
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed feast",
        description="Write a Feast feature repository (local provider, SQLite online "
                    "store, file offline store) whose FileSource is the dataset's "
                    "embeddings Parquet: entity image_id, feature view image_embeddings "
                    "(feature_vector, top5_labels, top5_probabilities, model).")
    parser.add_argument("output", help="the dataset folder (local or gs://)")
    parser.add_argument("--to", required=True, help="the repository folder to write")
    parser.add_argument("--project", default="mobilenet_embed", help="Feast project name")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace feature_store.yaml / features.py this command did not write")
    args = parser.parse_args(argv)
    repo = write_repo(args.output, args.to, project=args.project, overwrite=args.overwrite)
    print(f"Feast repository {repo['repo']}: feature view {repo['view']} over "
          f"{repo['rows']} rows ({repo['dimensions']} dims) in {repo['source']}\n"
          f"next: cd {shlex.quote(str(repo['repo']))} && feast apply && "
          f"feast materialize-incremental $(date -u +%Y-%m-%dT%H:%M:%S)")
    return 0
