"""Where the actors go: one placement group per role, sized from the config.

`plan_placement` is pure (used by `--dry-run` and tests); `create_placement_groups` asks Ray for
the bundles and returns one `RolePlacement` per placed role: actor i of a role runs in bundle i of
its role's group. Disaggregated by default: each role has its own group, so changing the number of
text or diffusion workers never changes the learners' placement.

The judge replicas are not placed here: Ray Serve places its replicas itself (and restarts and
autoscales them), so `PLACED_ROLES` leaves them out. Neither are text workers with GPU tensor
parallelism (`RolePlan.unplaced_reason`): inside a placement group vLLM switches to its Ray backend
and spreads its tensor-parallel workers over that group's GPU bundles, which one bundle per worker
does not provide; such workers keep plain resource requests (logged as a warning).

Elastic workers: a replaced worker reuses its bundle. A worker added beyond the role's group gets
a one-bundle group of its own (same resources, named `r3rl-<role>-<index>`), created and waited for
when the worker is added and removed when the pool shrinks again; so every worker always runs
inside a reservation, and the role's main group (hence the learners' placement) never changes.
`resize_shortfall` (pure) says before a resize whether the cluster's free resources can hold it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from cluster.config import R3Config

__all__ = [
    "RolePlan", "RolePlacement", "plan_placement", "format_plan", "create_placement_groups", "actor_placement",
    "ResizeRequest", "resize_requests", "resize_shortfall", "ROLES", "PLACED_ROLES",
]

log = logging.getLogger(__name__)

ROLES = ("text_workers", "diffusion_workers", "judge_replicas", "text_learners", "diffusion_learners")
# Roles that get a placement group from `create_placement_groups` (Serve places the judge replicas).
PLACED_ROLES = ("text_workers", "diffusion_workers", "text_learners", "diffusion_learners")
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
    unplaced_reason: str | None = None  # why the role gets no placement group (None: it gets one)

    @property
    def actor_names(self) -> list[str]:
        return [f"{ACTOR_PREFIX[self.role]}-{i}" for i in range(self.count)]

    @property
    def bundle(self) -> dict[str, float]:
        """One actor's reservation (zero amounts left out: Ray refuses them in bundles)."""
        return {k: v for k, v in (("CPU", self.num_cpus), ("GPU", self.num_gpus)) if v > 0}

    @property
    def bundles(self) -> list[dict[str, float]]:
        return [self.bundle for _ in range(self.count)]


class ResizeRequest(NamedTuple):
    """One pool's part of an elastic resize: `bundle` is one worker's resources; the first `reserved`
    workers run in the role's own placement group (already reserved), the others in groups of their own."""

    role: str
    bundle: Mapping[str, float]
    reserved: int
    current: int
    requested: int


def resize_shortfall(requests: Sequence[ResizeRequest], available: Mapping[str, float]) -> str | None:
    """Why the resize cannot be placed, or None if the cluster's free resources hold it.

    Workers beyond a role's reserved bundles need new resources (one bundle each); removing such
    workers gives theirs back, so one pool may shrink to make room for another. `available`: free
    resources by name (`ray.available_resources()`).
    """
    need: dict[str, float] = {}
    for r in requests:
        outside = max(0, r.requested - r.reserved) - max(0, r.current - r.reserved)
        for name, amount in r.bundle.items():
            need[name] = need.get(name, 0.0) + outside * amount
    short = {k: v for k, v in need.items() if v > available.get(k, 0.0) + 1e-9}
    if not short:
        return None
    asked = ", ".join(f"{r.role}: {r.requested} (now {r.current}, {dict(r.bundle)} each)" for r in requests)
    missing = ", ".join(f"{k} {need[k]:g} more but {available.get(k, 0.0):g} free" for k in sorted(short))
    return (f"cannot place {asked}: the new workers need {missing}; free resources first, or ask for fewer "
            "workers (add nodes to the Ray cluster to grow it)")


def resize_requests(cfg: R3Config, pools: Mapping[str, Any], counts: Mapping[str, int]) -> list[ResizeRequest]:
    """The `ResizeRequest` of each pool in `counts` (role -> requested count); `pools[role]` is a
    `cluster.pools.WorkerPool` (its length and its `RolePlacement`, or None for plain requests)."""
    plans = {p.role: p for p in plan_placement(cfg)}
    out = []
    for role, count in counts.items():
        pool = pools[role]
        reserved = pool.placement.bundle_count if pool.placement is not None else 0
        out.append(ResizeRequest(role, plans[role].bundle, reserved, len(pool), count))
    return out


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
        plans.append(RolePlan(role, count, spec.num_cpus, gpus, autoscaling, _unplaced_reason(role, spec)))
    return plans


def format_plan(plans: list[RolePlan], strategy: str) -> str:
    lines = [f"placement plan (strategy {strategy}, one placement group per role):"]
    total_cpu = total_gpu = 0.0
    for p in plans:
        scale = f" (autoscaling {p.autoscaling[0]}..{p.autoscaling[1]})" if p.autoscaling else ""
        if p.unplaced_reason:
            scale += f" ({p.unplaced_reason})"
        lines.append(
            f"  {p.role:<19} x{p.count:<3} CPU {p.num_cpus:<5g} GPU {p.num_gpus:<4g} each{scale}  "
            f"[{', '.join(p.actor_names)}]"
        )
        n = p.autoscaling[1] if p.autoscaling else p.count
        total_cpu += n * p.num_cpus
        total_gpu += n * p.num_gpus
    lines.append(f"  total at most: CPU {total_cpu:g}, GPU {total_gpu:g}")
    return "\n".join(lines)


def create_placement_groups(plans: list[RolePlan], strategy: str, timeout_s: float,
                            roles: tuple[str, ...] = PLACED_ROLES) -> dict[str, RolePlacement]:
    """One ready placement group per role in `roles` (all requested at once, then waited for together).

    A role in `roles` whose plan has an `unplaced_reason` is skipped with a warning (its actors then
    request plain resources).

    Raises:
        ValueError: a role reserves no resources (Ray cannot place an empty bundle).
        RuntimeError: not every group was ready within `timeout_s`; names the roles and bundles
            that could not be placed. Groups already created are removed first.
    """
    import ray
    from ray.util.placement_group import placement_group

    chosen = []
    for p in plans:
        if p.role in roles and p.unplaced_reason:
            log.warning("%s: %s; its actors request plain resources", p.role, p.unplaced_reason)
        elif p.role in roles:
            chosen.append(p)
    if not chosen:
        return {}
    for p in chosen:
        if not p.bundle:
            raise ValueError(f"cluster.{p.role} reserves num_cpus=0 and num_gpus=0, which cannot be placed in a "
                             "placement group; give it num_cpus > 0")
    groups = {p.role: placement_group(p.bundles, strategy=strategy, name=f"r3rl-{p.role}") for p in chosen}
    refs = {p.role: groups[p.role].ready() for p in chosen}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    missing = [p for p in chosen if refs[p.role] not in ready]
    if missing:
        for pg in groups.values():
            _remove(pg)
        raise RuntimeError(_not_placed(missing, timeout_s, strategy))
    log.info("placement groups ready: %s", ", ".join(f"{p.role} {p.count} x {p.bundle}" for p in chosen))
    return {p.role: RolePlacement(p, groups[p.role], timeout_s) for p in chosen}


def actor_placement(_actor: Any = None) -> tuple[str | None, list[int]]:
    """Where the calling process runs: (placement group id or None, bundle indices of its resources).

    Call it inside an actor, e.g. `ray.get(actor.__ray_call__.remote(actor_placement))`.
    """
    import re

    import ray

    # The public `get_assigned_resources` folds Ray's bundle-indexed names (`CPU_group_<i>_<pg id>`)
    # back into `CPU`; the raw assignment keeps them.
    raw = ray._private.worker.global_worker.core_worker.resource_ids()
    bundles = {int(m.group(1)) for k in raw if (m := re.fullmatch(r"[A-Za-z]+_group_(\d+)_[0-9a-f]+", k))}
    return ray.get_runtime_context().get_placement_group_id(), sorted(bundles)


class RolePlacement:
    """A role's placement group (bundle i for actor i) plus one-bundle groups for actors beyond it.

    Lifecycle: made by `create_placement_groups` -> `scheduling_strategy(i)` for each actor started
    (again for a replacement: same bundle) -> `release(i)` after a pool shrinks -> `remove()` after
    the role's actors are killed.
    """

    def __init__(self, plan: RolePlan, group: Any, timeout_s: float):
        self.plan, self.group, self.timeout_s = plan, group, timeout_s
        self.extra: dict[int, Any] = {}  # actor index -> its own one-bundle group

    @property
    def role(self) -> str:
        return self.plan.role

    @property
    def bundle_count(self) -> int:
        return self.plan.count

    def scheduling_strategy(self, index: int) -> Any:
        """Where actor `index` runs: bundle `index` of the role's group, or its own extra group."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if index < 0:
            raise ValueError(f"{self.role}: actor index {index}; allowed: >= 0")
        if index < self.bundle_count:
            return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)
        if index not in self.extra:
            self.extra[index] = self._extra_group(index)
        return PlacementGroupSchedulingStrategy(placement_group=self.extra[index], placement_group_bundle_index=0)

    def release(self, index: int) -> None:
        """Give back the extra group of a removed actor (bundles of the main group stay reserved)."""
        pg = self.extra.pop(index, None)
        if pg is not None:
            _remove(pg)

    def groups(self) -> list[Any]:
        return [self.group, *self.extra.values()]

    def remove(self) -> None:
        """Remove every group of the role (kills actors still in them); idempotent."""
        for pg in self.groups():
            _remove(pg)
        self.extra.clear()

    def _extra_group(self, index: int) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        log.info("%s: actor %d is beyond the role's %d bundles; reserving its own group %s",
                 self.role, index, self.bundle_count, self.plan.bundle)
        pg = placement_group([self.plan.bundle], strategy="PACK", name=f"r3rl-{self.role}-{index}")
        ready, _ = ray.wait([pg.ready()], timeout=self.timeout_s)
        if not ready:
            _remove(pg)
            raise RuntimeError(_not_placed([RolePlan(self.role, 1, self.plan.num_cpus, self.plan.num_gpus)],
                                           self.timeout_s, "PACK"))
        return pg


def _not_placed(plans: list[RolePlan], timeout_s: float, strategy: str) -> str:
    import ray

    what = "; ".join(f"{p.role}: {p.count} x {p.bundle}" for p in plans)
    return (f"placement groups not ready after {timeout_s:g}s (strategy {strategy}): {what}. "
            f"The cluster has {ray.available_resources()} available of {ray.cluster_resources()}; "
            f"lower cluster.<role>.count or its num_cpus/num_gpus, or raise train.remote_timeout_s")


def _remove(pg: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    try:
        remove_placement_group(pg)
    except Exception as e:  # already removed, or the cluster is going down
        log.debug("remove_placement_group: %s", e)


def _unplaced_reason(role: str, spec: Any) -> str | None:
    if role not in PLACED_ROLES:
        return "placed by Ray Serve"
    tp = getattr(spec, "tensor_parallel_size", 1)
    if tp > 1 and spec.num_gpus > 0:
        return (f"no placement group: vLLM places its {tp} tensor-parallel workers itself (Ray backend inside "
                "a group is not wired yet)")
    return None
