"""Where a step's numbers go: `metrics.jsonl`, TensorBoard, the Ray dashboard (Prometheus), wandb.

One flat dict per step (`stage/name` keys). Rows are written and flushed before the next step
starts, so a killed run loses at most the step in flight.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger", "flatten", "RayGauges"]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


class RayGauges:
    """Numbers as `ray.util.metrics` gauges, visible in the dashboard's Prometheus/Grafana.

    A step row key `section/name` becomes the gauge `r3rl_section_name` tagged `role=section`;
    per-worker numbers (`set_worker`) become `r3rl_worker_name` tagged with role and worker.
    """

    def __init__(self, prefix: str = "r3rl"):
        self.prefix = prefix
        self._gauges: dict[str, Any] = {}

    def set(self, row: dict[str, Any]) -> None:
        for key, value in row.items():
            section, _, name = key.partition("/")
            self._set(f"{section}_{name}" if name else section, value, {"role": section if name else "driver"})

    def set_worker(self, role: str, worker: str, stats: dict[str, Any]) -> None:
        for key, value in stats.items():
            self._set(f"worker_{key}", value, {"role": role, "worker": worker})

    def _set(self, name: str, value: Any, tags: dict[str, str]) -> None:
        from ray.util.metrics import Gauge

        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            return
        metric = re.sub(r"[^a-zA-Z0-9_]", "_", f"{self.prefix}_{name}")
        key = (metric, tuple(sorted(tags)))
        if key not in self._gauges:
            self._gauges[key] = Gauge(metric, description=f"R3RL {name}", tag_keys=tuple(sorted(tags)))
        self._gauges[key].set(float(value), tags=tags)


class MetricsLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, wandb_project: str | None = None, ray_gauges: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        self._wandb = None
        if wandb_project:
            import wandb  # optional dependency: a clear ImportError names it

            self._wandb = wandb.init(project=wandb_project, dir=str(run_dir))
        self._gauges = RayGauges() if ray_gauges else None

    def log(self, step: int, row: dict[str, Any]) -> dict[str, Any]:
        flat = {"step": step, **flatten(row)}
        self._file.write(json.dumps(flat, sort_keys=True, default=_jsonable) + "\n")
        self._file.flush()
        numeric = {k: v for k, v in flat.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if self._tb is not None:
            for k, v in numeric.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)
        if self._gauges is not None:
            self._gauges.set(numeric)
        return flat

    def drop_rows_from(self, step: int) -> int:
        """Forget the rows of steps >= `step` (a resume from a checkpoint of `step` redoes them), so the
        file keeps one row per step; TensorBoard purges its events of those steps too. Returns how many
        rows were dropped."""
        self._file.close()
        lines = self.path.read_text().splitlines(keepends=True) if self.path.is_file() else []
        keep = [ln for ln in lines if _row_step(ln) < step]  # a torn last line (a killed run) goes too
        if len(keep) != len(lines):
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(keep))
            tmp.replace(self.path)
        self._file = self.path.open("a")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self._tb.log_dir
            self._tb.close()
            self._tb = SummaryWriter(log_dir, purge_step=step)
        return len(lines) - len(keep)

    def log_workers(self, role: str, stats: list[dict[str, Any]]) -> None:
        """Per-worker numbers (tokens/s, images/s, weight version, ...) tagged by role and worker."""
        if self._gauges is None:
            return
        for i, st in enumerate(stats):
            self._gauges.set_worker(role, str(st.get("name", i)), flatten(st))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _row_step(line: str) -> float:
    """The step of a metrics.jsonl line; +inf for a line that is not a complete row."""
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf


def _jsonable(x: Any) -> Any:
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
