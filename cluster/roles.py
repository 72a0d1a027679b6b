"""Build every role of a run from the config: worker pools, the judge service, learner groups, weight sync.

This is the only place that maps config fields to actor constructor arguments. Every worker and
learner runs in its role's placement group (`cluster.placement`: one group per role, actor i in
bundle i); the judge replicas are placed by Ray Serve. `Roles.shutdown` kills the actors, then
removes the groups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cluster.config import R3Config
from cluster.placement import create_placement_groups, plan_placement
from cluster.pools import PoolGenerator, PoolReasoner, WorkerPool
from cluster.session import resolve_model_path

__all__ = ["Roles", "build_roles", "build_worker_pools", "place_roles", "remove_placements", "ModelPaths", "resolve_paths"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPaths:
    reasoner: str
    generator: str
    judge: str | None


def resolve_paths(cfg: R3Config) -> ModelPaths:
    judge = resolve_model_path(cfg.judge.path) if cfg.judge.kind == "vlm" else None
    return ModelPaths(resolve_model_path(cfg.models.reasoner.path), resolve_model_path(cfg.models.generator.path), judge)


@dataclass
class Roles:
    text_pool: WorkerPool
    diffusion_pool: WorkerPool
    judge: Any
    text_learners: Any
    diffusion_learners: Any
    text_sync: Any
    diffusion_sync: Any
    version: int = 0
    placements: dict[str, Any] = field(default_factory=dict)  # role -> cluster.placement.RolePlacement

    @property
    def reasoner(self) -> PoolReasoner:
        return PoolReasoner(self.text_pool)

    @property
    def generator(self) -> PoolGenerator:
        return PoolGenerator(self.diffusion_pool)

    def shutdown(self) -> None:
        learner_actors = [*self.text_learners.actors, *self.diffusion_learners.actors]
        for closer in (
            lambda: self.text_sync.shutdown(),
            lambda: self.diffusion_sync.shutdown(),
            lambda: self.text_pool.call_all("shutdown"),
            lambda: self.diffusion_pool.call_all("shutdown"),
            lambda: self.text_learners.shutdown(),
            lambda: self.diffusion_learners.shutdown(),
            lambda: self.judge.shutdown(),
        ):
            try:
                closer()
            except Exception as e:  # best effort: the cluster may already be going down
                log.warning("shutdown: %s", e)
        _kill_and_wait([*self.text_pool.actors, *self.diffusion_pool.actors, *learner_actors])
        remove_placements(self.placements)


def remove_placements(placements: dict[str, Any]) -> None:
    """Remove every role's placement groups (after its actors are gone)."""
    for placement in placements.values():
        placement.remove()


def _kill_and_wait(actors: list[Any], timeout_s: float = 60.0) -> None:
    """Kill actors and wait until they are gone, so their names can be taken again."""
    import time

    import ray

    for a in actors:
        try:
            ray.kill(a, no_restart=True)
        except Exception:  # already dead
            pass
    deadline = time.monotonic() + timeout_s
    for a in actors:
        while time.monotonic() < deadline:
            try:
                ray.get(a.__ray_ready__.remote(), timeout=5)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.2)


def place_roles(cfg: R3Config, roles: tuple[str, ...]) -> dict[str, Any]:
    """Ready placement groups for `roles`, waited for up to `train.remote_timeout_s`."""
    return create_placement_groups(plan_placement(cfg), cfg.cluster.placement_strategy, cfg.train.remote_timeout_s,
                                   roles=roles)


def build_worker_pools(cfg: R3Config, paths: ModelPaths, placements: dict[str, Any],
                       on_replace: dict[str, Callable[[int, Any], None]] | None = None) -> tuple[WorkerPool, WorkerPool]:
    """The text and diffusion worker pools, each actor in its bundle of `placements[role]`."""
    from actors.diffusion_worker import remote_diffusion_worker
    from actors.text_worker import remote_text_worker

    c, seed, hooks = cfg.cluster, cfg.train.seed, on_replace or {}

    def text_worker(i: int, strategy: Any) -> Any:
        return remote_text_worker(
            i, c.text_workers.num_cpus, c.text_workers.num_gpus * c.text_workers.tensor_parallel_size,
            scheduling_strategy=strategy, worker_cls=text_worker_class(cfg.models.reasoner.backend),
            model_path=paths.reasoner, max_model_len=cfg.models.reasoner.max_model_len,
            tensor_parallel_size=c.text_workers.tensor_parallel_size, dtype=cfg.models.reasoner.dtype,
            seed=seed + i, enable_sleep_mode=c.colocate,
            **({} if cfg.models.reasoner.backend == "hf" else  # vLLM's memory share; transformers has none
               {"gpu_memory_utilization": cfg.models.reasoner.gpu_memory_utilization}),
        )

    def diffusion_worker(i: int, strategy: Any) -> Any:
        device = "cuda" if c.diffusion_workers.num_gpus > 0 else "cpu"
        return remote_diffusion_worker(
            i, c.diffusion_workers.num_cpus, c.diffusion_workers.num_gpus, scheduling_strategy=strategy,
            model_path=paths.generator, device=device, dtype=cfg.models.generator.dtype, seed=seed + i,
            max_sequence_length=cfg.models.generator.max_sequence_length,
        )

    timeout, retries = cfg.train.remote_timeout_s, cfg.train.retries
    pools = []
    for role, factory in (("text_workers", text_worker), ("diffusion_workers", diffusion_worker)):
        pools.append(WorkerPool(role, factory, getattr(c, role).count, timeout_s=timeout, retries=retries,
                                on_replace=hooks.get(role), placement=placements.get(role)))
    return pools[0], pools[1]


def text_worker_class(backend: str) -> type:
    """The text worker of `models.reasoner.backend`: vLLM's `TextWorker` or transformers' `HFTextWorker`."""
    if backend == "hf":
        from actors.hf_text_worker import HFTextWorker

        return HFTextWorker
    if backend == "vllm":
        from actors.text_worker import TextWorker

        return TextWorker
    raise ValueError(f"models.reasoner.backend={backend!r}; allowed: ['hf', 'vllm']")


def build_roles(cfg: R3Config, paths: ModelPaths) -> Roles:
    """Placement groups first (one per role, all ready), then workers, learners, judge, weight sync.

    Every actor starts before any is waited for, so the models load side by side. If anything fails
    to start, the judge's Serve app is deleted, the started actors are killed (waited for, so their
    names can be taken again) and the placement groups removed.
    """
    from learners.group import LearnerGroup
    from learners.weight_sync import make_weight_sync
    from rollout.sync_ranks import sync_backend

    c = cfg.cluster
    text_backend = sync_backend(cfg.sync.backend, c.text_learners.num_gpus, c.text_workers.num_gpus)
    image_backend = sync_backend(cfg.sync.backend, c.diffusion_learners.num_gpus, c.diffusion_workers.num_gpus)
    # weights travel in the dtype the workers hold (models.*.dtype), not the learner's
    text_sync = make_weight_sync(cfg.sync.method, bucket_mb=cfg.sync.bucket_mb, backend=text_backend,
                                 wire_dtype=cfg.models.reasoner.dtype, group_timeout_s=cfg.sync.group_timeout_s)
    diffusion_sync = make_weight_sync(cfg.sync.method, bucket_mb=cfg.sync.bucket_mb, backend=image_backend,
                                      wire_dtype=cfg.models.generator.dtype, group_timeout_s=cfg.sync.group_timeout_s)
    roles_box: dict[str, Roles] = {}

    def resync(sync: Any) -> Any:
        def hook(index: int, actor: Any) -> None:
            roles = roles_box.get("roles")
            if roles is not None and roles.version > 0:  # version 0 = the weights the worker loaded itself
                sync.resync(actor, roles.version)
                log.info("replacement worker %d received weights version %d", index, roles.version)

        return hook

    placements = place_roles(cfg, ("text_workers", "diffusion_workers", "text_learners", "diffusion_learners"))
    judge_deployed, started = False, []  # started: the pools and groups, whose actors a failure kills
    try:
        # Every actor is started before anything is waited for: workers, both learner groups and the
        # judge's replicas load their models side by side (deploying the judge blocks until it serves).
        text_pool, diffusion_pool = build_worker_pools(
            cfg, paths, placements, {"text_workers": resync(text_sync), "diffusion_workers": resync(diffusion_sync)})
        started += [text_pool, diffusion_pool]
        text_learners = LearnerGroup(
            "text", c.text_learners.count, c.text_learners.num_cpus, c.text_learners.num_gpus,
            placement_group=placements["text_learners"].group, wait=False, **text_learner_kwargs(cfg, paths),
        )
        started.append(text_learners)
        diffusion_learners = LearnerGroup(
            "diffusion", c.diffusion_learners.count, c.diffusion_learners.num_cpus, c.diffusion_learners.num_gpus,
            placement_group=placements["diffusion_learners"].group, wait=False, **diffusion_learner_kwargs(cfg, paths),
        )
        started.append(diffusion_learners)
        judge_deployed = True  # from here on a failure leaves a Serve app (whole or half deployed) to delete
        judge = build_judge_client(cfg, paths)
        text_learners.wait_ready()
        diffusion_learners.wait_ready()
    except BaseException:
        if judge_deployed:
            delete_judge_app()
        _kill_and_wait([a for part in started for a in part.actors])  # their names are free again on return
        remove_placements(placements)
        raise
    roles = Roles(text_pool, diffusion_pool, judge, text_learners, diffusion_learners, text_sync, diffusion_sync,
                  placements=placements)
    roles_box["roles"] = roles
    return roles


def text_learner_kwargs(cfg: R3Config, paths: ModelPaths) -> dict[str, Any]:
    g = cfg.grpo
    return dict(
        model_path=paths.reasoner, zero_stage=g.zero_stage, lr=g.lr, betas=tuple(g.betas),
        weight_decay=g.weight_decay, warmup_steps=g.warmup_steps, lr_decay_steps=cfg.lr_decay_steps(g),
        dtype=g.dtype,
        min_lr_ratio=g.min_lr_ratio, grad_clip=g.grad_clip, micro_batch_size=g.micro_batch_size,
        temperature=g.temperature, top_p=g.top_p, kl_coef=g.kl_coef, kl_kind=g.kl_kind,
        clip_low=g.clip_low, clip_high=g.clip_high, loss_agg=g.loss_agg,
        gradient_checkpointing=g.gradient_checkpointing, lora=g.lora.model_dump(), seed=cfg.train.seed,
    )


def diffusion_learner_kwargs(cfg: R3Config, paths: ModelPaths) -> dict[str, Any]:
    f = cfg.flow_grpo
    return dict(
        model_path=paths.generator, zero_stage=f.zero_stage, lr=f.lr, betas=tuple(f.betas),
        warmup_steps=f.warmup_steps, lr_decay_steps=cfg.lr_decay_steps(f), min_lr_ratio=f.min_lr_ratio,
        dtype=f.dtype,
        grad_clip=f.grad_clip, micro_batch_size=f.micro_batch_size,
        clip_range=f.clip_range, adv_clip=f.adv_clip, kl_coef=f.kl_coef, kl_mode=f.kl_mode,
        image_loss_weight=f.image_loss_weight, cfg_scale=f.train_cfg_scale,
        algorithm=f.algorithm, updates_per_batch=f.updates_per_batch, ema_decay=f.ema_decay, ema_warmup=f.ema_warmup,
        nft_beta=f.nft_beta,
        nft_weighting=f.nft_weighting, nft_timesteps=f.nft_timesteps, keep_previous_weights=cfg.train.async_one_step_off, sde=f.sde,
        gradient_checkpointing=f.gradient_checkpointing, lora=f.lora.model_dump(), seed=cfg.train.seed,
    )


def build_judge_client(cfg: R3Config, paths: ModelPaths) -> Any:
    """The judge behind Ray Serve (replicas or autoscaling from the config), as a `Judge`.

    The driver calls it through a deployment handle. Only with `judge.http_port` set does Serve
    start its HTTP proxy, bound to 127.0.0.1 on that port, so outside tools can `POST /judge` on
    loopback only; without it no proxy runs.

    Serve's applications are cluster-wide, so each driver deploys its own (`judge_app_name`): two
    runs submitted to one cluster would otherwise score with each other's judge, and the first to
    finish would delete the other's.
    """
    from reward.service import ServeJudgeClient, deploy_judge, start_serve

    j, r = cfg.judge, cfg.cluster.judge_replicas
    spec, name = judge_spec(cfg, paths), judge_app_name()
    start_serve(host="127.0.0.1", port=j.http_port, http=j.http_port is not None)
    autoscaling = {"min_replicas": r.min_replicas, "max_replicas": r.max_replicas} if r.min_replicas else None
    deploy_judge(
        spec, name=name, route_prefix="/judge" if j.http_port is not None else None,
        num_replicas=None if autoscaling else r.count, autoscaling=autoscaling,
        max_batch_size=j.max_batch_size, batch_wait_timeout_s=j.batch_wait_s, num_cpus=r.num_cpus,
        num_gpus=r.num_gpus,
    )
    log.info("judge: Serve application %s", name)
    if j.kind == "remote":  # the replica retries over HTTP: one Serve attempt spans them all, within
        # judge.timeout_s x (retries + 1) <= train.remote_timeout_s (checked by the config)
        return _ServeJudge(ServeJudgeClient(name, timeout_s=j.timeout_s * (j.retries + 1), max_retries=0))
    return _ServeJudge(ServeJudgeClient(name, timeout_s=j.timeout_s, max_retries=j.retries))


def judge_app_name() -> str:
    """`judge-<Ray job id>`: the Serve application of this driver's judge, unique in the cluster, and
    the job the Ray dashboard lists it under.

    Raises:
        RuntimeError: this process has not joined a Ray cluster (asking Ray for the job id would start
            a cluster of its own, with the machine's resources rather than the config's).
    """
    import ray

    if not ray.is_initialized():
        raise RuntimeError("the judge is deployed on a Ray cluster: join or start one first (cluster.session.connect_ray)")
    return f"judge-{ray.get_runtime_context().get_job_id()}"


def delete_judge_app() -> None:
    """Delete this driver's judge app, whole or half deployed (a start-up that failed after deploying
    it); Serve ignores the name of an app it does not have."""
    from ray import serve

    name = judge_app_name()
    try:
        serve.delete(name)
    except Exception as e:  # best effort: the failure being raised matters more
        log.warning("could not delete the judge's Serve app %s: %s", name, e)


def judge_spec(cfg: R3Config, paths: ModelPaths) -> dict[str, Any]:
    """What each Serve replica builds its judge from (`reward.registry.build_judge`).

    A VLM judge gets its own engine settings (judge.dtype, judge.max_model_len). With
    judge.tensor_parallel_size > 1 its vLLM engine spreads the model over the replica's GPUs
    (cluster.judge_replicas.num_gpus, equal to the tensor-parallel size) with vLLM's multiprocessing
    executor: Ray gives the replica actor those GPUs and the executor's workers run on them, on the
    replica's node (vLLM's Ray executor would look for a placement group the replica does not have).
    """
    j = cfg.judge
    spec: dict[str, Any] = {"kind": j.kind, "plugins": list(cfg.plugins)}  # a replica resolves plugin kinds too
    if j.kind == "vlm":
        spec.update(model_path=paths.judge, mode=j.mode, max_model_len=j.max_model_len, dtype=j.dtype)
        if j.tensor_parallel_size > 1:
            spec["engine_kwargs"] = {"tensor_parallel_size": j.tensor_parallel_size,
                                     "distributed_executor_backend": "mp"}
        if j.gpu_memory_utilization is not None:  # a judge sharing its GPUs with other roles
            spec.setdefault("engine_kwargs", {})["gpu_memory_utilization"] = j.gpu_memory_utilization
    elif j.kind == "remote":  # each HTTP request has judge.timeout_s and judge.retries retries, in the replica
        spec.update(base_url=j.url, model=j.remote_model, mode=j.mode, api_key_env=j.api_key_env,
                    timeout_s=j.timeout_s, max_retries=j.retries)
    return spec


class _ServeJudge:
    """The Serve client plus a shutdown that removes its app (the client's `app_name`)."""

    def __init__(self, client: Any):
        self.client = client

    def score(self, items: list[Any]) -> list[Any]:
        return self.client.score(items)

    def shutdown(self) -> None:
        from ray import serve

        serve.delete(self.client.app_name)
