"""The search commands: thin over `pipeline.search`, one function each.

  mobilenet-embed index OUT [--to DIR] [--index_key auto|FACTORY] [--max_memory 8G]
                            [--target_recall 0.95] [--rebuild] [--shards N]
                            [--layout merged|stacked]
                            [Beam flags: --runner, --direct_num_workers, --dry_run ...]
  mobilenet-embed query OUT (--image P ... | --id ID ... | --manifest FILE)
                            [--k 10] [--json] [--output DIR] [--index DIR]
  mobilenet-embed dedup OUT [--threshold T] [--to DIR] [--index DIR] [--max_pairs N]
                            [Beam options: --runner DataflowRunner ... | --dry_run]
  mobilenet-embed gallery OUT [--image P ... | --sample N] --to page.html
  mobilenet-embed export OUT --format vertex|bigquery|lancedb|qdrant|milvus --to T
                            [--restrict COL] [--crowding_tag COL|folder] [--overwrite]
  mobilenet-embed feast OUT --to REPO

Each returns an exit code: 0 done; 2 a problem named in one line
(`error: ...` on stderr), including a query image that cannot be read; 3 a
pipeline that started and failed (one line too).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from pipeline.commands.common import errors_as_exit_2, say
from pipeline.search.errors import SearchError

LOG = logging.getLogger("mobilenet_embed.search")


@errors_as_exit_2
def index_main(argv: list[str]) -> int:
    """mobilenet-embed index OUT: build OUT/index/ (or --to) and measure it."""
    from pipeline.search import build_dataset_index, parse_size
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed index",
        description="Index a dataset's feature vectors with faiss (cosine "
                    "similarity), measure recall against exact search and "
                    "tune the search parameters to reach --target_recall.")
    parser.add_argument("output", help="the dataset folder a run wrote (local or gs://)")
    parser.add_argument("--to", default=None, help="index folder (default OUT/index)")
    parser.add_argument("--index_key", default="auto",
                        help="auto (by size and --max_memory) or a faiss factory "
                             "string, e.g. Flat, HNSW32,Flat, IVF1024,Flat, IVF1024,SQ8")
    parser.add_argument("--max_memory", default="8G",
                        help="memory budget for building and holding the index (8G)")
    parser.add_argument("--target_recall", type=float, default=0.95,
                        help="recall@10 against exact search to tune for (0.95)")
    parser.add_argument("--rebuild", action="store_true",
                        help="start over instead of adding new rows to the index")
    parser.add_argument("--shards", type=int, default=None,
                        help="shards of an inverted-file build (default: from the "
                             "rows and the memory per worker)")
    parser.add_argument("--layout", choices=("merged", "stacked"), default="merged",
                        help="merged: the shards' lists merged into one file on disk; "
                             "stacked: no merge, the shards searched as one")
    args, beam_argv = parser.parse_known_args(argv)
    infos = build_dataset_index(args.output, to=args.to, index_key=args.index_key,
                                max_memory=parse_size(args.max_memory),
                                target_recall=args.target_recall,
                                rebuild=args.rebuild, progress=say,
                                shards=args.shards, beam_argv=beam_argv,
                                layout=args.layout)
    where = args.to or f"{args.output.rstrip('/')}/index"
    if infos.get("dry_run"):
        print(f"dry run: {infos['index_key']} ({infos['engine']}"
              f"{', %d shards on %s' % (infos['shards'], infos['runner']) if infos['engine'] == 'beam' else ''})"
              f"; nothing was run or written")
        return 0
    engine = (f"{infos['engine']}, {infos['shards']} shards, {infos['runner']}"
              if infos.get("engine") == "beam" else "in-process")
    print(f"indexed {infos['rows']} rows ({infos['rows_added']} added"
          f"{', %d removed' % infos['rows_removed'] if infos.get('rows_removed') else ''}"
          f"{', incremental' if infos['incremental'] else ''}; {engine}) into {where}: "
          f"{infos['index_key']} {json.dumps(infos['search_parameters'])}, "
          f"recall@1 {infos['recall_at_1']:.3f}, recall@10 {infos['recall_at_10']:.3f} "
          f"(target {infos['target_recall_at_10']}), single query p50 "
          f"{infos['latency_ms']['p50']:.2f} ms, p95 {infos['latency_ms']['p95']:.2f} ms, "
          f"built in {infos['build_seconds']['total_s']:.1f} s")
    return 0


def _read_manifest(path: str) -> list[str]:
    """Query images of a manifest: .txt (one a line), .csv or .parquet with a
    'uri' column."""
    import io

    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems
    if not FileSystems.exists(path):
        raise SearchError(f"--manifest {path} does not exist")
    with FileSystems.open(path) as f:
        data = f.read()
    lower = path.lower()
    if lower.endswith((".csv", ".parquet")):
        table = (pq.read_table(io.BytesIO(data)) if lower.endswith(".parquet")
                 else pacsv.read_csv(io.BytesIO(data)))
        if "uri" not in table.column_names:
            raise SearchError(f"--manifest {path} has no 'uri' column "
                              f"(columns: {', '.join(table.column_names)})")
        uris = [u for u in table.column("uri").to_pylist() if u]
    else:
        uris = [line.strip() for line in data.decode().splitlines()
                if line.strip() and not line.startswith("#")]
    if not uris:
        raise SearchError(f"--manifest {path} lists no images")
    return uris


@errors_as_exit_2
def query_main(argv: list[str]) -> int:
    """mobilenet-embed query OUT: the k nearest rows of query images or ids."""
    from pipeline.search import open_search
    from pipeline.search.query import check_k
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed query",
        description="Nearest neighbours (cosine similarity) of images, embedded "
                    "with the dataset's own model and preprocessing, or of rows "
                    "already in the dataset.")
    parser.add_argument("output", help="the dataset folder (local or gs://)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--image", nargs="+", help="query image paths or URIs")
    which.add_argument("--id", nargs="+", help="image ids of dataset rows")
    which.add_argument("--manifest", help="a .txt/.csv/.parquet list of query images")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (10)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per query on stdout")
    parser.add_argument("--output", dest="results", default=None,
                        help="with --manifest: folder for results.parquet")
    parser.add_argument("--index", default=None, help="index folder (default OUT/index)")
    args = parser.parse_args(argv)
    k = check_k(args.k)
    if args.manifest and not args.results:
        raise SearchError("--manifest writes Parquet: pass --output DIR")
    searcher = open_search(args.output, args.index)
    if searcher.stale:
        say(f"warning: {searcher.stale}")
    if args.id:
        results = searcher.by_ids(args.id, k)
    else:
        results = searcher.by_images(_read_manifest(args.manifest) if args.manifest
                                     else args.image, k)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"error: {r.error}", file=sys.stderr)
    for r in results:  # fewer than k neighbours: say why, once per query
        if not r.error and r.note:
            say(f"warning: {r.query}: {r.note}")
    if args.manifest:
        import pyarrow as pa

        from pipeline.search.files import join, write_parquet
        rows = [(r.query, rank, n.image_id, n.uri, n.score)
                for r in results for rank, n in enumerate(r.neighbors, start=1)]
        table = pa.table({
            "query": pa.array([x[0] for x in rows], pa.string()),
            "rank": pa.array([x[1] for x in rows], pa.int32()),
            "image_id": pa.array([x[2] for x in rows], pa.string()),
            "uri": pa.array([x[3] for x in rows], pa.string()),
            "score": pa.array([x[4] for x in rows], pa.float32())})
        path = join(args.results, "results.parquet")
        write_parquet(table, path)
        print(f"{len(results) - len(failed)} queries, {len(rows)} neighbours -> {path}")
    else:
        for r in results:
            if args.json:
                print(json.dumps(r.to_json()))
            elif not r.error:
                print(r.query)
                for rank, n in enumerate(r.neighbors, start=1):
                    print(f"  {rank:3d}. {n.score:.4f}  {n.image_id}")
    return 2 if failed else 0


@errors_as_exit_2
def dedup_main(argv: list[str]) -> int:
    """mobilenet-embed dedup OUT: exact and near duplicates, pairs and clusters,
    as a Beam pipeline (Beam's options pass through: --runner DataflowRunner ...)."""
    from pipeline.search import parse_size
    from pipeline.runner import BeamRun
    from pipeline.search.dedup import DEFAULT_THRESHOLD
    from pipeline.search.dedup_beam import (BYTES_PER_PAIR, ROUNDS, SHARD_ROWS,
                                            dedup_dataset)
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed dedup",
        description="Exact copies (same content_sha256) and near duplicates "
                    "(cosine similarity >= --threshold) across the dataset, and "
                    "their clusters, as a Beam pipeline: locally on every core by "
                    "default, or on any runner with Beam's options (--runner "
                    "DataflowRunner --project ... --region ... --temp_location "
                    "gs://...). --dry_run builds the graph without running it.")
    parser.add_argument("output", help="the dataset folder (local or gs://)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"cosine similarity of near duplicates (default "
                             f"{DEFAULT_THRESHOLD}, measured: see docs/search.md)")
    parser.add_argument("--to", default=None, help="folder for the results (default OUT/duplicates)")
    parser.add_argument("--index", default=None,
                        help="index folder (default OUT/index; built first if absent)")
    parser.add_argument("--max_memory", default="8G",
                        help="memory budget; sets the default --max_pairs "
                             f"(one pair ~{BYTES_PER_PAIR} bytes through the pipeline)")
    parser.add_argument("--max_pairs", type=int, default=None,
                        help="stop (before the pass, from an estimate, and during it) "
                             "when more pairs than this would be found "
                             "(default: --max_memory / bytes per pair)")
    parser.add_argument("--skip_estimate", action="store_true",
                        help="do not estimate the pairs before the pass (the hard "
                             "stop during it still holds)")
    parser.add_argument("--shard_rows", type=int, default=SHARD_ROWS,
                        help=f"rows a worker searches per shard ({SHARD_ROWS})")
    parser.add_argument("--rounds", type=int, default=ROUNDS,
                        help="connected-components rounds per pipeline; more "
                             f"pipelines run until they converge ({ROUNDS})")
    args, beam_argv = parser.parse_known_args(argv)
    beam_run = BeamRun.from_argv(beam_argv)
    found = dedup_dataset(args.output, beam_run, to=args.to, threshold=args.threshold,
                          index_dir=args.index, max_pairs=args.max_pairs,
                          max_memory=parse_size(args.max_memory),
                          estimate=not args.skip_estimate, shard_rows=args.shard_rows,
                          rounds=args.rounds, say=say)
    if found is None:
        print("dedup: dry run, the pipeline was built; nothing was run")
        return 0
    c = found
    to = args.to or f"{args.output.rstrip('/')}/duplicates"
    print(f"{c['images']} images: {c['exact_pairs']} exact and {c['near_pairs']} near "
          f"duplicate pairs (cosine >= {c['threshold']}), {c['clusters']} clusters "
          f"holding {c['images_in_clusters']} images ({c['removable_duplicates']} "
          f"removable) -> {to}")
    return 0


@errors_as_exit_2
def gallery_main(argv: list[str]) -> int:
    """mobilenet-embed gallery OUT --to page.html: neighbours and duplicate clusters."""
    from pipeline.search.gallery import write_gallery
    parser = argparse.ArgumentParser(
        prog="mobilenet-embed gallery",
        description="One self-contained HTML page: query images with their "
                    "nearest neighbours, and the largest duplicate clusters.")
    parser.add_argument("output", help="the dataset folder (local or gs://)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--image", nargs="+", help="query images (paths or URIs)")
    which.add_argument("--sample", type=int, default=None,
                       help="this many dataset rows drawn at random as queries (default 8)")
    parser.add_argument("--k", type=int, default=8, help="neighbours per query (8)")
    parser.add_argument("--to", required=True,
                        help="the HTML file to write (an existing file is replaced only "
                             "if this command wrote it, or with --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --to file whatever it is")
    parser.add_argument("--index", default=None, help="index folder (default OUT/index)")
    parser.add_argument("--duplicates", default=None,
                        help="dedup results folder (default OUT/duplicates, if present)")
    args = parser.parse_args(argv)
    summary = write_gallery(args.output, args.to, images=args.image,
                            sample=args.sample, k=args.k, index_dir=args.index,
                            duplicates_dir=args.duplicates, overwrite=args.overwrite)
    print(f"{summary['queries']} queries, {summary['clusters']} duplicate clusters, "
          f"{summary['thumbnails']} thumbnails -> {args.to}")
    return 0
