"""BigQuery: the vectors as a table `CREATE VECTOR INDEX` and `VECTOR_SEARCH`
take (ARRAY<FLOAT64> embedding, one dimension, no NULLs), written through
Beam's own vector writer (`apache_beam.ml.rag.ingestion.bigquery`, which
runs BigQuery's managed Java IO: on Dataflow, or locally with Java and an
expansion service). Without those, `WriteBigQueryFiles` writes the same rows
as files for a load job (`bq load`).
"""
from __future__ import annotations

from typing import Iterable

import apache_beam as beam

from transforms.sinks.files import bigquery_row, bigquery_schema
from transforms.sinks.records import VectorRecord


def to_item(r: VectorRecord):
    """A VectorRecord as Beam's rag EmbeddableItem (the writers' element)."""
    from apache_beam.ml.rag.types import Content, EmbeddableItem, Embedding
    return EmbeddableItem(
        content=Content(image=r.uri), id=r.id,
        metadata={"label": r.label, "top5_labels": list(r.top5_labels),
                  "model": r.model, "restricts": [list(x) for x in r.restricts],
                  "crowding_tag": r.crowding_tag},
        embedding=Embedding(dense_embedding=[float(v) for v in r.vector]))


def item_row(item) -> dict:
    """EmbeddableItem -> a row of the table's schema (the writer's converter)."""
    if item.embedding is None or item.embedding.dense_embedding is None:
        raise ValueError(f"{item.id}: no dense embedding")
    m = item.metadata
    row = bigquery_row(VectorRecord(
        item.id, item.content_string, item.embedding.dense_embedding, m["label"],
        tuple(m["top5_labels"]), m["model"],
        tuple((k, tuple(v)) for k, v in m.get("restricts") or ()),
        m.get("crowding_tag")))
    row["embedding"] = [float(v) for v in row["embedding"]]  # FLOAT64 values
    return row


class WriteToBigQueryVectors(beam.PTransform):
    """VectorRecords -> a BigQuery table through Beam's
    BigQueryVectorWriterConfig (the managed BigQuery IO: it appends; load a
    table once, or write to a fresh one, for no duplicates).

    `table` is "project.dataset.table"; `restricts` names the extra STRING
    columns the records carry; `write_config` adds managed-IO options."""

    def __init__(self, table: str, restricts: Iterable[str] = (),
                 crowding: bool = False, write_config: dict | None = None):
        super().__init__()
        self.table = table
        self.schema = bigquery_schema(tuple(restricts), crowding)
        self.write_config = {"table": table, **(write_config or {})}

    def config(self):
        from apache_beam.ml.rag.ingestion.bigquery import (BigQueryVectorWriterConfig,
                                                           SchemaConfig)
        return BigQueryVectorWriterConfig(
            write_config=self.write_config,
            schema_config=SchemaConfig(schema=self.schema,
                                       embeddable_to_dict_fn=item_row))

    def rows(self, records: Iterable[VectorRecord]) -> list:
        """What the writer would send, as Beam Rows of the schema (offline)."""
        from apache_beam.io.gcp.bigquery_tools import beam_row_from_dict
        config = self.config()
        return [beam_row_from_dict(config.schema_config.embeddable_to_dict_fn(to_item(r)),
                                   self.schema) for r in records]

    def expand(self, records):
        from apache_beam.ml.rag.ingestion.base import VectorDatabaseWriteTransform
        return (records
                | "ToEmbeddableItems" >> beam.Map(to_item)
                | "WriteToBigQuery" >> VectorDatabaseWriteTransform(self.config()))
