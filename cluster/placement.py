"""Where the actors go: one placement group per role, sized from the config.

`plan_placement` is pure (used by `--dry-run` and tests); `create_placement_groups` asks Ray for
the bundles. Disaggregated by default: each role has its own group, so changing the number of
text or diffusion workers never changes the learners' placement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.config import R3Config

__all__ = ["RolePlan", "plan_placement", "format_plan", "create_placement_groups", "ROLES"]

ROLES = ("text_workers", "diffusion_workers", "judge_replicas", "text_learners", "diffusion_learners")
ACTOR_PREFIX = {
    "text_workers": "text-worker",
    "diffusion_workers": "diffusion-worker",
    "judge_replicas": "judge",
    "text_learners": "text-learner",
    "diffusion_learners": "diffusion-learner",
}


@dataclass(frozen=True)
class RolePlan:
    role: str
    count: int
    num_cpus: float
    num_gpus: float
    autoscaling: tuple[int, int] | None = None

    @property
    def actor_names(self) -> list[str]:
        return [f"{ACTOR_PREFIX[self.role]}-{i}" for i in range(self.count)]

    @property
    def bundles(self) -> list[dict[str, float]]:
        bundle = {"CPU": self.num_cpus}
        if self.num_gpus:
            bundle["GPU"] = self.num_gpus
        return [dict(bundle) for _ in range(self.count)]


def plan_placement(cfg: R3Config) -> list[RolePlan]:
    plans = []
    for role in ROLES:
        spec = getattr(cfg.cluster, role)
        gpus = spec.num_gpus * getattr(spec, "tensor_parallel_size", 1)
        autoscaling = None
        count = spec.count
        if role == "judge_replicas" and spec.min_replicas is not None:
            autoscaling = (spec.min_replicas, spec.max_replicas)
            count = spec.min_replicas
        plans.append(RolePlan(role, count, spec.num_cpus, gpus, autoscaling))
    return plans


def format_plan(plans: list[RolePlan], strategy: str) -> str:
    lines = [f"placement plan (strategy {strategy}, one placement group per role):"]
    total_cpu = total_gpu = 0.0
    for p in plans:
        scale = f" (autoscaling {p.autoscaling[0]}..{p.autoscaling[1]})" if p.autoscaling else ""
        lines.append(
            f"  {p.role:<19} x{p.count:<3} CPU {p.num_cpus:<5g} GPU {p.num_gpus:<4g} each{scale}  "
            f"[{', '.join(p.actor_names)}]"
        )
        n = p.autoscaling[1] if p.autoscaling else p.count
        total_cpu += n * p.num_cpus
        total_gpu += n * p.num_gpus
    lines.append(f"  total at most: CPU {total_cpu:g}, GPU {total_gpu:g}")
    return "\n".join(lines)


def create_placement_groups(plans: list[RolePlan], strategy: str, timeout_s: float) -> dict[str, Any]:
    """One ready placement group per role (the judge is placed by Serve, so it is skipped)."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {}
    for p in plans:
        if p.role == "judge_replicas":
            continue
        pg = placement_group(p.bundles, strategy=strategy, name=f"r3rl-{p.role}")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise RuntimeError(
                f"placement group for {p.role} ({p.count} x {p.bundles[0]}) not ready after {timeout_s}s: "
                f"the cluster lacks the resources; lower cluster.{p.role} or its num_cpus/num_gpus"
            )
        groups[p.role] = pg
    return groups
