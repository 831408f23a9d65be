"""Embed images with TF-Hub MobileNetV2 modules on Apache Beam, into Parquet."""
__version__ = "0.1.0"
