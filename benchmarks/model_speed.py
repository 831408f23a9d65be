"""Model-only measurements: raw throughput, the cost of the second head, and
the CPU execution options (graph vs eager, XLA, oneDNN, threads, frozen
graph, bfloat16), each compared in alternation with its baseline."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import inputs
from transforms.model import catalog
from benchmarks.workers import Config, Pool, alternate, best_batch, summarize

MODELS = ("mobilenet_v2_100_224", "mobilenet_v2_035_96")
BIG = MODELS[0]
# The raw model is timed on these too (the largest variant; random weights).
RAW_MODELS = (BIG, "mobilenet_v2_140_224", MODELS[1])
# What runs the model: ONNX Runtime is what the job's default (auto) gives
# on CPU; TensorFlow is `--runtime tensorflow`.
RUNTIMES = ("onnxruntime", "tensorflow")
DEFAULT_RUNTIME = RUNTIMES[0]
# Accuracy guard for any numeric mode: top-1 within this many points of the
# float32 model's, and every image's feature vector this close (cosine).
TOP1_POINTS = 0.5
MIN_COSINE = 0.999


def shared_model(shared: Path) -> str | None:
    path = shared / "models" / BIG
    return str(path) if path.is_dir() else None


def pool_report(pool: Pool) -> dict:
    return {"load": {n: {k: w.ready.get(k) for k in (
        "load_s", "onednn", "runtime", "tensorflow_imported", "rss_mb")}
                     for n, w in pool.workers.items()},
            "errors": pool.errors}


# --- raw throughput ---------------------------------------------------------------

def raw_name(model: str, runtime: str = DEFAULT_RUNTIME, real: bool = False) -> str:
    """The raw-model worker's name: weights, variant, runtime."""
    return f"{'real' if real else 'random'} {model} on {runtime}"


def raw_configs(shared_path: str | None) -> list[Config]:
    configs = [Config(raw_name(m, r), variant=m, runtime=r)
               for m in RAW_MODELS for r in RUNTIMES]
    if shared_path:
        configs += [Config(raw_name(BIG, r, real=True), source="shared",
                           shared_model=shared_path, runtime=r)
                    for r in RUNTIMES]
    return configs


def job_batch(model: str) -> int:
    """The batch size the job gives the model by default."""
    from transforms.inference import default_max_batch_size
    return default_max_batch_size(catalog.get_variant(model).input_size)


def runtime_ratios(raw: dict) -> dict:
    """ONNX Runtime's rate over TensorFlow's, per model, at every batch size
    and at the job's default batch size (the one the target judges)."""
    out = {}
    for onnx_name, onnx in raw.items():
        if not onnx_name.endswith(f" on {RUNTIMES[0]}"):
            continue
        base = onnx_name[:-len(RUNTIMES[0])]
        tf = raw.get(base + RUNTIMES[1])
        if not tf:
            continue
        model = base.split()[1]
        by_batch = {}
        for b, cell in onnx["by_batch"].items():
            other = tf["by_batch"].get(b)
            if other and other["median"]:
                by_batch[int(b)] = round(cell["median"] / other["median"], 2)
        out[base[:-len(" on ")]] = {"model": model, "job_batch": job_batch(model),
                                    "at_job_batch": by_batch.get(job_batch(model)),
                                    "by_batch": by_batch}
    return out


def raw_sweep(pool: Pool, names: list[str], batches: list[int], rounds: int,
              seconds: float) -> dict:
    """images/s of LoadedModel.predict at each batch size, all models interleaved."""
    groups = {name: [name] for name in names if name in pool.workers}
    by_model = alternate(pool, groups, batches, rounds, seconds)
    result = {}
    for name, by_batch in by_model.items():
        batch, rate = best_batch(by_batch)
        result[name] = {"best_batch": batch, "best_images_per_s": round(rate, 1),
                        "by_batch": by_batch}
    return result


def spot_check(pool: Pool, name: str, batch: int, rounds: int,
               seconds: float) -> list[dict]:
    """A few raw timings of one model, to interleave with other work."""
    return [pool.quiet_speed([name], batch, seconds) for _ in range(rounds)]


def summarize_spots(spots: list[dict]) -> dict:
    return summarize(spots) if spots else {}


# --- logits + features vs logits alone ----------------------------------------------

# Each two-head configuration and the logits-only one built the same way.
HEAD_PAIRS = (
    ("random: both heads, Keras graph", "random: logits only, Keras graph"),
    ("random: both heads, frozen", "random: logits only, frozen"),
    (f"real {BIG}", "real: classification SavedModel alone"),
    (f"real {BIG}", "real: classification SavedModel alone, frozen"),
)


def head_configs(shared_path: str | None) -> list[Config]:
    """Every model HEAD_PAIRS compares."""
    configs = [Config(HEAD_PAIRS[0][0], form="graph_keras"),
               Config(HEAD_PAIRS[0][1], form="logits_only"),
               Config(HEAD_PAIRS[1][0], form="frozen"),
               Config(HEAD_PAIRS[1][1], form="logits_only_frozen")]
    if shared_path:
        real = dict(source="shared", shared_model=shared_path)
        configs += [Config(HEAD_PAIRS[2][0], **real),
                    Config(HEAD_PAIRS[2][1], form="logits_only", **real),
                    Config(HEAD_PAIRS[3][1], form="logits_only_frozen", **real)]
    return configs


def heads_cost(pool: Pool, batch: int, rounds: int, seconds: float) -> dict:
    """Time of both heads over time of logits alone (inverse rates)."""
    names = sorted({n for pair in HEAD_PAIRS for n in pair if n in pool.workers})
    rates = {name: by_batch[batch] for name, by_batch in alternate(
        pool, {n: [n] for n in names}, [batch], rounds, seconds).items()}
    ratios = {f"{both} vs {alone}": round(rates[alone]["median"]
                                          / rates[both]["median"], 3)
              for both, alone in HEAD_PAIRS if both in rates and alone in rates}
    return {"batch": batch, "rates": rates,
            "time_ratio_both_over_logits_only": ratios}


# --- how to make the model fast on CPU --------------------------------------------------

def option_groups(shared_path: str | None) -> dict[str, list[Config]]:
    """The configurations compared, in groups small enough to hold in memory
    at once (one process each); comparisons stay within a group. oneDNN is
    set explicitly everywhere but in "product", which runs as the job does."""
    off, on = dict(onednn="0"), dict(onednn="1")
    groups = {}
    for model in MODELS:
        m = dict(variant=model)
        groups[f"random {model}"] = [
            Config("product (as the job loads it)", **m),
            Config("Keras graph (tf.function), oneDNN off", form="graph_keras", **m, **off),
            Config("Keras graph (tf.function), oneDNN on", form="graph_keras", **m, **on),
            Config("frozen graph, oneDNN off", form="frozen", **m, **off),
            Config("frozen graph, oneDNN on", form="frozen", **m, **on),
        ]
    groups[f"random {BIG}"] += [
        Config("eager Keras, oneDNN on", form="eager", **on),
        Config("XLA jit_compile (Keras graph)", form="xla", **on),
        Config("bfloat16 (grappler), oneDNN on", form="bf16", **on),
    ]
    if shared_path:
        real = dict(source="shared", shared_model=shared_path)
        groups[f"real {BIG}"] = [
            Config("product (as the job loads it)", **real),
            Config(ACCURACY_REFERENCE, **real, **off),
            Config("oneDNN on", **real, **on),
            Config("bfloat16 (grappler), oneDNN on", form="bf16", **real, **on)]
    return groups


# float32 without oneDNN: the plain Eigen kernels, the reference of the guard.
ACCURACY_REFERENCE = "oneDNN off (float32 reference)"


def compare(pool: Pool, batches: list[int], rounds: int, seconds: float) -> dict:
    """Every worker of the pool at each batch size, interleaved."""
    groups = {name: [name] for name in pool.workers}
    return {"rates": alternate(pool, groups, batches, rounds, seconds),
            **pool_report(pool)}


THREAD_LAYOUTS = ("1 process x 2 threads", "1 process x 1 thread",
                  "2 processes x 1 thread", "2 processes x 2 threads")


def thread_configs(model: str, runtime: str = DEFAULT_RUNTIME) -> list[Config]:
    """Two cores: one process using both vs two processes with one each
    (and two with two each), as the job would load the model on `runtime`."""
    one = dict(variant=model, intra=1, inter=1, runtime=runtime)
    every = dict(variant=model, runtime=runtime)
    return [Config("1 process x 2 threads", **every),
            Config("1 process x 1 thread", **one),
            Config("2 processes x 1 thread #1", **one),
            Config("2 processes x 1 thread #2", **one),
            Config("2 processes x 2 threads #1", **every),
            Config("2 processes x 2 threads #2", **every)]


def threads(pool: Pool, batches: list[int], rounds: int, seconds: float) -> dict:
    groups = {layout: [n for n in pool.workers if n.startswith(layout)]
              for layout in THREAD_LAYOUTS}
    return {"rates": alternate(pool, groups, batches, rounds, seconds),
            **pool_report(pool)}


# --- accuracy guard ----------------------------------------------------------------------

def sample_pixels(shared: Path, path: Path) -> tuple[Path, np.ndarray]:
    """The sample photos preprocessed as the job does (224, stretch), saved
    for the workers; and their labels."""
    from transforms.decode import DecodeLimits, PreprocessSettings, decode_and_resize
    photos = inputs.sample_photos(shared)
    labels = inputs.sample_labels(shared)
    settings, limits = PreprocessSettings(224, 224), DecodeLimits()
    pixels = np.stack([decode_and_resize(p.read_bytes(), settings, limits)[0]
                       for p in photos])
    np.save(path, pixels)
    return path, np.array([labels[p.name] for p in photos])


def accuracy(pool: Pool, names: list[str], reference: str, pixels: Path,
             labels: np.ndarray, work: Path) -> dict:
    """Top-1 on the sample and feature cosine to the float32 reference."""
    outputs = {}
    for name in [reference] + [n for n in names if n != reference]:
        if name not in pool.workers:
            continue
        out = work / f"embed-{len(outputs)}.npz"
        pool.workers[name].request({"cmd": "embed", "pixels": str(pixels),
                                    "out": str(out)})
        with np.load(out) as data:
            outputs[name] = (data["logits"], data["features"])
    if reference not in outputs:
        return {"skipped": f"reference {reference!r} did not load"}
    ref_logits, ref_features = outputs[reference]
    ref_top1 = 100 * float(np.mean(ref_logits.argmax(1) == labels))
    result = {}
    for name, (logits, features) in outputs.items():
        top1 = 100 * float(np.mean(logits.argmax(1) == labels))
        cosine = _cosines(features, ref_features)
        result[name] = {
            "top1_percent": round(top1, 2),
            "top1_delta_points": round(top1 - ref_top1, 2),
            "min_feature_cosine": round(float(cosine.min()), 7),
            "mean_feature_cosine": round(float(cosine.mean()), 7),
            "max_logit_abs_diff": round(float(np.abs(logits - ref_logits).max()), 5),
            "passes": abs(top1 - ref_top1) <= TOP1_POINTS
            and float(cosine.min()) >= MIN_COSINE}
    return {"images": int(len(labels)), "reference": reference, "modes": result}


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)

