"""Throughput benchmark of the embedding job: `python -m benchmarks.run`."""
