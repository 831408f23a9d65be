"""Parent side of benchmarks.model_worker: start model processes in given
configurations and time them in alternation."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from benchmarks.env import ROOT, Stopwatch
from transforms.model import catalog


# A timing during which other processes kept more than this many cores busy
# is retried (a few times), and flagged if it stays that way.
QUIET_LOAD = 0.3


class WorkerError(RuntimeError):
    pass


@dataclass(frozen=True)
class Config:
    """One model configuration; `name` labels it in the results."""
    name: str
    variant: str = catalog.DEFAULT_MODEL
    source: str = "random"  # or "shared": the real-weights model in ../shared
    form: str = "product"  # see model_worker.FORMS
    onednn: str | None = None  # TF_ENABLE_ONEDNN_OPTS; None: inherit
    intra: int = 0
    inter: int = 0
    shared_model: str | None = None
    runtime: str = "tensorflow"  # product form: ModelSpec.runtime

    def payload(self) -> str:
        return json.dumps({
            "variant": self.variant, "source": self.source, "form": self.form,
            "runtime": self.runtime,
            "intra": self.intra, "inter": self.inter,
            "shared_model": self.shared_model,
            "size": catalog.get_variant(self.variant).input_size})


@dataclass
class Worker:
    config: Config
    process: subprocess.Popen
    ready: dict = field(default_factory=dict)

    def send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()

    def receive(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise WorkerError(f"{self.config.name}: worker exited "
                              f"(code {self.process.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.config.name}: {reply['error']}")
        return reply

    def request(self, request: dict) -> dict:
        self.send(request)
        return self.receive()

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.process.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()


def pipeline_tf_environment() -> dict[str, str]:
    """What the job sets for TensorFlow in its processes (oneDNN, ...), so
    that the model alone is timed as the job runs it."""
    try:
        from transforms.inference import tensorflow_environment
    except ImportError:  # a job that sets nothing
        return {}
    return dict(tensorflow_environment())


def spawn(config: Config, log) -> Worker:
    """Start a worker; its `ready` line is read later (workers load in parallel)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **pipeline_tf_environment())
    if config.onednn is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = config.onednn
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.model_worker", config.payload()],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=log, text=True)
    return Worker(config, process)


class Pool:
    """Workers by name; closes them all on exit."""

    def __init__(self, configs: list[Config], log):
        self.workers: dict[str, Worker] = {}
        self.errors: dict[str, str] = {}
        spawned = [spawn(config, log) for config in configs]
        for worker in spawned:
            try:
                worker.ready = worker.receive()
                self.workers[worker.config.name] = worker
            except WorkerError as e:
                self.errors[worker.config.name] = str(e)
                worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def close(self, names: list[str] | None = None) -> None:
        for name in list(self.workers) if names is None else names:
            if name in self.workers:
                self.workers.pop(name).close()

    def speed(self, names: list[str], batch: int, seconds: float) -> dict:
        """Time the named workers together (their rates add up): one figure
        for e.g. two single-threaded processes sharing the machine."""
        chosen = [self.workers[n] for n in names]
        with Stopwatch() as watch:
            for worker in chosen:
                worker.send({"cmd": "speed", "batch": batch, "seconds": seconds})
            replies = [worker.receive() for worker in chosen]
        ours = sum(r["cpu_s_per_image"] * r["calls"] * batch for r in replies)
        window = watch.window
        return {"images_per_s": sum(r["images_per_s"] for r in replies),
                "cpu_s_per_image": statistics.mean(
                    r["cpu_s_per_image"] for r in replies),
                # Busy cores that were not the workers': other people's load.
                "foreign_load": max(0.0, window.machine_busy_s - ours) / window.wall_s}

    def quiet_speed(self, names: list[str], batch: int, seconds: float,
                    tries: int = 3) -> dict:
        """`speed`, retried while other processes load the machine; the
        quietest try is kept."""
        best = None
        for attempt in range(tries):
            result = self.speed(names, batch, seconds)
            if best is None or result["foreign_load"] < best["foreign_load"]:
                best = result
            if result["foreign_load"] <= QUIET_LOAD:
                break
            time.sleep(1.0)
        return {**best, "tries": attempt + 1}

    def warm_up(self, names: list[str], batches: list[int]) -> None:
        """One call per worker and batch size, so per-shape set-up is not timed."""
        for name in names:
            for batch in batches:
                self.workers[name].request({"cmd": "speed", "batch": batch,
                                            "seconds": 0})


def alternate(pool: Pool, groups: dict[str, list[str]], batches: list[int],
              rounds: int, seconds: float) -> dict:
    """Rates of each group at each batch size, rounds interleaved.

    Returns {group: {batch: {"median": ..., "runs": [...], ...}}}.
    """
    runs: dict = {g: {b: [] for b in batches} for g in groups}
    pool.warm_up([n for names in groups.values() for n in names
                  if n in pool.workers], batches)
    for _ in range(rounds):
        for batch in batches:
            for group, names in groups.items():
                if all(n in pool.workers for n in names):
                    runs[group][batch].append(
                        pool.quiet_speed(names, batch, seconds))
    return {g: {b: summarize(r) for b, r in by_batch.items() if r}
            for g, by_batch in runs.items()}


def summarize(runs: list[dict]) -> dict:
    """Medians over the quiet timings (all of them if none was quiet)."""
    quiet = [r for r in runs if r["foreign_load"] <= QUIET_LOAD]
    runs = quiet or runs
    rates = [r["images_per_s"] for r in runs]
    return {"median": statistics.median(rates), "quiet": bool(quiet),
            "runs": [round(r, 2) for r in rates],
            "cpu_ms_per_image": 1000 * statistics.median(
                r["cpu_s_per_image"] for r in runs),
            "foreign_load": round(statistics.median(
                r["foreign_load"] for r in runs), 2)}


def best_batch(by_batch: dict) -> tuple[int, float]:
    batch = max(by_batch, key=lambda b: by_batch[b]["median"])
    return batch, by_batch[batch]["median"]
