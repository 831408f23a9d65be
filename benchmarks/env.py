"""The machine and software a result was measured on, and how busy the
machine was while it was measured (other people's processes share the CPU)."""
from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# CPU flags that decide which TensorFlow kernels are fast here.
_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16",
          "amx_tile", "avx_vnni")


def _cpuinfo() -> dict:
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return info


def cpu_description() -> dict:
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name") or platform.processor() or "unknown",
        "family_model": f"{info.get('cpu family', '?')}/{info.get('model', '?')}",
        "cores": len(os.sched_getaffinity(0)),
        "flags": {f: f in flags for f in _FLAGS},
        "bf16_in_hardware": bool(flags & {"avx512_bf16", "amx_bf16"}),
        "memory_gib": round(_mem_total_kib() / 2**20, 1),
    }


def _mem_total_kib() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def versions() -> dict:
    """Versions read from package metadata: importing TF here would start it."""
    from importlib.metadata import PackageNotFoundError, version
    out = {"python": platform.python_version()}
    for name in ("tensorflow", "keras", "apache-beam", "pillow", "numpy",
                 "pyarrow", "tensorflow-hub", "onnxruntime", "onnx", "tf2onnx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10
                              ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def describe() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "os": platform.platform(),
        "cpu": cpu_description(),
        "versions": versions(),
        "git_commit": git_commit(),
        "python_executable": sys.executable,
        "tf_enable_onednn_opts_env": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
    }


# --- how busy the machine was ----------------------------------------------------

def _cpu_busy_seconds() -> float:
    """Busy CPU time of the whole machine (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, idle, iowait, irq, softirq, steal = (
        int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Window:
    """Wall time and machine-wide busy CPU over a measurement."""
    wall_s: float = 0.0
    machine_busy_s: float = 0.0


class Stopwatch:
    """with Stopwatch() as w: ...  -> w.window.wall_s, w.window.machine_busy_s"""

    def __enter__(self):
        self._t0, self._b0 = time.perf_counter(), _cpu_busy_seconds()
        self.window = Window()
        return self

    def __exit__(self, *exc):
        self.window.wall_s = time.perf_counter() - self._t0
        self.window.machine_busy_s = _cpu_busy_seconds() - self._b0
        return False
