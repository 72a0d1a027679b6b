"""Evaluation with the EMA of the generator (`flow_grpo.ema_decay` > 0).

The diffusion learners keep an exponential moving average of their trained weights
(`learners.image_updates`); rollouts use the live weights, evaluations the average. Around an
evaluation during training the learners swap the EMA into their model, the generator's weights are
synced to the workers at the current version, and afterwards the live weights are swapped back
(bit for bit) and synced again. `cluster.eval` reads the EMA that checkpoints save as
`diffusion_learner/ema_weights`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ema_on_workers", "generator_eval_weights"]


@contextmanager
def ema_on_workers(cfg: Any, roles: Any, timeout_s: float) -> Iterator[bool]:
    """Inside: the diffusion workers hold the EMA weights (yields True), or nothing changes without an EMA
    (yields False). The live weights are back on the learners and the workers afterwards, even on errors."""
    if cfg.flow_grpo.ema_decay <= 0:
        yield False
        return
    learners, pool, sync = roles.diffusion_learners, roles.diffusion_pool, roles.diffusion_sync
    learners.call_all("ema_swap_in")
    try:
        sync.sync(learners, pool.actors, roles.version)
        yield True
    finally:
        learners.call_all("ema_swap_out")
        sync.sync(learners, pool.actors, roles.version)


def generator_eval_weights(cfg: Any, checkpoint: Path) -> Path:
    """The generator weights an evaluation of `checkpoint` loads: the EMA when the run kept one."""
    ema = checkpoint / "diffusion_learner" / "ema_weights"
    if cfg.flow_grpo.ema_decay > 0:
        if not ema.is_dir():
            raise ValueError(f"flow_grpo.ema_decay={cfg.flow_grpo.ema_decay} but checkpoint {checkpoint} holds no "
                             f"EMA weights ({ema}): evaluate with flow_grpo.ema_decay=0")
        return ema
    return checkpoint / "diffusion_learner" / "weights"
