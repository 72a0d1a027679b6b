"""Elastic rollout workers: `<run>/control.yaml` resizes the worker pools between steps (a `Trainer` mixin).

New workers get the current weights before they serve (`cluster.pools.WorkerPool.resize`); a request
the cluster cannot place, or a file with bad keys or values, is renamed `control.rejected-step-N.yaml`
with the reason logged and the run goes on. Learners never change.
"""

from __future__ import annotations

import logging
from typing import Any

import yaml

__all__ = ["TrainerElastic"]

log = logging.getLogger(__name__)


class TrainerElastic:
    """Needs `cfg`, `roles`, `run_dir`, `step_index` and `console` (a `cluster.driver.Trainer`)."""

    cfg: Any
    roles: Any
    run_dir: Any
    step_index: int
    console: Any


    def resize_workers(self, text_workers: int | None = None, diffusion_workers: int | None = None) -> dict[str, list[int]]:
        """Change rollout worker counts between steps; new workers get the current weights before serving.

        Learners are untouched. Returns the indices of the new workers per role.
        """
        new: dict[str, list[int]] = {}
        for role, pool, count in (("text_workers", self.roles.text_pool, text_workers),
                                  ("diffusion_workers", self.roles.diffusion_pool, diffusion_workers)):
            if count is not None and count != len(pool):
                log.info("resizing %s: %d -> %d", role, len(pool), count)
                new[role] = pool.resize(count)
        return new

    def apply_control_file(self) -> dict[str, list[int]]:
        """`<run>/control.yaml` (e.g. `text_workers: 3`) rescales workers before the next step.

        The file is renamed to `control.applied-step-N.yaml`, or to `.rejected-…` with the reason logged
        (bad keys or values, or more workers than the cluster's free resources can place); the run goes on.
        """
        import ray

        from cluster.placement import resize_requests, resize_shortfall

        path = self.run_dir / "control.yaml"
        if not path.is_file():
            return {}
        stamp = f"step-{self.step_index:06d}"
        try:
            data = yaml.safe_load(path.read_text()) or {}
            allowed = {"text_workers", "diffusion_workers"}
            if not isinstance(data, dict) or set(data) - allowed:
                raise ValueError(f"control.yaml keys must be among {sorted(allowed)}, got {data!r}")
            for key, value in data.items():
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"control.yaml {key}={value!r}: must be an integer >= 1")
            pools = {"text_workers": self.roles.text_pool, "diffusion_workers": self.roles.diffusion_pool}
            shortfall = resize_shortfall(resize_requests(self.cfg, pools, data), ray.available_resources())
            if shortfall is not None:
                raise ValueError(shortfall)
            new = self.resize_workers(**data)
        except (ValueError, RuntimeError, yaml.YAMLError) as e:  # RuntimeError: a new worker's group was not placed
            log.error("rejected %s: %s", path, e)
            self.console.line(f"control.yaml rejected: {e}")
            path.rename(self.run_dir / f"control.rejected-{stamp}.yaml")
            return {}
        path.rename(self.run_dir / f"control.applied-{stamp}.yaml")
        return new

