"""The benchmark report says only what its run measured."""
from __future__ import annotations

from benchmarks import report

BIG, SMALL = "mobilenet_v2_100_224", "mobilenet_v2_035_96"


def _cell(median: float) -> dict:
    return {"median": median, "quiet": True, "runs": [median],
            "cpu_ms_per_image": 10.0, "foreign_load": 0.0}


def _results(avx512: bool) -> dict:
    pair = {"case": f"{BIG} default (no options)", "model": BIG,
            "runtime": "onnxruntime", "marginal_images_per_s": 92.0,
            "marginal_after_first_row_images_per_s": 80.0,
            "in_run_images_per_s": 85.0, "start_up_s": 7.5,
            "marginal_cpu_ms_per_image": 21.0, "bytes_per_image": 8000,
            "runs": [{"case": "c", "images": 1000, "wall_s": 20.0, "peak_rss_mb": 900.0,
                      "peak_rss_launcher_mb": 300.0, "foreign_load": 0.0},
                     {"case": "c", "images": 3000, "wall_s": 45.0, "peak_rss_mb": 910.0,
                      "peak_rss_launcher_mb": 300.0, "foreign_load": 0.0}]}
    return {
        "mode": "full", "params": {"e2e_sizes": [1000, 3000]},
        "environment": {
            "date": "2026-11-28T00:00:00", "git_commit": "abc",
            "cpu": {"model": "Some CPU", "cores": 2, "memory_gib": 8,
                    "flags": {"avx2": True, "avx512f": avx512},
                    "bf16_in_hardware": False},
            "versions": {"tensorflow": "2.21.0", "onnxruntime": "1.32.0"}},
        "raw": {
            f"random {BIG} on onnxruntime": {"by_batch": {16: _cell(90.0)},
                                             "best_batch": 16, "best_images_per_s": 90.0},
            f"random {BIG} on tensorflow": {"by_batch": {16: _cell(50.0)},
                                            "best_batch": 16, "best_images_per_s": 50.0},
            f"real {BIG} on onnxruntime": {"by_batch": {16: _cell(99.0)},
                                           "best_batch": 16, "best_images_per_s": 99.0},
        },
        "raw_runtime_ratio": {f"random {BIG}": {
            "model": BIG, "job_batch": 16, "at_job_batch": 1.8,
            "by_batch": {16: 1.8}}},
        "e2e": {"pairs": [pair], "raw_during": {
            f"{BIG} on onnxruntime": {"batch": 16, "median": 100.0,
                                      "cpu_ms_per_image": 10.0, "runs": [100.0]}}},
    }


def test_one_end_to_end_ratio_for_the_table_the_targets_and_the_readme():
    results = _results(avx512=False)
    results["targets"] = report.targets(results)
    (target,) = [t for t in results["targets"] if t["target"].startswith("end-to-end")]
    # The lower of 92 and 80 images/s, over the 100 of the same runtime.
    assert target["measured"] == 0.8 and target["status"] == "MISS"
    row = next(line for line in report._e2e(results).splitlines()
               if line.startswith(f"| {BIG} default"))
    assert "| **80.0** |" in row and "| 0.8 |" in row
    assert "80 (0.80 x raw)" in report.readme_block(results)


def test_sentences_follow_the_runs_figures():
    plain = report.readme_block(_results(avx512=False))
    assert "(AVX2, no AVX-512, no bfloat16 hardware)" in plain
    wide = report.readme_block(_results(avx512=True))
    assert "(AVX2, AVX-512, no bfloat16 hardware)" in wide
    # Real against random weights, as measured: 99 / 90.
    assert "99.0 images/s against 90.0 with random weights at batch 16 (1.10 x)" in plain
    # The runtime target judges the ratio the run measured.
    (target,) = [t for t in report.runtime_targets(_results(False))]
    assert target["measured"] == 1.8 and target["status"] == "PASS"
