"""The dataset's side of search: its vectors, rows and model, read only
through `transforms.dataset.Dataset` (a few columns, streamed; never the
1001 logits), and query images embedded the way the dataset was.
"""
from __future__ import annotations

import re
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.search.errors import SearchError
from pipeline.search.vectors import Batch, normalize
from transforms.dataset import Dataset, DatasetError


def fixed_list_to_numpy(column) -> np.ndarray:
    """A fixed_size_list<float> column as float32 [n, d]."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    size = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).astype(
        np.float32, copy=False).reshape(len(column), size)


QUERY_BATCH = 16  # images per model call when embedding query images


VECTOR_COLUMNS = ("image_id", "uri", "feature_vector")


class DatasetVectors:
    """A dataset's feature vectors as a `VectorSource`, plus row look-ups."""

    def __init__(self, root: str):
        self.dataset = Dataset(root)
        try:
            self.metadata = self.dataset.metadata()
        except DatasetError as e:
            raise SearchError(str(e)) from None
        self.dim = self.metadata.feature_dim
        self.root = self.dataset.root

    def identity(self) -> dict[str, str]:
        return dict(self.metadata.identity())

    def num_rows(self) -> int:
        return self.dataset.num_rows()

    def batches(self, batch_size: int = 8192) -> Iterator[Batch]:
        for batch in self.dataset.iter_batches(["image_id", "uri", "feature_vector"],
                                               batch_size=batch_size):
            yield (batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                   normalize(fixed_list_to_numpy(batch.column(2))))

    # --- a parted source (pipeline/search/build.py): workers read parts ---

    def __getstate__(self):
        return {"root": self.root}

    def __setstate__(self, state):
        self.__init__(state["root"])

    def parts(self) -> list[tuple[str, int]]:
        """(part, rows) of every embeddings part: footers only."""
        from apache_beam.io.filesystems import FileSystems
        found = []
        prefix = self.root.rstrip("/") + "/"
        for path in self.dataset.parts():
            with FileSystems.open(path) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            found.append((path[len(prefix):] if path.startswith(prefix) else path, rows))
        return found

    def read(self, part: str, lo: int, hi: int, batch_size: int = 8192) -> Iterator[Batch]:
        """Rows lo..hi of one part, reading only the row groups they are in."""
        from apache_beam.io.filesystems import FileSystems
        path = part if "://" in part or part.startswith("/") else \
            self.root.rstrip("/") + "/" + part
        columns = ["image_id", "uri", "feature_vector"]
        with FileSystems.open(path) as f:
            pf = pq.ParquetFile(f)
            start = 0
            for g in range(pf.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                a, b = max(lo, start), min(hi, start + rows)
                if a < b:
                    table = pf.read_row_group(g, columns=columns).slice(a - start, b - a)
                    for batch in table.to_batches(max_chunksize=batch_size):
                        yield (batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                               normalize(fixed_list_to_numpy(batch.column(2))))
                start += rows
                if start >= hi:
                    break

    def check_parts(self, columns: Sequence[str] = VECTOR_COLUMNS) -> None:
        """One SearchError naming the first part whose footer lacks one of
        `columns` (a file with the dataset's metadata but no feature_vector,
        written by another tool): found before any pipeline runs."""
        from apache_beam.io.filesystems import FileSystems
        for path in self.dataset.parts():
            try:
                with FileSystems.open(path) as f:
                    names = pq.ParquetFile(f).schema_arrow.names
            except Exception as e:  # pylint: disable=broad-except
                raise SearchError(f"{path} cannot be read as Parquet "
                                  f"({type(e).__name__}: {str(e).strip()[:160]}); "
                                  "remove it or embed it again") from None
            missing = [c for c in columns if c not in names]
            if missing:
                raise SearchError(f"{path} has no {', '.join(missing)} column (it holds "
                                  f"{', '.join(names[:8]) or 'no columns'}); remove it "
                                  "or embed its images again")

    def iter_columns(self, columns: list[str], batch_size: int = 8192
                     ) -> Iterator[pa.RecordBatch]:
        return self.dataset.iter_batches(columns, batch_size=batch_size)

    def rows(self, image_ids: Sequence[str], columns: list[str]) -> dict[str, dict]:
        """image_id -> {column: value} for the ids found (one streamed pass).
        feature_vector comes back as a float32 array."""
        wanted = pa.array(list(set(image_ids)), pa.string())
        found: dict[str, dict] = {}
        names = ["image_id"] + [c for c in columns if c != "image_id"]
        for batch in self.dataset.iter_batches(names):
            hit = batch.filter(pc.is_in(batch.column(0), value_set=wanted))
            if not hit.num_rows:
                continue
            table = pa.Table.from_batches([hit])
            vectors = (fixed_list_to_numpy(table.column("feature_vector"))
                       if "feature_vector" in names else None)
            plain = [c for c in names if c != "feature_vector"]
            for i, row in enumerate(table.select(plain).to_pylist()):
                if vectors is not None:
                    row["feature_vector"] = vectors[i]
                found[row["image_id"]] = row
            if len(found) == len(wanted):
                break
        return found

    def sample_ids(self, n: int, seed: int = 0) -> list[str]:
        """n image ids drawn at random (reads only the id column)."""
        ids = [i for b in self.dataset.iter_batches(["image_id"]) for i in b.column(0).to_pylist()]
        if not ids:
            return []
        rng = np.random.default_rng(seed)
        return [ids[i] for i in sorted(rng.choice(len(ids), min(n, len(ids)), replace=False))]


# --- embedding query images like the dataset -----------------------------------

def model_spec(info, preprocessing: Optional[dict] = None):
    """The `ModelSpec` that loads the model a dataset records (schemas.ModelInfo),
    in the dataset's own precision: an int8 dataset's queries run the same
    quantized model (rebuilt from the calibration record where this
    machine's cache lacks it)."""
    from transforms.model.loading import ModelSpec
    handle = info.model_handle or ""
    try:
        precision = _precision(info, preprocessing)
        if info.model_source == "random":
            match = re.fullmatch(r"random\(seed=(-?\d+)\)", handle)
            return ModelSpec(variant=info.model, source="random",
                             seed=int(match.group(1)) if match else 0, **precision)
        handles = [h.strip() for h in handle.split(" + ") if h.strip()]
        if not handles:
            raise ValueError("no model handle recorded")
        return ModelSpec(variant=info.model, source=info.model_source,
                         handle=handles[0],
                         feature_handle=handles[1] if len(handles) > 1 else None,
                         **precision)
    except (ValueError, KeyError, TypeError) as e:
        raise SearchError(f"the dataset's model cannot be loaded for queries: {e}") from None


def _precision(info, preprocessing: Optional[dict]) -> dict:
    """ModelSpec's precision fields for a recorded ModelInfo."""
    if getattr(info, "precision", "fp32") != "int8":
        return {}
    import json

    from transforms.model.quantize import Calibration
    record = json.loads(info.quantization)["calibration"]
    return {"precision": "int8", "engine": info.engine or "auto",
            "calibration": Calibration(
                tuple(record["uris"]), record["sha256"],
                json.dumps(preprocessing or {}, sort_keys=True),
                record.get("source", ""))}


def preprocess_settings(recorded: dict):
    """The decode/resize settings the dataset recorded, rebuilt; refused when
    this version would not produce the same pixels."""
    from schemas.output import PREPROCESSING_RECORDED_ONLY
    from transforms.decode import PreprocessSettings
    try:
        settings = PreprocessSettings.from_metadata(recorded)
    except (KeyError, TypeError, ValueError) as e:
        raise SearchError(f"the dataset's preprocessing record is malformed "
                          f"({e!r})") from None
    mine = {k: v for k, v in settings.to_metadata().items()
            if k not in PREPROCESSING_RECORDED_ONLY}
    theirs = {k: v for k, v in recorded.items()
              if k not in PREPROCESSING_RECORDED_ONLY}
    if mine != theirs:
        differing = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise SearchError("this version cannot preprocess query images as the "
                          f"dataset was ({', '.join(differing)} differ)")
    return settings


class QueryEmbedder:
    """Embeds query images with the dataset's own model and preprocessing."""

    def __init__(self, metadata):
        from transforms.decode import DecodeLimits
        from transforms.model.loading import ModelUnavailableError, load_model
        self.settings = preprocess_settings(metadata.preprocessing)
        self.limits = DecodeLimits()
        from transforms.inference import calibration_pixels
        from transforms.model.loading import QuantizationError
        spec = model_spec(metadata.model, metadata.preprocessing)
        try:
            self.model = load_model(spec, calibration_pixels=(
                (lambda: calibration_pixels(spec.calibration))
                if spec.calibration else None))
        except (ModelUnavailableError, QuantizationError) as e:
            raise SearchError(f"cannot load the dataset's model for queries: {e}") from None
        if self.model.weights_sha256 != metadata.model.weights_sha256:
            raise SearchError(
                f"the model loaded for queries ({metadata.model.model_handle}, weights "
                f"sha256 {self.model.weights_sha256[:12]}...) is not the one that made "
                f"the dataset (weights sha256 {metadata.model.weights_sha256[:12]}...)")

    def embed(self, uris: Sequence[str]) -> tuple[np.ndarray, list[Optional[str]]]:
        """(vectors [n, d] normalized, errors): a row per uri; an image that
        cannot be read or decoded gets a zero row and its error message."""
        from transforms.decode import ImageError, decode_and_resize, read_bytes
        vectors = np.zeros((len(uris), self.model.feature_dim), np.float32)
        errors: list[Optional[str]] = []
        # A batch at a time: a manifest of many query images never holds all
        # their pixels, and the model never sees one huge batch (200 images
        # in one call of the 1.4_224 model took 18 GB).
        for start in range(0, len(uris), QUERY_BATCH):
            rows, pixels = [], []
            for i, uri in enumerate(uris[start:start + QUERY_BATCH], start):
                try:
                    data = read_bytes(uri, self.limits.max_bytes)
                    pixels.append(decode_and_resize(data, self.settings, self.limits)[0])
                    rows.append(i)
                    errors.append(None)
                except ImageError as e:
                    errors.append(f"{uri}: {e}")
            if pixels:
                _, features = self.model.predict(np.stack(pixels))
                vectors[rows] = normalize(features)
        return vectors, errors
