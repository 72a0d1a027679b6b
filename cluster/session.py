"""Connecting to Ray and resolving model paths: the first things a run does.

Inside `ray job submit` ($RAY_ADDRESS set) the run joins that cluster; otherwise it starts a local
one bound to loopback. Every actor gets the CPU engine environment when the run has no GPUs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cluster.config import TINY_PREFIX, R3Config

__all__ = ["connect_ray", "resolve_model_path", "ENGINE_ENV", "PROJECT_ROOT"]

log = logging.getLogger(__name__)
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "DS_ACCELERATOR": "cpu",
}


def _uses_gpus(cfg: R3Config) -> bool:
    c = cfg.cluster
    return any(getattr(c, r).num_gpus > 0 for r in ("text_workers", "diffusion_workers", "judge_replicas", "text_learners", "diffusion_learners"))


def connect_ray(cfg: R3Config) -> bool:
    """Join $RAY_ADDRESS / cluster.address, or start a local cluster. Returns True if it started one."""
    import ray

    if ray.is_initialized():
        return False
    env = dict(ENGINE_ENV)
    if _uses_gpus(cfg):
        for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING", "DS_ACCELERATOR"):
            env.pop(key)
    existing_path = os.environ.get("PYTHONPATH", "")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), existing_path) if p)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=True)
        return False
    log.info("starting a local Ray cluster (num_cpus=%s)", cfg.cluster.num_cpus)
    ray.init(
        num_cpus=cfg.cluster.num_cpus,
        include_dashboard=cfg.cluster.dashboard,
        dashboard_host=cfg.cluster.dashboard_host,
        runtime_env={"env_vars": env},
        _metrics_export_port=cfg.cluster.metrics_export_port,
    )
    return True


def resolve_model_path(path: str) -> str:
    """`tiny:<name>` -> the folder of the named model (`actors.named_models`: the tiny test models,
    built offline on first use, or one a plugin registered); else the path, `~` expanded.

    Raises:
        ValueError: an unknown name (the message lists the known ones), or a named model that its
            registration cannot provide.
    """
    if not path.startswith(TINY_PREFIX):
        return str(Path(os.path.expanduser(path)))
    from actors.named_models import named_model_path

    return str(named_model_path(path[len(TINY_PREFIX):]))
