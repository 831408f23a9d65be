"""Which engine runs the ONNX model on this machine, chosen by measuring.

No engine is fastest everywhere: OpenVINO's fp32 was 1.7x ONNX Runtime's on
an AVX-512/VNNI EPYC and 0.85x on an AVX2-only one (issue 23). So the
candidates (ONNX Runtime, OpenVINO where installed) are each loaded, checked
(`check`: the parity against TensorFlow for fp32; nothing for int8, whose
guard is the launcher's) and timed on a probe batch of the job's batch size
with the job's threads; the fastest that passes runs the model.

The choice is cached per machine (`machine()`: CPU model and flags, the
oneDNN ISA cap, engine versions, threads, cores) and model file, so a
worker that starts again on the same machine loads only the engine chosen
(still checked) instead of timing them all. A worker on another CPU times
again: the engines agree within the parity limit, so workers of one job may
run different engines; each records what it chose.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import time
from typing import Callable, Optional

import numpy as np

from transforms.model import cache

LOG = logging.getLogger(__name__)

ENGINES = ("onnxruntime", "openvino")
# Bump when what is measured or recorded here changes.
_CHOICE_FORMAT = "1"


def cpu_info() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) of this machine (Linux); empty where unknown."""
    name, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not name:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return name, flags


def installed(engine: str) -> bool:
    try:
        cache.version(engine)
        return True
    except Exception:  # pylint: disable=broad-except
        return False


def machine() -> dict:
    """What an engine's speed depends on here: the cache key of a choice."""
    from transforms.model import threads
    name, flags = cpu_info()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
    return {"cpu": name or "unknown",
            "flags_sha256": hashlib.sha256(" ".join(sorted(flags)).encode())
            .hexdigest()[:16],
            "isa_cap": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "cores": cores, "intra_op_threads": threads.intra_op(),
            "inter_op_threads": threads.inter_op(),
            "versions": {e: cache.version(e) for e in ENGINES if installed(e)}}


def runner(engine: str, model: bytes, path: Optional[str] = None):
    """A callable uint8 pixels -> (logits, features) on `engine`."""
    if engine == "openvino":
        from transforms.model import openvino_runtime
        return openvino_runtime.OpenVinoRunner(model, path)
    if engine == "onnxruntime":
        from transforms.model import onnx_runtime
        return onnx_runtime.OnnxRunner(model)
    raise ValueError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")


def time_runner(run: Callable, pixels: np.ndarray, repeats: int = 3) -> float:
    """Best seconds per call of `run(pixels)` after one warm-up call."""
    run(pixels)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(pixels)
        best = min(best, time.perf_counter() - start)
    return best


class NoEngineError(RuntimeError):
    """No candidate engine loaded, ran and passed its check; the message
    names each one's reason, `results` holds what each gave (its check's
    result, or the exception)."""

    def __init__(self, message: str, results: dict):
        super().__init__(message)
        self.results = results


@dataclasses.dataclass
class Choice:
    """The engine chosen and how: recorded in the dataset's metadata."""
    engine: str
    run: Callable
    check: object  # what `check` returned for it (a Parity for fp32), or None
    seconds: dict  # engine -> seconds per probe batch, or why it was left out
    batch: int
    cached: bool  # True: read from this machine's cache, not timed again
    machine: dict

    def to_dict(self) -> dict:
        per_image = {e: round(s / self.batch * 1000, 3)
                     for e, s in self.seconds.items() if isinstance(s, float)}
        return {"chosen": self.engine, "seconds_per_batch": self.seconds,
                "ms_per_image": per_image, "batch": self.batch,
                "cached": self.cached, "machine": self.machine}


def cache_path(model_path: str, batch: int, where: dict) -> str:
    key = hashlib.sha256(repr((_CHOICE_FORMAT, batch, sorted(
        (k, str(v)) for k, v in where.items()))).encode()).hexdigest()[:16]
    folder, name = os.path.split(model_path)
    return os.path.join(folder, "engines", f"{name}-{key}.json")


def choose(candidates: tuple[str, ...], model: bytes, model_path: str,
           pixels: np.ndarray, check: Callable[[Callable], object] = lambda run: None,
           passed: Callable[[object], bool] = lambda result: True,
           strict: bool = True) -> Choice:
    """The fastest of `candidates` on `pixels` that loads, runs and passes
    `check` (`passed(check(run))`; with strict=False a single forced
    candidate runs whatever its check says, the caller warns). A choice
    cached for this machine and model is reused where its engine still
    passes; else every candidate is timed and the choice cached."""
    where = machine()
    path = cache_path(model_path, len(pixels), where)
    record = cache.read_json(path)
    if record and record.get("chosen") in candidates:
        engine = record["chosen"]
        try:
            run = runner(engine, model, model_path)
            result = check(run)
            if passed(result) or not strict:
                return Choice(engine, run, result, record.get("seconds_per_batch", {}),
                              len(pixels), True, where)
        except Exception as e:  # pylint: disable=broad-except
            LOG.info("the cached engine %s no longer runs here (%s); timing "
                     "the engines again", engine, cache.first_line(e))
    seconds, best, results = {}, None, {}
    for engine in candidates:
        try:
            run = runner(engine, model, model_path)
            result = results[engine] = check(run)
            if not passed(result) and strict:
                seconds[engine] = f"outputs differ: {result.describe()}"
                continue
            seconds[engine] = round(time_runner(run, pixels), 5)
        except Exception as e:  # pylint: disable=broad-except
            seconds[engine] = f"{type(e).__name__}: {cache.first_line(e)}"
            results[engine] = e
            continue
        if best is None or seconds[engine] < seconds[best[0]]:
            best = (engine, run, result)
    if best is None:
        raise NoEngineError("; ".join(f"{e}: {s}" for e, s in seconds.items())
                            or "no engine to try", results)
    choice = Choice(best[0], best[1], best[2], seconds, len(pixels), False, where)
    if len(candidates) > 1:  # a forced engine is not a measurement to keep
        cache.write_json_atomic(path, choice.to_dict(), "the engine choice")
    return choice


def describe(choice: Choice) -> str:
    """One line for logs and `show`: the chosen engine and the others' times."""
    timed = ", ".join(f"{e} {s * 1000 / choice.batch:.2f} ms/image"
                      if isinstance(s, float) else f"{e} left out ({s})"
                      for e, s in choice.seconds.items())
    how = "cached choice for this machine" if choice.cached else "timed here"
    return (f"{choice.engine} ({how}; batch {choice.batch}: {timed})"
            if timed else f"{choice.engine} ({how})")
