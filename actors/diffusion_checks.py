"""What a DiffusionWorker refuses before it samples: bad request batches or settings, and
scheduler options the SDE sampler does not reproduce.

Why a module of its own: the checks are pure (no pipeline, no torch work), so they run and are
tested without loading a model, and they keep `actors.diffusion_worker` to the sampling itself.
A refused input raises `ValueError` naming the bad value and what is allowed, rather than sampling
something other than FlowGRPO's SDE (docs/design.md#what-the-sampler-stores) or the pipeline's own
sigma grid.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rollout.flow_sde import SDE_KINDS, STOCHASTIC_MODES
from rollout.interfaces import ImageRequest, SamplerSettings

__all__ = ["check_image_requests", "check_scheduler_config"]

# Scheduler options our sigma grid does not reproduce: refuse them rather than sample differently.
_UNSUPPORTED_SCHEDULER_FLAGS = (
    "shift_terminal",
    "use_karras_sigmas",
    "use_exponential_sigmas",
    "use_beta_sigmas",
    "invert_sigmas",
    "stochastic_sampling",
)


def check_image_requests(requests: list[ImageRequest], settings: SamplerSettings) -> None:
    """Raise ValueError naming the bad value and what is allowed."""
    if not isinstance(requests, list | tuple) or not requests:
        raise ValueError(f"requests must be a non-empty list of ImageRequest, got {requests!r}")
    if settings.num_steps < 1:
        raise ValueError(f"settings.num_steps must be >= 1, got {settings.num_steps}")
    if not (math.isfinite(settings.noise_level) and settings.noise_level >= 0):
        raise ValueError(f"settings.noise_level must be finite and >= 0, got {settings.noise_level}")
    if settings.stochastic not in STOCHASTIC_MODES:
        raise ValueError(f"settings.stochastic={settings.stochastic!r}; known: {list(STOCHASTIC_MODES)}")
    if settings.sde not in SDE_KINDS:
        raise ValueError(f"settings.sde={settings.sde!r}; known: {list(SDE_KINDS)}")
    if settings.sde == "cps" and settings.noise_level > 1:
        raise ValueError(f"settings.noise_level={settings.noise_level} must be <= 1 for the CPS step (η in [0, 1])")
    if settings.sde == "cps" and settings.stochastic == "one" and settings.window_hi >= settings.num_steps:
        raise ValueError(
            f"stochastic window [{settings.window_lo}, {settings.window_hi}) includes the last step, which the CPS "
            f"step makes deterministic (σ' = 0, no log-prob); use window_hi <= {settings.num_steps - 1}"
        )
    if (
        settings.stochastic == "one"
        and not 0 <= settings.window_lo < settings.window_hi <= settings.num_steps
    ):
        raise ValueError(
            f"stochastic window [{settings.window_lo}, {settings.window_hi}) must lie in "
            f"[0, num_steps={settings.num_steps}) and be non-empty"
        )
    for side in ("height", "width"):
        value = getattr(settings, side)
        if value < 16 or value % 16:
            raise ValueError(f"settings.{side} must be a positive multiple of 16, got {value}")
    for i, r in enumerate(requests):
        if not isinstance(r, ImageRequest):
            raise ValueError(f"requests[{i}] is a {type(r).__name__}, expected ImageRequest")
        if not isinstance(r.prompt, str):
            raise ValueError(f"requests[{i}].prompt must be a str, got {type(r.prompt).__name__}")
        img = r.source_image
        if img is None:
            continue
        expected = (settings.height, settings.width, 3)
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.shape != expected:
            got = (type(img).__name__, getattr(img, "shape", None), getattr(img, "dtype", None))
            raise ValueError(
                f"requests[{i}].source_image must be a uint8 RGB array of shape {expected}, got {got}"
            )


def check_scheduler_config(cfg: Any) -> None:
    """Refuse a scheduler config (diffusers `FlowMatchEulerDiscreteScheduler.config`) whose options
    our sigma grid (`rollout.flow_sde.sigma_schedule`) does not reproduce."""
    for flag in _UNSUPPORTED_SCHEDULER_FLAGS:
        if cfg.get(flag):
            raise ValueError(
                f"scheduler option {flag}={cfg.get(flag)!r} is not supported by the SDE sampler"
            )

