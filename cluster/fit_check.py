"""Does the placement fit the declared cluster? Checked before anything starts (pure, no Ray).

`cluster.hardware` declares nodes x (GPUs, CPUs). Every actor's reservation (one bundle: its GPUs
and CPUs, which Ray puts on one node) is placed on a node, first the roles that get placement
groups, then the judge replicas at their autoscaling maximum (Serve places them after the groups,
into what is left), largest bundles first, each on the first node with room. The first bundle with
no node that holds it names its role; the message gives the role's and the whole config's numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.placement import PLACED_ROLES, RolePlan, plan_placement

if TYPE_CHECKING:
    from cluster.config import R3Config
    from cluster.config_roles import HardwareSpec

__all__ = ["placement_misfit", "role_totals"]

_EPS = 1e-9


def role_totals(plans: list[RolePlan]) -> dict[str, tuple[int, float, float]]:
    """role -> (actors, GPUs, CPUs) at the most it can ask for (the judge at max_replicas)."""
    out = {}
    for p in plans:
        n = p.autoscaling[1] if p.autoscaling else p.count
        out[p.role] = (n, n * p.num_gpus, n * p.num_cpus)
    return out


def placement_misfit(cfg: R3Config, hardware: HardwareSpec | None = None) -> str | None:
    """Why the config's actors cannot be placed on `hardware` (default `cfg.cluster.hardware`), or None.

    None also when no hardware is declared (nothing to check against)."""
    hw = hardware or cfg.cluster.hardware
    if hw is None:
        return None
    plans = plan_placement(cfg)
    totals = role_totals(plans)
    free_gpus = [float(hw.gpus_per_node)] * hw.nodes
    free_cpus = [float(hw.cpus_per_node) if hw.cpus_per_node is not None else float("inf")] * hw.nodes
    groups = ([p for p in plans if p.role in PLACED_ROLES], [p for p in plans if p.role not in PLACED_ROLES])
    for group in groups:  # the placement groups together, then Serve's replicas in what is left
        bundles = [(p, i) for p in group for i in range(totals[p.role][0])]
        bundles.sort(key=lambda b: (-b[0].num_gpus, -b[0].num_cpus))
        for plan, _ in bundles:
            node = next((n for n in range(hw.nodes) if free_gpus[n] + _EPS >= plan.num_gpus
                         and free_cpus[n] + _EPS >= plan.num_cpus), None)
            if node is None:
                return _message(plan, totals, hw)
            free_gpus[node] -= plan.num_gpus
            free_cpus[node] -= plan.num_cpus
    return None


def _message(plan: RolePlan, totals: dict[str, tuple[int, float, float]], hw: HardwareSpec) -> str:
    n, gpus, cpus = totals[plan.role]
    all_gpus = sum(t[1] for t in totals.values())
    all_cpus = sum(t[2] for t in totals.values())
    have_cpus = "unchecked" if hw.cpus_per_node is None else f"{hw.nodes * hw.cpus_per_node}"
    scale = " at max_replicas" if plan.autoscaling else ""
    per_role = ", ".join(f"{r} {t[1]:g}" for r, t in totals.items() if t[1])
    return (
        f"cluster.{plan.role} does not fit on cluster.hardware ({hw.nodes} nodes x {hw.gpus_per_node} GPUs"
        f"{'' if hw.cpus_per_node is None else f', {hw.cpus_per_node} CPUs'}): {n} actors{scale} x "
        f"({plan.num_gpus:g} GPUs, {plan.num_cpus:g} CPUs) = {gpus:g} GPUs, {cpus:g} CPUs, and no node has room "
        f"for another after the roles placed before it. The config asks for {all_gpus:g} GPUs ({per_role}) and "
        f"{all_cpus:g} CPUs in all; the cluster has {hw.nodes * hw.gpus_per_node} GPUs and {have_cpus} CPUs. "
        f"Lower cluster.{plan.role}.{'max_replicas' if plan.autoscaling else 'count'} or its num_gpus/num_cpus "
        "(or another role's), or declare the cluster's real size in cluster.hardware"
    )
