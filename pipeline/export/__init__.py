"""`mobilenet-embed export`: a dataset's vectors into a store, as a Beam
pipeline (job.py), with the target's checks, lock, manifest and atomic
replace of file sets (target.py). The sinks themselves are PTransforms in
transforms/sinks/, for Beam users to add after EmbedImages."""
from pipeline.export.job import FORMATS, export

__all__ = ["FORMATS", "export"]
