"""The job run in this process, recording the batch sizes the model is given.

    python -m benchmarks.profile_target BATCHES.json run --input ... --output ...

Only an observer is added (a wrapper around LoadedModel.predict that counts
batch sizes); the job is otherwise `mobilenet-embed run` unchanged. Used
under py-spy, single-process, where the launcher is also the worker.
"""
from __future__ import annotations

import collections
import json
import sys


def main(argv: list[str]) -> int:
    out_path, job_args = argv[0], argv[1:]
    from pipeline.cli import main as cli_main
    from transforms.model.loading import LoadedModel

    sizes: collections.Counter = collections.Counter()
    predict = LoadedModel.predict

    def counting_predict(self, pixels):
        sizes[len(pixels)] += 1
        return predict(self, pixels)

    LoadedModel.predict = counting_predict
    try:
        return cli_main(job_args)
    finally:
        with open(out_path, "w") as f:
            json.dump({str(k): v for k, v in sorted(sizes.items())}, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
