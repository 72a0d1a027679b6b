"""A data-parallel group of N learner actors on Ray (one DeepSpeed rank each).

The group picks the rendezvous (rank 0's node address and a free port), starts the actors named
`text-learner-{i}` / `diffusion-learner-{i}` (each builds its DeepSpeed engine; all ranks join one
process group: gloo on CPU, NCCL on GPU), shards every batch evenly across the ranks and returns
rank 0's metrics (already reduced over all ranks by the learners). Every collective call goes to
all ranks at once; `call_rank0` is for non-collective calls only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from learners.learner_base import split_even

__all__ = ["LearnerGroup", "LEARNER_KINDS", "PER_SAMPLE_KWARGS", "learner_actor_name"]

log = logging.getLogger(__name__)

LEARNER_KINDS = ("text", "diffusion")
# train_step keyword arguments that hold one entry per sample and are sharded with the samples.
PER_SAMPLE_KWARGS = ("images",)
_ENV_KEYS = ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE",
             "TOKENIZERS_PARALLELISM", "PYTHONPATH")


def learner_actor_name(kind: str, index: int) -> str:
    return f"{kind}-learner-{index}"


def _learner_class(kind: str):
    if kind == "text":
        from learners.text_learner import TextLearner

        return TextLearner
    if kind == "diffusion":
        from learners.diffusion_learner import DiffusionLearner

        return DiffusionLearner
    raise ValueError(f"unknown learner kind {kind!r}; known: {list(LEARNER_KINDS)}")


class LearnerGroup:
    """N learner actors of one model. Lifecycle: construct (engines ready) -> train_step* -> shutdown."""

    def __init__(self, kind: str, num_learners: int, num_cpus_per: float = 1.0, num_gpus_per: float = 0.0,
                 *, name_prefix: str | None = None, placement_group: Any = None, wait: bool = True,
                 **learner_kwargs: Any) -> None:
        """Start the actors and (with `wait`) wait until every rank has built its engine.

        learner_kwargs go to every rank's `TextLearner` / `DiffusionLearner` constructor.
        placement_group: optional Ray placement group with one bundle per rank.
        wait: False returns as soon as the actors are started, so a caller can start several groups
            (and the rest of a run) while their engines load, then call `wait_ready` on each: the
            reasoner's and the generator's learners load their weights side by side, not one after
            the other.
        """
        import ray

        if num_learners < 1:
            raise ValueError(f"num_learners must be >= 1, got {num_learners}")
        cls = _learner_class(kind)
        self.kind, self.num_learners = kind, num_learners
        addr, port = _rendezvous(placement_group)
        env = {k: os.environ[k] for k in _ENV_KEYS if k in os.environ}
        remote_cls = ray.remote(cls)
        self.actors = []
        for i in range(num_learners):
            options: dict[str, Any] = {
                "name": learner_actor_name(name_prefix or kind, i),
                "num_cpus": num_cpus_per,
                "num_gpus": num_gpus_per,
                "runtime_env": {"env_vars": env},
                "max_concurrency": 1,
            }
            if placement_group is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=i)
            self.actors.append(remote_cls.options(**options).remote(
                rank=i, world_size=num_learners, master_addr=addr, master_port=port, **learner_kwargs))
        self.info: list[dict[str, Any]] = []
        if wait:
            self.wait_ready()

    def wait_ready(self) -> list[dict[str, Any]]:
        """Block until every rank has built its engine; returns each rank's info (rank, pid, backend...).

        Raises whatever a rank's constructor raised (ray.exceptions.RayActorError / RayTaskError).
        """
        import ray

        if not self.info:
            self.info = ray.get([a.ready.remote() for a in self.actors])
            log.info("%s learner group ready: %s", self.kind, self.info)
        return self.info

    # ---- collective calls -------------------------------------------------------------------
    def train_step(self, samples: Sequence[Any], advantages: Sequence[float], *, timeout_s: float | None = None,
                   **kwargs: Any) -> dict[str, float]:
        """Shard `samples`/`advantages` (and `images`, see PER_SAMPLE_KWARGS) evenly over ranks.

        len(samples) must be divisible by the number of ranks, so every rank runs the same number
        of micro-batches. Returns rank 0's metrics (reduced over all ranks). `timeout_s`: wait at most
        this long for the ranks (ray.exceptions.GetTimeoutError after it); None waits forever.
        """
        import ray

        n = len(samples)
        if n % self.num_learners != 0:
            raise ValueError(f"batch of {n} samples does not split evenly over {self.num_learners} "
                             "learner ranks; make prompts x group size a multiple of the learner count")
        for key in PER_SAMPLE_KWARGS:
            if kwargs.get(key) is not None and len(kwargs[key]) != n:
                raise ValueError(f"{n} samples but {len(kwargs[key])} {key}")
        if len(advantages) != n:
            raise ValueError(f"{n} samples but {len(advantages)} advantages")
        shards = split_even(n, self.num_learners)
        refs = []
        for actor, sl in zip(self.actors, shards, strict=True):
            kw = {k: (list(v)[sl] if k in PER_SAMPLE_KWARGS and v is not None else v) for k, v in kwargs.items()}
            refs.append(actor.train_step.remote(list(samples[sl]), list(advantages[sl]), **kw))
        return ray.get(refs, timeout=timeout_s)[0]

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method` on every rank at once (for collective methods); results in rank order."""
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])

    def call_rank0(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Call a non-collective `method` on rank 0 only."""
        import ray

        return ray.get(getattr(self.actors[0], method).remote(*args, **kwargs))

    def shutdown(self) -> None:
        """Kill the actors (their process group dies with them)."""
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []


def _rendezvous(placement_group: Any) -> tuple[str, int]:
    """(address, free port) on the node where rank 0 will run.

    With a placement group: probed by a task on bundle 0. Without one, the ranks may land on any
    node, which only works on a one-node cluster (then loopback).
    """
    import ray

    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        probe = ray.remote(num_cpus=0)(_node_address_and_port).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=placement_group, placement_group_bundle_index=0))
        return ray.get(probe.remote())
    alive = [n for n in ray.nodes() if n.get("Alive")]
    if len(alive) > 1:
        raise ValueError(f"a learner group on a {len(alive)}-node cluster needs a placement group "
                         "(pass placement_group=, one bundle per rank)")
    from rollout.ports import free_port

    return "127.0.0.1", free_port()


def _node_address_and_port() -> tuple[str, int]:
    import ray

    from rollout.ports import free_port

    return ray.util.get_node_ip_address(), free_port()
