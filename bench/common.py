"""Shared pieces of the benchmarks: environment, machine description, timing proxies, memory readings.

Every benchmark records where it ran (CPU model, core count, load average, commit, date) with its
figures, because on a shared machine the absolute numbers move with the neighbours; only ratios
measured side by side in one run compare two things fairly.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:  # run as a script (`make bench`): make the project importable
    sys.path.insert(0, str(ROOT))

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
       "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray starts its worker processes at niceness 15, a process of its own runs at 0: on a machine shared with
# other jobs that alone slows the Ray side of a Ray-vs-one-process comparison. The benchmarks run both at 0.
ENV["RAY_worker_niceness"] = "0"
for _key, _value in ENV.items():
    os.environ.setdefault(_key, _value)


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), or the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def uncommitted_changes() -> bool:
    """Whether the checkout differs from its commit (tracked files): the figures then measure more than it."""
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                             text=True, timeout=10)
        return bool(out.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return False


def machine() -> dict[str, Any]:
    """Where and when a figure was measured."""
    return {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "loadavg": list(os.getloadavg()), "commit": commit(),
            "uncommitted_changes": uncommitted_changes(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_result(name: str, result: dict[str, Any]) -> Path:
    """bench/results/<name>.json with the machine description added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2, default=float))
    print(f"wrote {path}")
    return path


class CallTimes:
    """Seconds the caller spent inside each named role's calls (thread-safe: learners and one-step-off
    rollouts call from threads)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds
            self.calls[key] += 1

    def take(self) -> dict[str, float]:
        """The seconds so far per key, and reset."""
        with self._lock:
            out = dict(self.seconds)
            self.seconds.clear()
            self.calls.clear()
        return out


class Timed:
    """A role (`Reasoner`, `Generator`, `Judge`) whose `methods` calls are timed into `times[key]`."""

    def __init__(self, inner: Any, key: str, times: CallTimes, methods: tuple[str, ...]):
        self._inner, self._key, self._times, self._methods = inner, key, times, methods

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._times.add(self._key, time.perf_counter() - start)

        return timed


def memory_of(pid: int) -> dict[str, float]:
    """Resident (VmRSS) and peak resident (VmHWM) memory of a process, in MiB (Linux /proc)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[{"VmRSS": "rss_mib", "VmHWM": "peak_rss_mib"}[key]] = int(value.split()[0]) / 1024
    return out


def linear_fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares y = a + b·x with R² and the largest relative residual (is growth linear?)."""
    import numpy as np

    x, y = np.asarray(xs, float), np.asarray(ys, float)
    b, a = np.polyfit(x, y, 1)
    pred = a + b * x
    ss_res, ss_tot = float(((y - pred) ** 2).sum()), float(((y - y.mean()) ** 2).sum())
    return {"intercept_s": float(a), "slope_s": float(b), "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0,
            "max_rel_residual": float(np.max(np.abs(y - pred) / np.maximum(np.abs(y), 1e-9)))}
