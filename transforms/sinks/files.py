"""File sinks: the vectors as the files a store's import reads.

Vertex AI Vector Search reads every JSON file of a Cloud Storage folder
(https://cloud.google.com/vertex-ai/docs/vector-search/setup/format-structure):
one object a line,

    {"id": "...", "embedding": [...],
     "restricts": [{"namespace": "label", "allow": ["tabby"]}, ...],
     "crowding_tag": "gs://bucket/album"}

uncompressed, at most 5000 files (MAX_VERTEX_FILES). BigQuery's load job
reads newline-delimited JSON with the schema in `BIGQUERY_SCHEMA`.

Both write one file per shard in parallel through Beam's text sink (whose
files appear only when the whole set is written: temp files, then renamed).
"""
from __future__ import annotations

import apache_beam as beam
import numpy as np
import orjson

from transforms.sinks.records import VectorRecord

MAX_VERTEX_FILES = 5000


# orjson writes a float32 array as each value's shortest round-trip text,
# in C (21x less than json.dumps of the float list for a 1280-dim row).
_JSON_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def _floats(vector) -> np.ndarray:
    return np.ascontiguousarray(vector, dtype=np.float32)


def _line(row: dict) -> str:
    return orjson.dumps(row, option=_JSON_OPTIONS).decode("utf-8")


def vertex_json(r: VectorRecord) -> dict:
    restricts = [{"namespace": "label", "allow": [r.label]}]
    for namespace, values in r.restricts:
        restricts.append({"namespace": namespace, "allow": [str(v) for v in values]})
    row = {"id": r.id, "embedding": _floats(r.vector), "restricts": restricts}
    if r.crowding_tag is not None:
        row["crowding_tag"] = r.crowding_tag
    return row


def vertex_line(r: VectorRecord) -> str:
    return _line(vertex_json(r))


def bigquery_line(r: VectorRecord) -> str:
    return _line(bigquery_row(r))


def bigquery_row(r: VectorRecord) -> dict:
    """A row of BIGQUERY_SCHEMA: ARRAY<FLOAT64> embedding of one dimension,
    never NULL (what CREATE VECTOR INDEX requires)."""
    row = {"id": r.id, "uri": r.uri, "embedding": _floats(r.vector),
           "label": r.label, "top5_labels": list(r.top5_labels), "model": r.model}
    for namespace, values in r.restricts:
        row[namespace] = ",".join(str(v) for v in values)
    if r.crowding_tag is not None:
        row["crowding_tag"] = r.crowding_tag
    return row


def bigquery_schema(extra: tuple = (), crowding: bool = False) -> dict:
    """The load job's schema ({"fields": [...]}, `bq load --schema`)."""
    fields = [{"name": "id", "type": "STRING", "mode": "REQUIRED"},
              {"name": "uri", "type": "STRING", "mode": "REQUIRED"},
              {"name": "embedding", "type": "FLOAT64", "mode": "REPEATED"},
              {"name": "label", "type": "STRING", "mode": "REQUIRED"},
              {"name": "top5_labels", "type": "STRING", "mode": "REPEATED"},
              {"name": "model", "type": "STRING", "mode": "REQUIRED"}]
    fields += [{"name": name, "type": "STRING", "mode": "NULLABLE"} for name in extra]
    if crowding:
        fields.append({"name": "crowding_tag", "type": "STRING", "mode": "NULLABLE"})
    return {"fields": fields}


def vector_search_sql(table: str, dims: int) -> str:
    """A ready example: the vector index and a nearest-neighbour query."""
    lists = max(1, min(5000, dims))
    return f"""-- {dims}-dimensional unit vectors: COSINE distance = 1 - cosine similarity.
-- The vector index needs at least 5000 rows; VECTOR_SEARCH works without it.
CREATE VECTOR INDEX IF NOT EXISTS embedding_index ON `{table}`(embedding)
OPTIONS (index_type = 'IVF', distance_type = 'COSINE',
         ivf_options = '{{"num_lists": {min(lists, 1000)}}}');

-- The 10 nearest rows of one image already in the table:
SELECT base.id, base.uri, base.label, distance
FROM VECTOR_SEARCH(
  TABLE `{table}`, 'embedding',
  (SELECT embedding FROM `{table}` WHERE id = @image_id),
  top_k => 10, distance_type => 'COSINE');
"""


class _WriteLines(beam.PTransform):
    def __init__(self, prefix: str, num_shards: int, line, suffix: str = ".json"):
        super().__init__()
        if not 1 <= num_shards <= MAX_VERTEX_FILES:
            raise ValueError(f"num_shards must be 1..{MAX_VERTEX_FILES}, got {num_shards}")
        self._prefix, self._shards, self._line, self._suffix = (
            prefix, num_shards, line, suffix)

    def expand(self, records):
        return (records
                | "ToJsonLines" >> beam.Map(self._line)
                | "WriteShards" >> beam.io.WriteToText(
                    self._prefix, file_name_suffix=self._suffix,
                    num_shards=self._shards,
                    shard_name_template="-SSSSS-of-NNNNN"))


class WriteVertexFiles(_WriteLines):
    """VectorRecords -> Vertex AI Vector Search JSON files
    `<prefix>-00000-of-0000N.json`, one per shard (1..5000). Returns the
    file names written."""

    def __init__(self, prefix: str, num_shards: int = 1):
        super().__init__(prefix, num_shards, vertex_line)


class WriteBigQueryFiles(_WriteLines):
    """VectorRecords -> newline-delimited JSON for a BigQuery load job
    (`bq load --source_format=NEWLINE_DELIMITED_JSON TABLE '<prefix>-*' schema.json`)."""

    def __init__(self, prefix: str, num_shards: int = 1):
        super().__init__(prefix, num_shards, bigquery_line)
