"""Targets (PASS/MISS against ratios measured in the same run) and the
Markdown report.

    python -m benchmarks.report [benchmarks/results/latest.json]

re-renders latest.md (and the targets) from a results file.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from benchmarks.model_speed import (BIG, DEFAULT_RUNTIME, MODELS, RUNTIMES,
                                    raw_name)

E2E_RATIO = {MODELS[0]: 0.85, MODELS[1]: 0.6}
# ONNX Runtime over TensorFlow, raw model at 224, the job's batch size.
RUNTIME_SPEEDUP = 1.8
# Accuracy of ONNX Runtime against TensorFlow on the sample photos.
RUNTIME_TOP1_POINTS = 0.5
RUNTIME_MIN_COSINE = 0.9999
START_UP_S = 20.0
DECODE_SPEEDUP = 3.0
HEADS_RATIO = 1.15
RSS_GROWTH = 1.10


def _status(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "MISS")


def _target(name: str, measured, threshold: str, ok: bool | None,
            detail: str = "") -> dict:
    return {"target": name, "measured": measured, "threshold": threshold,
            "status": _status(ok), "detail": detail}


def _raw_reference(results: dict, model: str,
                   runtime: str = DEFAULT_RUNTIME) -> float | None:
    """The raw rate an end-to-end run of `model` on `runtime` is compared
    with: timed between the end-to-end runs where it was, else the sweep's."""
    during = results.get("e2e", {}).get("raw_during", {}).get(
        f"{model} on {runtime}", {})
    if during.get("median"):
        return during["median"]
    return results.get("raw", {}).get(raw_name(model, runtime), {}).get(
        "best_images_per_s")


def e2e_ratio(results: dict, pair: dict) -> dict:
    """The one definition of an end-to-end figure and its ratio, used by the
    targets, the results table and the README: the lower of the two
    marginal estimates (start-up jitter can only flatter the wall-clock
    one) over the raw rate of the same model and runtime."""
    runtime = pair.get("runtime", DEFAULT_RUNTIME)
    raw = _raw_reference(results, pair["model"], runtime)
    marginal = pair["marginal_images_per_s"]
    steady = pair.get("marginal_after_first_row_images_per_s")
    judged = min(r for r in (marginal, steady) if r) if (marginal or steady) \
        else None
    return {"rate": judged, "raw": raw, "runtime": runtime,
            "ratio": round(judged / raw, 2) if judged and raw else None,
            "marginal": marginal, "after_first_row": steady}


def _sample_decode(results: dict, model: str) -> dict:
    """Reduced decode+resize of the sample photos at the model's size (keys
    are ints in a run, strings once read back from JSON)."""
    size = model.rsplit("_", 1)[-1]
    sizes = results.get("decode", {}).get("sample", {}).get("sizes", {})
    return (sizes.get(size) or sizes.get(int(size)) or {}).get("reduced", {})


def ceiling_ratio(results: dict, model: str, raw: float | None,
                  runtime: str = DEFAULT_RUNTIME) -> float | None:
    """The best end-to-end ratio the cores allow: every core busy with
    nothing but decode+resize of the sample photos at the model's size and
    the model itself, at the CPU cost per image of each measured here. A
    target above it cannot be met by trimming pipeline overhead."""
    decode = _sample_decode(results, model).get("ms_per_image")
    model_ms = (results.get("e2e", {}).get("raw_during", {})
                .get(f"{model} on {runtime}", {}).get("cpu_ms_per_image"))
    cores = results.get("environment", {}).get("cpu", {}).get("cores")
    if not (decode and model_ms and cores and raw):
        return None
    return round(1000.0 * cores / (decode + model_ms) / raw, 2)


def e2e_targets(results: dict) -> list[dict]:
    out = []
    for pair in results.get("e2e", {}).get("pairs", []):
        model = pair["model"]
        e = e2e_ratio(results, pair)
        detail = (f"marginal {e['marginal']} images/s, after first row "
                  f"{e['after_first_row']} (the lower is judged) vs raw "
                  f"{e['raw'] and round(e['raw'], 1)} images/s on {e['runtime']}")
        ceiling = ceiling_ratio(results, model, e["raw"], e["runtime"])
        out.append(_target(
            f"end-to-end >= {E2E_RATIO[model]} x raw: {pair['case']}",
            e["ratio"], f">= {E2E_RATIO[model]}",
            None if e["ratio"] is None else e["ratio"] >= E2E_RATIO[model],
            detail + (f"; decode+model bound {ceiling}" if ceiling else "")))
    starts = [(p["case"], p["start_up_s"], f"N={p['runs'][0]['images']} run, "
               "model cache warm") for p in results.get("e2e", {}).get("pairs", [])]
    starts += [(r["case"], r["first_row_s"], f"N={r['images']} run, "
                "model cache empty")
               for r in results.get("cold_start", [])]
    for case, start, detail in starts:
        out.append(_target(f"start-up to first row: {case}", start,
                           f"< {START_UP_S:.0f} s",
                           None if start is None else start < START_UP_S, detail))
    return out


def runtime_targets(results: dict) -> list[dict]:
    """ONNX Runtime vs TensorFlow: speed of the raw model at 224, and the
    accuracy of the real weights on the sample photos."""
    out = []
    for name, r in results.get("raw_runtime_ratio", {}).items():
        if not r["model"].endswith("_224"):
            continue
        ratio = r["at_job_batch"]
        out.append(_target(
            f"ONNX Runtime >= {RUNTIME_SPEEDUP} x TensorFlow, raw: {name}",
            ratio, f">= {RUNTIME_SPEEDUP}",
            None if ratio is None else ratio >= RUNTIME_SPEEDUP,
            f"batch {r['job_batch']} (the job's default); all batches: "
            f"{r['by_batch']}"))
    accuracy = results.get("runtime_accuracy", {})
    for name, m in accuracy.get("modes", {}).items():
        if name == accuracy.get("reference"):
            continue
        ok = (abs(m["top1_delta_points"]) <= RUNTIME_TOP1_POINTS
              and m["min_feature_cosine"] >= RUNTIME_MIN_COSINE)
        out.append(_target(
            f"same accuracy as TensorFlow: {name}", m["top1_percent"],
            f"top-1 within {RUNTIME_TOP1_POINTS} points, feature cosine >= "
            f"{RUNTIME_MIN_COSINE}", ok,
            f"{accuracy['images']} sample photos; TensorFlow top-1 "
            f"{accuracy['modes'][accuracy['reference']]['top1_percent']} %; "
            f"min cosine {m['min_feature_cosine']}; max |logit diff| "
            f"{m['max_logit_abs_diff']}"))
    return out


def decode_targets(results: dict) -> list[dict]:
    decode = results.get("decode", {})
    out = []
    for key in ("large", "large_grain"):
        for size, r in decode.get(key, {}).get("sizes", {}).items():
            diff = r["difference"]
            out.append(_target(
                f"decode+resize >= {DECODE_SPEEDUP:.0f}x a full decode at {size}: "
                f"{decode[key]['name']}",
                r["speedup"], f">= {DECODE_SPEEDUP} and mean diff <= "
                f"{decode['tolerance_mean_levels']}",
                r["speedup"] >= DECODE_SPEEDUP and diff["within_tolerance"],
                f"{r['reduced']['per_core_images_per_s']} vs "
                f"{r['full']['per_core_images_per_s']} images/s per core; mean diff "
                f"{diff['mean_abs_levels']} (worst image "
                f"{diff['worst_image_mean_abs_levels']}, max {diff['max_abs_levels']}) "
                f"levels; {decode[key]['bytes_per_pixel']} bytes/pixel"))
    return out


def heads_targets(results: dict) -> list[dict]:
    ratios = results.get("heads", {}).get("time_ratio_both_over_logits_only", {})
    return [_target(f"logits+features <= {HEADS_RATIO} x logits alone: {name}",
                    ratio, f"<= {HEADS_RATIO}", ratio <= HEADS_RATIO)
            for name, ratio in ratios.items()]


def _memory_pairs(results: dict) -> list[tuple[dict, dict]]:
    """(smaller run, larger run) of the same command: N1 and N2 of every
    pair, and N1 with the memory run."""
    pairs = results.get("e2e", {}).get("pairs", [])
    out = [(p["runs"][0], p["runs"][1]) for p in pairs]
    big = results.get("memory_run")
    if big:
        out += [(p["runs"][0], big) for p in pairs if p["case"] == big["case"]]
    return out


def memory_targets(results: dict) -> list[dict]:
    """The memory run against N1 of its command; without one (quick mode),
    every pair's N2 against its N1."""
    pairs = _memory_pairs(results)
    if results.get("memory_run"):
        pairs = pairs[-1:]
    out = []
    for small, big in pairs:
        growth = round(big["peak_rss_mb"] / small["peak_rss_mb"], 3)
        out.append(_target(
            f"peak RSS flat from {small['images']} to {big['images']} images: "
            f"{small['case']}", growth, f"<= {RSS_GROWTH}", growth <= RSS_GROWTH,
            f"{small['peak_rss_mb']} MB -> {big['peak_rss_mb']} MB"))
    return out


def targets(results: dict) -> list[dict]:
    return (runtime_targets(results) + e2e_targets(results)
            + decode_targets(results) + heads_targets(results)
            + memory_targets(results))


# --- Markdown -------------------------------------------------------------------------------

def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |"
              for row in rows]
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    return _table(["target", "measured", "threshold", "status", "detail"],
                  [[t["target"], t["measured"], t["threshold"],
                    f"**{t['status']}**", t["detail"]] for t in rows])


def _environment(results: dict) -> str:
    e = results["environment"]
    cpu, v = e["cpu"], e["versions"]
    flags = ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in cpu["flags"].items())
    return "\n".join([
        f"- date: {e['date']}; mode: {results['mode']}; duration "
        f"{results.get('duration_s')} s; commit {e['git_commit']}",
        f"- CPU: {cpu['model']} (family/model {cpu['family_model']}), "
        f"{cpu['cores']} cores, {cpu['memory_gib']} GiB; {flags}",
        f"- bfloat16 in hardware: {'yes' if cpu['bf16_in_hardware'] else 'no'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- TF_ENABLE_ONEDNN_OPTS in the benchmark's environment: "
        f"{e['tf_enable_onednn_opts_env']!r}; the job sets for TensorFlow: "
        f"{e.get('pipeline_tf_environment') or 'nothing'} (the raw-model "
        "baselines get the same); shared data: "
        f"{'yes' if results['shared']['photos'] else 'no (generated JPEGs)'}, "
        f"real model: {'yes' if results['shared']['model'] else 'no'}",
    ])


def _raw(results: dict) -> str:
    raw = results.get("raw", {})
    if not raw:
        return "not measured"
    batches = sorted({int(b) for r in raw.values() for b in r["by_batch"]})
    rows = [[name] + [_rate(r["by_batch"].get(b) or r["by_batch"].get(str(b)))
                      for b in batches]
            + [f"**{r['best_images_per_s']}** @ {r['best_batch']}"]
            for name, r in raw.items()]
    text = _table(["model (LoadedModel.predict)"] + [f"batch {b}" for b in batches]
                  + ["best"], rows)
    ratios = results.get("raw_runtime_ratio", {})
    if ratios:
        rows = [[name] + [(r["by_batch"].get(b) or r["by_batch"].get(str(b)))
                          for b in batches] + [r["job_batch"]]
                for name, r in ratios.items()]
        text += ("\n\nONNX Runtime's rate over TensorFlow's (medians of the "
                 "same interleaved rounds):\n\n"
                 + _table(["model"] + [f"batch {b}" for b in batches]
                          + ["job's batch"], rows))
    loads = results.get("model_workers", {}).get("load", {})
    if loads:
        text += ("\n\nLoad time of each worker (s; all loading at once, so "
                 "only indicative): " + ", ".join(
                     f"{n} {v.get('load_s') and round(v['load_s'], 1)}"
                     for n, v in loads.items()))
    return text


def _runtime_accuracy(results: dict) -> str:
    a = results.get("runtime_accuracy")
    if not a or "modes" not in a:
        return (a or {}).get("skipped", "not measured (needs ../shared)")
    return (f"{a['images']} sample photos, decoded as the job does, real "
            f"{BIG} weights; cosine and logit differences against "
            f"'{a['reference']}'.\n\n" + _table(
                ["runtime", "top-1 %", "delta points", "min feature cosine",
                 "mean feature cosine", "max |logit diff|"],
                [[n, m["top1_percent"], m["top1_delta_points"],
                  m["min_feature_cosine"], m["mean_feature_cosine"],
                  m["max_logit_abs_diff"]] for n, m in a["modes"].items()]))


def _rate(cell: dict | None) -> str:
    """A median rate; † where no timing of it had a quiet machine."""
    if not cell:
        return ""
    return f"{cell['median']:.1f}" + ("" if cell.get("quiet", True) else " †")


def _heads(results: dict) -> str:
    h = results.get("heads")
    if not h:
        return "not measured"
    rows = [[name, _rate(r), f"{r['cpu_ms_per_image']:.1f}"]
            for name, r in h["rates"].items()]
    return (f"Batch {h['batch']}.\n\n" + _table(
        ["configuration", "images/s", "CPU ms/image"], rows))


def _decode(results: dict) -> str:
    d = results.get("decode")
    if not d:
        return "not measured"
    rows = []
    for key in ("sample", "large", "large_grain"):
        s = d[key]
        for size, r in s["sizes"].items():
            diff = r["difference"]
            rows.append([f"{s['name']} ({s['images']}; {s['mean_megapixels']} MP, "
                         f"{s['mean_file_mb']} MB, {s['bytes_per_pixel']} B/px avg)",
                         size, r["reduced"]["per_core_images_per_s"],
                         r["full"]["per_core_images_per_s"], f"x{r['speedup']}",
                         diff["mean_abs_levels"], diff["worst_image_mean_abs_levels"],
                         diff["max_abs_levels"]])
    return _table(["images", "size", "reduced (default) img/s/core",
                   "full decode img/s/core", "speedup", "mean |diff|",
                   "worst image mean", "max |diff|"], rows)


def _e2e(results: dict) -> str:
    e = results.get("e2e")
    if not e:
        return "not measured"
    rows = []
    for p in e["pairs"]:
        r1, r2 = p["runs"]
        ratio = e2e_ratio(results, p)
        rows.append([p["case"], ratio["runtime"],
                     f"{r1['images']}: {r1['wall_s']} s",
                     f"{r2['images']}: {r2['wall_s']} s",
                     p["marginal_images_per_s"],
                     p.get("marginal_after_first_row_images_per_s"),
                     f"**{ratio['rate']}**", p["in_run_images_per_s"],
                     ratio["raw"] and round(ratio["raw"], 1), ratio["ratio"],
                     f"{p['marginal_cpu_ms_per_image']} / "
                     f"{_raw_cpu(results, p['model'], ratio['runtime'])}",
                     p["start_up_s"], f"{r1['peak_rss_mb']} / {r2['peak_rss_mb']} "
                     f"({r2['peak_rss_launcher_mb']})",
                     p["bytes_per_image"],
                     f"{r1['foreign_load']} / {r2['foreign_load']}"])
    during = "; ".join(f"{m}: {v.get('runs')} at batch {v['batch']}"
                       for m, v in e["raw_during"].items())
    return (_table(["case", "runtime", "N1 wall", "N2 wall", "marginal img/s",
                    "marginal after first row", "judged img/s (the lower)",
                    "in-run img/s", "raw img/s (same minutes, same runtime)",
                    "ratio (judged / raw)", "CPU ms/img e2e / raw",
                    "start-up s", "peak RSS MB N1/N2 (launcher)",
                    "Parquet bytes/image", "foreign load N1/N2"],
                   rows)
            + f"\n\nRaw timings taken between the runs: {during}.")


def _raw_cpu(results: dict, model: str, runtime: str = DEFAULT_RUNTIME
             ) -> float | None:
    cpu = results.get("e2e", {}).get("raw_during", {}).get(
        f"{model} on {runtime}", {}).get("cpu_ms_per_image")
    return round(cpu, 2) if cpu else None


def _memory(results: dict) -> str:
    rows = [[s["case"], s["images"], s["peak_rss_mb"], b["images"], b["peak_rss_mb"],
             round(b["peak_rss_mb"] / s["peak_rss_mb"], 3)]
            for s, b in _memory_pairs(results)]
    return _table(["case", "N", "peak RSS MB", "N", "peak RSS MB", "growth"], rows) \
        if rows else "not measured"


def _options(results: dict) -> str:
    o = results.get("options")
    if not o:
        return "not measured (quick mode)"
    parts = []
    for group, g in o.items():
        rows = [[name] + [_rate(by_batch.get(b) or by_batch.get(str(b)))
                          for b in (8, 32)]
                + [f"{(by_batch.get(8) or by_batch.get('8') or {}).get('cpu_ms_per_image', 0):.1f}",
                   g["load"].get(name, {}).get("onednn")]
                for name, by_batch in g["rates"].items() if by_batch]
        rows += [[name, "failed", "", "", error[:120]]
                 for name, error in g.get("errors", {}).items()]
        parts.append(f"**{group}** (images/s, medians of interleaved timings)\n\n"
                     + _table(["configuration", "batch 8", "batch 32",
                               "CPU ms/img @8", "oneDNN"], rows))
        if "accuracy" in g and "modes" in g["accuracy"]:
            a = g["accuracy"]
            parts.append(
                f"Accuracy guard on {a['images']} sample photos, against "
                f"'{a['reference']}' (float32): top-1 within 0.5 points, feature "
                "cosine >= 0.999\n\n" + _table(
                    ["mode", "top-1 %", "delta points", "min cosine",
                     "mean cosine", "guard"],
                    [[n, m["top1_percent"], m["top1_delta_points"],
                      m["min_feature_cosine"], m["mean_feature_cosine"],
                      "PASS" if m["passes"] else "FAIL"]
                     for n, m in a["modes"].items()]))
    return "\n\n".join(parts)


def _threads(results: dict) -> str:
    t = results.get("threads")
    if not t:
        return "not measured (quick mode)"
    rows = []
    for model, g in t.items():
        for layout, by_batch in g["rates"].items():
            if by_batch:
                rows.append([model, layout, ", ".join(
                    f"{_rate(cell)} @ {b}" for b, cell in by_batch.items())])
    return _table(["model", "layout", "total images/s @ batch"], rows)


def _targets_notes(results: dict) -> str:
    notes = ["*Decode+model bound*: the end-to-end ratio the cores would give "
             "if they did nothing but decode+resize the sample photos and run "
             "the model: cores x 1000 / (decode CPU ms/image + model CPU "
             "ms/image) over the raw rate, each cost measured in this run. "
             "Where a target is above it, no trimming of pipeline overhead "
             "can meet it."]
    if results.get("mode") == "quick":
        notes.append("*Quick mode*: end-to-end pairs of a few hundred images "
                     "are a smoke test; their marginal rates swing with "
                     "start-up noise. Use the full run's figures.")
    return "\n\n".join(notes)


def markdown(results: dict) -> str:
    failed = results.get("failed_sections")
    return "\n\n".join(filter(None, [
        f"# Throughput benchmark ({results['mode']})",
        _environment(results),
        "## Targets\n\n" + targets_table(results.get("targets", [])),
        _targets_notes(results),
        f"Failed sections: {failed}" if failed else "",
        "## Raw model throughput (images/s)\n\n" + _raw(results),
        "## Accuracy of each runtime\n\n" + _runtime_accuracy(results),
        "## Logits + features vs logits alone\n\n" + _heads(results),
        "## Decode + resize, one core\n\n" + _decode(results),
        "## End to end (`python -m pipeline run ... --model_source random`)\n\n"
        + _e2e(results),
        "## Peak memory\n\n" + _memory(results),
        "## CPU execution options (TensorFlow; `--only options`)\n\n"
        + _options(results) if results.get("options") else "",
        "## Threads vs processes (`--only threads`)\n\n" + _threads(results)
        if results.get("threads") else "",
        f"† no timing of this figure had a quiet machine (other processes kept "
        f"more than 0.3 cores busy); \"foreign load\" is that load in cores. See "
        f"benchmarks/README.md for how each figure is measured. {BIG} is the "
        "default model; random weights unless marked real; the runtime is "
        "the one named (the job's default runs ONNX Runtime).",
    ])) + "\n"


README = Path(__file__).resolve().parent.parent / "README.md"
README_START = "<!-- benchmark:start (written by python -m benchmarks.run) -->"
README_END = "<!-- benchmark:end -->"


def _cpu_features(cpu: dict) -> str:
    """What this run's CPU has, from its flags (never a fixed sentence)."""
    flags = cpu.get("flags", {})
    avx512 = "AVX-512" if flags.get("avx512f") else "no AVX-512"
    avx2 = "AVX2" if flags.get("avx2") else "no AVX2"
    bf16 = ("bfloat16 hardware" if cpu.get("bf16_in_hardware")
            else "no bfloat16 hardware")
    return f"{avx2}, {avx512}, {bf16}"


def _raw_at(results: dict, name: str, batch: int) -> float | None:
    cell = results.get("raw", {}).get(name, {}).get("by_batch", {})
    cell = cell.get(batch) or cell.get(str(batch))
    return round(cell["median"], 1) if cell else None


def findings(results: dict) -> list[str]:
    """Sentences about the figures, each computed from this run's figures;
    none where a figure is missing."""
    from benchmarks.model_speed import job_batch
    out = []
    ratios = results.get("raw_runtime_ratio", {})
    parts = [f"{r['at_job_batch']} x for {name}" for name, r in ratios.items()
             if r.get("at_job_batch")]
    if parts:
        out.append("ONNX Runtime over TensorFlow, raw model at the job's "
                   "batch size: " + "; ".join(parts) + ".")
    for runtime in RUNTIMES:
        batch = job_batch(BIG)
        real = _raw_at(results, raw_name(BIG, runtime, real=True), batch)
        rand = _raw_at(results, raw_name(BIG, runtime), batch)
        if real and rand:
            out.append(f"Real {BIG} weights on {runtime}: {real} images/s "
                       f"against {rand} with random weights at batch {batch} "
                       f"({real / rand:.2f} x).")
    accuracy = results.get("runtime_accuracy", {}).get("modes", {})
    if accuracy:
        out.append("Top-1 on the sample photos: " + "; ".join(
            f"{n} {m['top1_percent']} %" for n, m in accuracy.items())
            + "; smallest feature cosine between the runtimes "
            + f"{min(m['min_feature_cosine'] for m in accuracy.values())}.")
    pairs = results.get("e2e", {}).get("pairs", [])
    for pair in pairs:
        e = e2e_ratio(results, pair)
        ceiling = ceiling_ratio(results, pair["model"], e["raw"], e["runtime"])
        # Said only where the bound itself is below the target and the run
        # comes near it: then decoding, not the pipeline, holds it back.
        if e["ratio"] is not None and ceiling is not None and (
                ceiling < E2E_RATIO[pair["model"]]
                and e["ratio"] >= 0.9 * ceiling):
            out.append(f"{pair['case']} reaches {e['ratio']} x its raw model "
                       f"rate, against {ceiling} x if the cores did nothing "
                       "but decode and run the model: bound by decoding.")
    return out


def readme_block(results: dict) -> str:
    """The README's figures: the machine, the headline figures per model,
    what follows from them (computed) and the targets, from one full run."""
    from benchmarks.model_speed import RAW_MODELS, job_batch
    e = results["environment"]
    cpu, v = e["cpu"], e["versions"]
    pairs = {p["case"]: p for p in results.get("e2e", {}).get("pairs", [])}
    memory = results.get("memory_run")
    accuracy = results.get("runtime_accuracy", {}).get("modes", {})

    def e2e(model: str, case: str) -> str:
        p = pairs.get(f"{model} {case}")
        if not p:
            return "n/a"
        r = e2e_ratio(results, p)
        if not r["rate"] or not r["ratio"]:
            return "n/a"
        return f"{r['rate']:.0f} ({r['ratio']:.2f} x raw)"

    def row(label: str, fn) -> list:
        return [label] + [fn(m) for m in RAW_MODELS]

    def raw(runtime: str, real: bool = False):
        def cell(m: str) -> str:
            rate = _raw_at(results, raw_name(m, runtime, real), job_batch(m))
            return "n/a" if rate is None else f"{rate} (batch {job_batch(m)})"
        return cell

    def ratio(m: str) -> str:
        r = results.get("raw_runtime_ratio", {}).get(f"random {m}", {})
        return str(r.get("at_job_batch") or "n/a")

    def top1(runtime: str):
        def cell(m: str) -> str:
            a = accuracy.get(raw_name(m, runtime, real=True))
            return f"{a['top1_percent']} %" if a else "n/a"
        return cell

    def start(m: str) -> str:
        p = pairs.get(f"{m} default (no options)", {})
        cold = {r["case"]: r["first_row_s"] for r in results.get("cold_start", [])}
        if not p:
            return "n/a"
        return (f"{p.get('start_up_s')} / {cold.get(f'{m} default, cold model cache')}"
                f" / {cold.get(f'{m} --runtime tensorflow, cold model cache')}")

    def decode(m: str) -> str:
        d = _sample_decode(results, m)
        return f"{d.get('per_core_images_per_s')} ({d.get('ms_per_image')} ms)" \
            if d else "n/a"

    def rss(m: str) -> str:
        p = pairs.get(f"{m} default (no options)")
        if not p:
            return "n/a"
        text = f"{p['runs'][0]['peak_rss_mb']:.0f} / {p['runs'][1]['peak_rss_mb']:.0f}"
        if memory and memory["case"] == p["case"]:
            text += f" / {memory['peak_rss_mb']:.0f}"
        return text

    def size(m: str) -> str:
        p = pairs.get(f"{m} default (no options)")
        return str(p.get("bytes_per_image")) if p else "n/a"

    n1, n2 = results["params"]["e2e_sizes"]
    rows = [
        row("raw model on ONNX Runtime (the default), images/s", raw("onnxruntime")),
        row("raw model on TensorFlow, images/s", raw("tensorflow")),
        row("ONNX Runtime / TensorFlow, raw", ratio),
        row("raw model, real weights, ONNX Runtime / TensorFlow, images/s",
            lambda m: " / ".join(raw(r, True)(m) for r in RUNTIMES)
            if m == BIG else "n/a"),
        row("top-1 on the sample photos, real weights: ONNX Runtime",
            top1("onnxruntime")),
        row("top-1 on the sample photos, real weights: TensorFlow",
            top1("tensorflow")),
        row("end to end, the default command: images/s (x raw)",
            lambda m: e2e(m, "default (no options)")),
        row("end to end, `--runtime tensorflow`: images/s (x raw)",
            lambda m: e2e(m, "--runtime tensorflow")),
        row("end to end, one process (`--direct_running_mode in_memory`)",
            lambda m: e2e(m, "single-process")),
        row("start-up to first row, s: cache warm / cold / cold with "
            "`--runtime tensorflow`", start),
        row("decode+resize of a sample photo, images/s per core", decode),
        row(f"peak RSS MB, {n1} / {n2}" + (f" / {memory['images']}" if memory else "")
            + " images (all processes)", rss),
        row("Parquet bytes per image", size),
    ]
    misses = [t for t in results.get("targets", []) if t["status"] == "MISS"]
    said = findings(results)
    if not any(name.endswith(" on onnxruntime") for name in results.get("raw", {})):
        said.insert(0, "This run has no ONNX Runtime figure: TensorFlow ran "
                       "every model in it (before the runtime choice, or "
                       "onnxruntime absent).")
    return "\n\n".join(filter(None, [
        f"Measured {e['date'][:10]} at commit {e['git_commit']} on {cpu['model']}, "
        f"{cpu['cores']} cores, {cpu['memory_gib']} GiB ({_cpu_features(cpu)}), "
        f"TensorFlow {v.get('tensorflow')}, ONNX Runtime "
        f"{v.get('onnxruntime') or 'not installed'} (tf2onnx "
        f"{v.get('tf2onnx') or 'not installed'}), Beam {v.get('apache-beam')}; random "
        "weights unless marked real. Raw rates are at the batch size the job "
        "uses by default; end-to-end images/s are the lower of the two "
        "marginal estimates, and their ratio is to the raw rate of the same "
        "model on the same runtime measured between the end-to-end runs.",
        _table(["", *RAW_MODELS], rows),
        "\n".join(f"* {line}" for line in said) if said else "",
        f"Targets: {sum(t['status'] == 'PASS' for t in results.get('targets', []))} "
        f"met, {len(misses)} missed.",
        targets_table(results.get("targets", [])),
    ]))


def update_readme(results: dict, readme: Path = README) -> bool:
    """Replace the README's benchmark block; False where it has none."""
    try:
        text = readme.read_text()
    except OSError:
        return False
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    readme.write_text(text[:start + len(README_START)] + "\n\n"
                      + readme_block(results) + "\n\n" + text[end:])
    return True


def upgrade(results: dict) -> dict:
    """Results of a run from before the runtime choice (TensorFlow ran every
    model) in today's names, so that they re-render truthfully."""
    if any(" on " in name for name in results.get("raw", {})):
        return results
    results["raw"] = {f"{name} on tensorflow": r
                      for name, r in results.get("raw", {}).items()}
    e2e = results.get("e2e", {})
    for pair in e2e.get("pairs", []):
        pair.setdefault("runtime", "tensorflow")
    if "raw_during" in e2e:
        e2e["raw_during"] = {f"{m} on tensorflow": v
                             for m, v in e2e["raw_during"].items()}
    return results


def main(argv: list[str]) -> int:
    path = Path(argv[0] if argv else Path(__file__).parent / "results" / "latest.json")
    results = upgrade(json.loads(path.read_text()))
    results["targets"] = targets(results)
    path.write_text(json.dumps(results, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(results))
    if results.get("mode") == "full" and path.parent == Path(__file__).parent / "results":
        update_readme(results)
    print(targets_table(results["targets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
