"""`mobilenet-embed show OUTPUT`: what a run produced, readable in a terminal."""
from __future__ import annotations

import argparse
import json

from transforms.dataset import EMBEDDINGS, ERRORS, Dataset


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mobilenet-embed show")
    parser.add_argument("output")
    parser.add_argument("--limit", type=int, default=5)
    args = parser.parse_args(argv)
    dataset = Dataset(args.output)
    dataset.check_exists()
    summary = dataset.read_summary()
    if summary:
        print(f"last run {summary['run_id']}: {json.dumps(summary['counts'])}")
    parts = dataset.parts(EMBEDDINGS)
    print(f"{len(parts)} Parquet file(s) in {dataset.join(EMBEDDINGS)}")
    meta = dataset.recorded_metadata()
    if meta:
        print(f"model {meta.model.model} ({meta.model.model_source}: "
              f"{meta.model.model_handle}), weights sha256 "
              f"{meta.model.weights_sha256[:16]}..., features {meta.feature_dim}")
        print(f"precision {_precision(meta.model)}")
        print(f"engine {_engine(meta.model)}")
    shown = 0
    for batch in dataset.iter_batches(["image_id", "top5_labels",
                                       "top5_probabilities", "feature_vector"],
                                      batch_size=max(1, args.limit)):
        for row in batch.slice(0, args.limit - shown).to_pylist():
            top = ", ".join(f"{label} {p:.2f}" for label, p in zip(
                row["top5_labels"][:3], row["top5_probabilities"][:3]))
            head = " ".join(f"{v:.3f}" for v in row["feature_vector"][:4])
            print(f"  {row['image_id']}\n    top-3: {top}\n    "
                  f"feature_vector[:4]: {head} ...")
            shown += 1
        if shown >= args.limit:
            break
    failed = 0
    for batch in dataset.iter_batches(["uri", "stage", "error_class", "message"],
                                      kind=ERRORS, batch_size=max(1, args.limit)):
        for row in batch.slice(0, args.limit - failed).to_pylist():
            print(f"  failed [{row['stage']}/{row['error_class']}] {row['uri']}: "
                  f"{row['message']}")
            failed += 1
        if failed >= args.limit:
            break
    return 0


def _engine(model) -> str:
    """'openvino (timed here: onnxruntime 1.92 ms/image, openvino 1.50 ...)'."""
    try:
        choice = json.loads(model.engine_choice) if model.engine_choice else {}
    except ValueError:
        choice = {}
    engine = model.engine or "not recorded (written before engines were recorded)"
    if not choice:
        return f"{engine} ({model.runtime})" if model.runtime else engine
    timed = ", ".join(
        f"{e} {choice.get('ms_per_image', {})[e]} ms/image" if e in choice.get(
            "ms_per_image", {}) else f"{e} left out ({s})"
        for e, s in choice.get("seconds_per_batch", {}).items())
    how = "cached for this machine" if choice.get("cached") else "measured"
    cpu = (choice.get("machine") or {}).get("cpu", "?")
    return (f"{engine} ({how} on {cpu}, batch {choice.get('batch')}: {timed})"
            if timed else f"{engine} ({how} on {cpu})")


def _precision(model) -> str:
    """'int8 on openvino (guard: ...)' or 'fp32' (and why, where int8 was asked)."""
    try:
        record = json.loads(model.quantization) if model.quantization else {}
    except ValueError:
        record = {}
    if model.precision != "int8":
        why = record.get("fp32_because")
        return f"fp32 ({why})" if why else "fp32"
    guard = record.get("guard") or {}
    calibration = record.get("calibration") or {}
    figures = (f"; guard: top-1 agreement {guard['top1_agreement']}, feature "
               f"cosine min {guard['cosine_min']}, median {guard['cosine_median']}"
               if "top1_agreement" in guard else "")
    auto = record.get("auto") or {}
    if "speedup" in auto:
        figures += f"; auto: {auto['speedup']}x fp32 end to end as measured here"
    return (f"int8 on {model.engine or 'unknown engine'} (calibrated on "
            f"{calibration.get('images', '?')} images{figures})")
