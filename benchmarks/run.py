"""Throughput benchmark: one command, one machine, one run.

    .venv/bin/python -m benchmarks.run            # full, about 20-25 minutes
    .venv/bin/python -m benchmarks.run --quick    # smoke, under 3 minutes
    .venv/bin/python -m benchmarks.run --out DIR  # results elsewhere

Writes DIR/latest.json and DIR/latest.md (default benchmarks/results/);
generated inputs and logs go under DIR/work/ (gitignored). See README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import decode_speed, end_to_end, env, inputs, model_speed, \
    report, workers
from benchmarks.end_to_end import MULTI_PROCESS, SINGLE_PROCESS, Case
from benchmarks.workers import Config, Pool

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("raw", "heads", "decode", "e2e", "options", "threads")


@dataclass(frozen=True)
class Params:
    batches: tuple[int, ...]
    rounds: int
    seconds: float  # per timing
    sample_limit: int  # sample photos decoded
    large_photos: int
    decode_rounds: int
    e2e_sizes: tuple[int, int]  # N1, N2
    e2e_layouts: bool  # explicit single- and multi-process runs too
    memory_size: int | None  # a larger run, for peak RSS
    cold_start_size: int  # a run with an empty model cache
    real_model: bool  # time the real-weights model too (a slow load)


FULL = Params(batches=(1, 8, 16, 32, 64, 128), rounds=3, seconds=1.0,
              sample_limit=200, large_photos=12, decode_rounds=3,
              e2e_sizes=(1000, 3000), e2e_layouts=True, memory_size=5000,
              cold_start_size=100, real_model=True)
QUICK = Params(batches=(1, 16, 64), rounds=2, seconds=0.5, sample_limit=40,
               large_photos=3, decode_rounds=1, e2e_sizes=(100, 400),
               e2e_layouts=False, memory_size=None,
               cold_start_size=0, real_model=False)


class Bench:
    """Shared state of one benchmark run."""

    def __init__(self, params: Params, out: Path, shared: Path):
        self.params = params
        self.out = out
        self.work = out / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        # The job caches frozen model graphs on disk. The benchmark's own
        # cache, emptied now, is warmed by the first loads; start-up with a
        # cold cache is measured separately.
        cache = self.work / "model_cache"
        shutil.rmtree(cache, ignore_errors=True)
        os.environ["MOBILENET_EMBED_CACHE_DIR"] = str(cache)
        self.shared = shared
        self.shared_model = (model_speed.shared_model(shared)
                             if params.real_model else None)
        self.log = open(self.work / "workers.log", "w")
        self.started = time.monotonic()
        self.results: dict = {"params": params.__dict__}
        self._pool: Pool | None = None

    def model_pool(self) -> Pool:
        """Raw-model workers of the end-to-end models on both runtimes, kept
        through the end-to-end runs (timed between them)."""
        if self._pool is None:
            configs = [Config(model_speed.raw_name(m, r), variant=m, runtime=r)
                       for m in model_speed.MODELS for r in model_speed.RUNTIMES]
            convert_first(configs, self.log)
            self._pool = Pool(configs, self.log)
        return self._pool

    def close_pool(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f} s] {text}", flush=True)

    def photos(self) -> list[Path]:
        found = inputs.sample_photos(self.shared)
        return found or inputs.synthetic_photos(self.work / "synthetic")


# --- sections --------------------------------------------------------------------------

def convert_first(configs: list[Config], log) -> None:
    """Load each ONNX Runtime configuration once, one at a time, in a
    process that then exits: the conversion (TensorFlow and tf2onnx, several
    GB for a moment) is done and cached, and the workers timed afterwards
    load from the cache as a job's workers do, without TensorFlow."""
    for config in configs:
        if config.runtime == "onnxruntime":
            with Pool([config], log):
                pass


def raw_model(b: Bench) -> None:
    """Each model's runtimes interleaved in their own pool (the comparison
    is within a model; one pool of every model would not fit in memory)."""
    b.say("raw model throughput: batch-size sweep, ONNX Runtime and TensorFlow")
    p = b.params
    configs = model_speed.raw_configs(b.shared_model)
    convert_first(configs, b.log)
    groups: dict[str, list[Config]] = {}
    for config in configs:
        groups.setdefault(config.name.rsplit(" on ", 1)[0], []).append(config)
    raw, workers = {}, {"load": {}, "errors": {}}
    for group, members in groups.items():
        with Pool(members, b.log) as pool:
            raw.update(model_speed.raw_sweep(pool, [c.name for c in members],
                                             list(p.batches), p.rounds,
                                             p.seconds))
            found = model_speed.pool_report(pool)
            workers["load"].update(found["load"])
            workers["errors"].update(found["errors"])
            if group.startswith("real ") and b.shared_model:
                b.say("  accuracy of each runtime on the sample photos")
                pixels, labels = model_speed.sample_pixels(
                    b.shared, b.work / "sample224.npy")
                reference = model_speed.raw_name(model_speed.BIG, "tensorflow",
                                                 real=True)
                b.results["runtime_accuracy"] = model_speed.accuracy(
                    pool, [c.name for c in members], reference, pixels,
                    labels, b.work)
        for name in (c.name for c in members):
            if name in raw:
                b.say(f"  {name}: {raw[name]['best_images_per_s']} images/s at "
                      f"batch {raw[name]['best_batch']}")
    b.results["raw"] = raw
    b.results["raw_runtime_ratio"] = model_speed.runtime_ratios(raw)
    b.results["model_workers"] = workers
    for name, r in b.results["raw_runtime_ratio"].items():
        b.say(f"  {name}: ONNX Runtime / TensorFlow {r['at_job_batch']} at "
              f"batch {r['job_batch']}")


def _best_batch(b: Bench, model: str) -> int:
    return b.results.get("raw", {}).get(model_speed.raw_name(model), {}).get(
        "best_batch", 16)


def heads(b: Bench) -> None:
    b.say("logits + features vs logits alone")
    p = b.params
    with Pool(model_speed.head_configs(b.shared_model), b.log) as pool:
        b.results["heads"] = model_speed.heads_cost(
            pool, _best_batch(b, model_speed.BIG), p.rounds + 1, p.seconds)
    b.say(f"  {b.results['heads']['time_ratio_both_over_logits_only']}")


def decode(b: Bench) -> None:
    b.say("decode + resize per core")
    p = b.params
    photos = b.photos()
    folder = b.work / "large"
    sets = {
        "sample": ("sample photos", photos[:p.sample_limit]),
        "large": ("large, upscaled from the sample",
                  inputs.large_photos(folder, photos, p.large_photos)),
        "large_grain": ("large, upscaled + sensor grain (camera-like bytes/pixel)",
                        inputs.large_photos(folder, photos, p.large_photos,
                                            grain=6.0)),
    }
    b.results["decode"] = decode_speed.run(sets, (224, 96), p.decode_rounds)
    for key in ("large", "large_grain"):
        for size, r in b.results["decode"][key]["sizes"].items():
            b.say(f"  {key} at {size}: x{r['speedup']} faster reduced, mean diff "
                  f"{r['difference']['mean_abs_levels']} levels")


def default_case(model: str) -> Case:
    """The command with no layout or runtime options: what a user runs."""
    return Case(f"{model} default (no options)", model)


TENSORFLOW = ("--runtime", "tensorflow")


def case_runtime(case: Case) -> str:
    """What runs the model in `case`: the default unless --runtime says."""
    args = list(case.args)
    if "--runtime" in args:
        return args[args.index("--runtime") + 1]
    return model_speed.DEFAULT_RUNTIME


def _e2e_cases(p: Params) -> list[Case]:
    cases = []
    for model in model_speed.MODELS:
        cases += [default_case(model),
                  Case(f"{model} --runtime tensorflow", model, TENSORFLOW)]
        if p.e2e_layouts:
            cases += [Case(f"{model} single-process", model, SINGLE_PROCESS),
                      Case(f"{model} multi-process (2 workers)", model,
                           MULTI_PROCESS)]
    return cases


def e2e(b: Bench) -> None:
    """Pairs of runs per case; raw model timings (same model, same runtime)
    between them, so that the ratio compares figures from the same minutes."""
    b.say("end to end (the command as a user runs it)")
    p = b.params
    sizes = sorted({*p.e2e_sizes, p.memory_size or 0, p.cold_start_size} - {0})
    sets = {n: inputs.image_set(b.work / "inputs", n, b.photos()) for n in sizes}
    pool = b.model_pool()
    cases = _e2e_cases(p)
    pairs, raw_during = [], {}

    def spot_check(model: str, runtime: str) -> None:
        raw_during.setdefault(f"{model} on {runtime}", []).extend(
            model_speed.spot_check(pool, model_speed.raw_name(model, runtime),
                                   _best_batch(b, model), 2, p.seconds))

    for case in cases:
        spot_check(case.model, case_runtime(case))
        pair = end_to_end.pair(case, sets, p.e2e_sizes, b.work, b.say)
        pairs.append({**pair, "runtime": case_runtime(case)})
    for key in sorted({(c.model, case_runtime(c)) for c in cases}):
        spot_check(*key)
    b.close_pool()
    b.results["e2e"] = {"pairs": pairs, "raw_during": {
        key: {"batch": _best_batch(b, key.split()[0]),
              **model_speed.summarize_spots(v)}
        for key, v in raw_during.items()}}
    memory(b, sets)
    cold_start(b)


def memory(b: Bench, sets: dict[int, Path]) -> None:
    """Peak RSS of the default command at a larger N (the target compares it
    with the N1 run of the same case)."""
    p = b.params
    if not p.memory_size:
        return
    case = default_case(model_speed.BIG)
    b.say(f"  memory: {case.name} at N={p.memory_size}")
    run = end_to_end.quiet_run(case, sets[p.memory_size], p.memory_size, b.work)
    b.results["memory_run"] = end_to_end.as_dict(run)


def cold_start(b: Bench) -> None:
    """Start-up of a first run: the job's model cache empty."""
    p = b.params
    if not p.cold_start_size:
        return
    folder = inputs.image_set(b.work / "inputs", p.cold_start_size, b.photos())
    runs = []
    for model in model_speed.MODELS:
        for name, args in (("default", ()), ("--runtime tensorflow", TENSORFLOW)):
            # Empty: the frozen graph is built and (by default) converted
            # to ONNX within this run's start-up.
            with tempfile.TemporaryDirectory(dir=b.work) as empty:
                case = Case(f"{model} {name}, cold model cache", model, args,
                            env=(("MOBILENET_EMBED_CACHE_DIR", empty),))
                run = end_to_end.quiet_run(case, folder, p.cold_start_size,
                                           b.work)
            b.say(f"  {case.name}: first row at {run.first_row_s} s")
            runs.append(end_to_end.as_dict(run))
    b.results["cold_start"] = runs


def options(b: Bench) -> None:
    b.say("CPU execution options (one process per configuration)")
    p = b.params
    batches = [8, 32]
    out = {}
    pixels = labels = None
    if b.shared_model:
        pixels, labels = model_speed.sample_pixels(b.shared, b.work / "sample224.npy")
    for group, configs in model_speed.option_groups(b.shared_model).items():
        with Pool(configs, b.log) as pool:
            out[group] = model_speed.compare(pool, batches, p.rounds, p.seconds)
            if group.startswith("real") and pixels is not None:
                out[group]["accuracy"] = model_speed.accuracy(
                    pool, list(pool.workers), model_speed.ACCURACY_REFERENCE,
                    pixels, labels, b.work)
        b.say(f"  {group}: " + ", ".join(
            f"{n} {max(r[x]['median'] for x in r):.1f}"
            for n, r in out[group]["rates"].items() if r))
    b.results["options"] = out


def threads(b: Bench) -> None:
    """Thread and process layouts of each runtime (what the launcher should
    set for local runs)."""
    b.say("threads vs processes")
    p = b.params
    out = {}
    for runtime in model_speed.RUNTIMES:
        for model in model_speed.MODELS:
            configs = model_speed.thread_configs(model, runtime)
            convert_first(configs[:1], b.log)
            with Pool(configs, b.log) as pool:
                # At the job's batch size: what the layouts would run.
                out[f"{model} on {runtime}"] = model_speed.threads(
                    pool, [model_speed.job_batch(model)], p.rounds, p.seconds)
            b.say(f"  {model} on {runtime}: " + ", ".join(
                f"{layout} {max(r[x]['median'] for x in r):.1f}"
                for layout, r in out[f"{model} on {runtime}"]["rates"].items() if r))
    b.results["threads"] = out


# --- main ------------------------------------------------------------------------------------

def _plan(only: list[str] | None) -> list:
    """The measuring core by default; the investigations of CPU options and
    thread layouts only where named with --only."""
    steps = [("raw", raw_model), ("heads", heads), ("decode", decode),
             ("e2e", e2e)]
    investigations = [("options", options), ("threads", threads)]
    if not only:
        return steps
    return [(name, fn) for name, fn in steps + investigations if name in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="short smoke run (under 3 minutes)")
    parser.add_argument("--out", type=Path, default=RESULTS,
                        help="results folder (default: benchmarks/results)")
    parser.add_argument("--shared", type=Path, default=env.ROOT.parent / "shared",
                        help="the shared photos and models (default: ../shared)")
    parser.add_argument("--real_model", action="store_true",
                        help="quick mode: time the real-weights model too")
    parser.add_argument("--only", nargs="+", choices=SECTIONS,
                        help="run only these sections (for development)")
    args = parser.parse_args(argv)
    params = QUICK if args.quick else FULL
    if args.real_model:
        params = dataclasses.replace(params, real_model=True)
    bench = Bench(params, args.out.resolve(), args.shared.resolve())
    bench.results["environment"] = env.describe()
    bench.results["environment"]["pipeline_tf_environment"] = \
        workers.pipeline_tf_environment()
    bench.results["mode"] = "quick" if args.quick else "full"
    bench.results["shared"] = {"path": str(bench.shared),
                               "photos": bool(inputs.sample_photos(bench.shared)),
                               "model": bench.shared_model}
    for name, step in _plan(args.only):
        try:
            step(bench)
        except Exception as e:  # one broken section must not lose the others
            bench.say(f"  {name} failed: {type(e).__name__}: {e}")
            bench.results.setdefault("failed_sections", {})[step.__name__] = \
                f"{type(e).__name__}: {e}"
    bench.close_pool()
    bench.results["duration_s"] = round(time.monotonic() - bench.started)
    bench.results["targets"] = report.targets(bench.results)
    write(bench.results, bench.out)
    bench.say(f"wrote {bench.out / 'latest.json'} and {bench.out / 'latest.md'}")
    if not args.quick and not args.only and bench.out == RESULTS:
        # Only a whole full run in the repository's own results speaks for
        # the project in its README.
        if report.update_readme(bench.results):
            bench.say(f"updated the figures in {report.README}")
    print(report.targets_table(bench.results["targets"]))
    return 0


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(report.markdown(results))


if __name__ == "__main__":
    sys.exit(main())
