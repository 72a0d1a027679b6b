"""FlowGRPO's SDE step and the coefficients-preserving step (CPS) for rectified-flow samplers,
and the sigma grid they run on.

Design: docs/design.md#sde-step; `sde_step` is part of docs/design.md#stable-math-api.

Convention: x_σ = (1−σ)·x0 + σ·ε, velocity v = ε − x0, sampling runs σ: 1 → 0. The ODE step is
x' = x + v·dt with dt = σ' − σ < 0; the SDE step below has the same marginals and a Gaussian
transition, so every stochastic step has a log-probability. One function both samples and scores
(`prev_sample` given), so the sampler's and the learner's log-probs come from the same code
(Flow-GRPO, arXiv 2505.05470, eq. 9; yifan123/flow_grpo `sd3_sde_with_logprob.py`).
`cps_step` is the alternative transition of arXiv 2509.05952, which keeps the marginals exact for
any noise level; `get_sde_step` picks one of them by name (`SDE_KINDS`, `flow_grpo.sde`).

Everything is computed in fp32: bf16 latents would make the log-density of a ~1e-2-wide Gaussian
over thousands of elements meaningless. Tensors are batch-first. Pure torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SdeStep",
    "sde_step",
    "cps_step",
    "get_sde_step",
    "SDE_KINDS",
    "calculate_shift",
    "sigma_schedule",
    "stochastic_step_indices",
    "STOCHASTIC_MODES",
]

STOCHASTIC_MODES = ("all", "one", "none")
SDE_KINDS = ("flow_grpo", "cps")


class SdeStep(NamedTuple):
    """Result of one SDE step.

    prev_sample: (B, ...) fp32, the latent at `sigma_next` (sampled, or the one given).
    log_prob:    (B,) fp32, Gaussian log density of `prev_sample`, averaged over non-batch
                 elements; 0 for rows whose std is 0 (the ODE step has no density).
    mean:        (B, ...) fp32, the transition mean μ.
    std:         (B, 1, ..., 1) fp32, the transition std s_t·sqrt(−dt), broadcastable to `mean`.
    """

    prev_sample: Tensor
    log_prob: Tensor
    mean: Tensor
    std: Tensor


def sde_step(
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    noise_level: float | Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
) -> SdeStep:
    """One FlowGRPO SDE step from `sigma` to `sigma_next` (docs/design.md#sde-step).

    s_t = a·sqrt(σ / (1 − σ)) (σ' in the denominator at σ = 1),
    μ = x·(1 + s_t²·dt/(2σ)) + v·(1 + s_t²·(1 − σ)/(2σ))·dt, std = s_t·sqrt(−dt), x' = μ + std·ε.

    Args:
        velocity: (B, ...) predicted velocity v = ε − x0 at `sample`.
        sigma: current noise level, a float or a tensor of shape [B] (or 0-dim), in (0, 1].
        sigma_next: next grid value, same forms as `sigma`, < sigma (0 on the last step).
        sample: (B, ...) current latent x_σ.
        noise_level: `a`, a float or a tensor of shape [B]; 0 gives the ODE step x + v·dt.
        prev_sample: (B, ...) latent to score instead of sampling one (the learner's case).
        generator: draws ε when neither `prev_sample` nor `noise` is given.
        noise: (B, ...) standard-normal ε to use instead of drawing one (per-sample generators).

    Returns:
        `SdeStep(prev_sample, log_prob, mean, std)`, see its docstring for shapes.
    """
    velocity, sample, sigma_t, sigma_next_t, level = _step_inputs(velocity, sigma, sigma_next, sample, noise_level)

    dt = sigma_next_t - sigma_t  # (B, 1, ..., 1), negative
    denom_sigma = torch.where(sigma_t == 1, sigma_next_t, sigma_t)
    std_dev_t = level * torch.sqrt(sigma_t / (1 - denom_sigma))
    mean = (
        sample * (1 + std_dev_t**2 / (2 * sigma_t) * dt)
        + velocity * (1 + std_dev_t**2 * (1 - sigma_t) / (2 * sigma_t)) * dt
    )
    std = std_dev_t * torch.sqrt(-dt)

    return _sample_and_score(mean, std, sample, prev_sample, generator, noise)


def cps_step(
    velocity: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    sample: Tensor,
    noise_level: float | Tensor,
    prev_sample: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    noise: Tensor | None = None,
) -> SdeStep:
    """One coefficients-preserving step from `sigma` to `sigma_next` (docs/design.md#sde-step).

    Wang & Yu, "Coefficients-Preserving Sampling for Reinforcement Learning with Flow Matching",
    arXiv 2509.05952 (IamCreateAI/FlowCPS `sd3_sde_with_logprob.py`): a DDIM-like step that
    re-noises the predicted clean latent with a mix of the predicted noise and fresh noise whose
    squared coefficients sum to σ'², so x' has the coefficients (1 − σ', σ') of the marginal at σ'
    for every noise level η (FlowGRPO's step over-injects noise for large `a` near σ = 1):

        x̂0 = x − σ·v,  ε̂ = x + (1 − σ)·v,  std = σ'·sin(η·π/2),
        μ = (1 − σ')·x̂0 + σ'·cos(η·π/2)·ε̂,  x' = μ + std·z,  z ~ N(0, I).

    η = 0 is the ODE step x + v·dt (computed in that form, bit for bit as `sde_step` with level 0);
    η = 1 re-draws the noise entirely; σ' = 0 (the last step) has std 0 and no density. The
    log-prob is the full Gaussian log-density averaged over non-batch elements, as `sde_step`'s
    (FlowCPS drops the constants and the 1/(2·std²) factor; the full density keeps the ratio an
    exact likelihood ratio and `flow_kl`'s std meaningful).

    Args:
        velocity: (B, ...) predicted velocity v = ε − x0 at `sample`.
        sigma: current noise level, a float or a tensor of shape [B] (or 0-dim), in (0, 1].
        sigma_next: next grid value, same forms as `sigma`, < sigma (0 on the last step).
        sample: (B, ...) current latent x_σ.
        noise_level: η in [0, 1], a float or a tensor of shape [B].
        prev_sample: (B, ...) latent to score instead of sampling one (the learner's case).
        generator: draws z when neither `prev_sample` nor `noise` is given.
        noise: (B, ...) standard-normal z to use instead of drawing one (per-sample generators).

    Returns:
        `SdeStep(prev_sample, log_prob, mean, std)`, see its docstring for shapes.
    """
    velocity, sample, sigma_t, sigma_next_t, level = _step_inputs(velocity, sigma, sigma_next, sample, noise_level)
    if bool(((level < 0) | (level > 1)).any()):
        raise ValueError(f"the CPS noise level must lie in [0, 1], got {noise_level}; lower flow_grpo.noise_level")

    angle = level * (math.pi / 2)
    pred_x0 = sample - sigma_t * velocity
    pred_noise = sample + (1 - sigma_t) * velocity
    mean = (1 - sigma_next_t) * pred_x0 + sigma_next_t * torch.cos(angle) * pred_noise
    mean = torch.where(level == 0, sample + velocity * (sigma_next_t - sigma_t), mean)
    std = sigma_next_t * torch.sin(angle)

    return _sample_and_score(mean, std, sample, prev_sample, generator, noise)


def get_sde_step(kind: str) -> Callable[..., SdeStep]:
    """The transition named `kind` ("flow_grpo": `sde_step`, "cps": `cps_step`); both take the
    same arguments, so the sampler and the learner call whichever the config names."""
    steps = {"flow_grpo": sde_step, "cps": cps_step}
    if kind not in steps:
        raise ValueError(f"unknown SDE kind {kind!r}; known: {list(SDE_KINDS)}")
    return steps[kind]


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift mu: linear in the number of packed latent tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def sigma_schedule(num_steps: int, mu: float | None = None, shift: float = 1.0) -> Tensor:
    """The sampler's sigma grid: linspace(1, 1/num_steps, num_steps), shifted, then a final 0.

    With `mu` (dynamic shifting, FLUX): σ ← e^mu / (e^mu + (1/σ − 1)); otherwise the static shift
    σ ← shift·σ / (1 + (shift − 1)·σ) (shift = 1 leaves the grid as it is). Computed like
    diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps` (float64 grid, fp32 shift), so
    sampling reproduces the pipeline bit for bit.

    Returns:
        (num_steps + 1,) fp32, strictly decreasing from 1 (or its shifted value) to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    # numpy.linspace's arithmetic: start + i·step, last element set to stop.
    grid = torch.arange(num_steps, dtype=torch.float64)
    if num_steps > 1:
        grid = 1.0 + grid * ((1.0 / num_steps - 1.0) / (num_steps - 1))
        grid[-1] = 1.0 / num_steps
    else:
        grid = grid + 1.0
    sigmas = grid.to(torch.float32)
    # fp32 scalar tensors, not Python floats: torch evaluates `float / tensor` as a reciprocal
    # times the float, which rounds differently from numpy's fp32 division.
    one = torch.tensor(1.0)
    if mu is not None:
        exp_mu = torch.tensor(math.exp(mu), dtype=torch.float32)
        sigmas = exp_mu / (exp_mu + (one / sigmas - one))
    else:
        shift_t = torch.tensor(shift, dtype=torch.float32)
        sigmas = shift_t * sigmas / (one + (shift_t - one) * sigmas)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float32)])


def stochastic_step_indices(
    mode: str,
    num_steps: int,
    window_lo: int = 0,
    window_hi: int = 1,
    generator: torch.Generator | None = None,
) -> list[int]:
    """Which denoising steps use the SDE (the others use the ODE).

    Args:
        mode: "all" = every step except the last; "one" = one step drawn uniformly in
            [window_lo, window_hi) with `generator`; "none" = no stochastic step (evaluation).
        num_steps: number of denoising steps.
        window_lo, window_hi: the window for "one", with 0 <= lo < hi <= num_steps.

    Returns:
        Sorted step indices in [0, num_steps).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if mode == "all":
        return list(range(num_steps - 1))
    elif mode == "one":
        if not 0 <= window_lo < window_hi <= num_steps:
            raise ValueError(
                f"stochastic window [{window_lo}, {window_hi}) must satisfy 0 <= lo < hi <= num_steps "
                f"({num_steps}); change window_lo/window_hi"
            )
        offset = int(torch.randint(window_hi - window_lo, (1,), generator=generator).item())
        return [window_lo + offset]
    elif mode == "none":
        return []
    else:
        raise ValueError(f"unknown stochastic mode {mode!r}; known: {list(STOCHASTIC_MODES)}")


# ------------------------------------------------------------------------------------ helpers


def _step_inputs(velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor, sample: Tensor,
                 noise_level: float | Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Checked fp32 inputs of a step: velocity and sample (B, ...), and σ, σ', level as (B, 1, ..., 1)."""
    if velocity.shape != sample.shape:
        raise ValueError(f"velocity shape {tuple(velocity.shape)} != sample shape {tuple(sample.shape)}")
    velocity, sample = velocity.float(), sample.float()
    batch, ndim = sample.shape[0], sample.ndim
    sigma_t = _per_row(sigma, batch, ndim, sample.device)
    sigma_next_t = _per_row(sigma_next, batch, ndim, sample.device)
    level = _per_row(noise_level, batch, ndim, sample.device)
    if bool((sigma_next_t >= sigma_t).any()):
        raise ValueError(f"sigma_next must be < sigma; got sigma={sigma}, sigma_next={sigma_next}")
    return velocity, sample, sigma_t, sigma_next_t, level


def _sample_and_score(mean: Tensor, std: Tensor, sample: Tensor, prev_sample: Tensor | None,
                      generator: torch.Generator | None, noise: Tensor | None) -> SdeStep:
    """Draw x' ~ N(mean, std²) (or take the given `prev_sample`) and its mean-reduced log-density."""
    if prev_sample is None:
        if noise is None and bool((std > 0).any()):
            noise = torch.randn(sample.shape, generator=generator, dtype=torch.float32, device=sample.device)
        prev_sample = mean if noise is None else mean + std * noise.float()
    else:
        if prev_sample.shape != sample.shape:
            raise ValueError(f"prev_sample shape {tuple(prev_sample.shape)} != sample shape {tuple(sample.shape)}")
        prev_sample = prev_sample.float()
    return SdeStep(prev_sample, _gaussian_log_prob(prev_sample.detach(), mean, std), mean, std)


def _per_row(value: float | Tensor, batch: int, ndim: int, device: torch.device) -> Tensor:
    """A float, a 0-dim tensor or a [B] tensor as fp32 of shape (B, 1, ..., 1)."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    elif t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"expected a scalar or a tensor of shape [{batch}], got shape {tuple(t.shape)}")
    return t.reshape(batch, *([1] * (ndim - 1)))


def _gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Mean over non-batch elements of log N(x; mean, std²); 0 where std == 0. Shape (B,)."""
    positive = std > 0
    safe_std = torch.where(positive, std, torch.ones_like(std))
    elem = -((x - mean) ** 2) / (2 * safe_std**2) - torch.log(safe_std) - 0.5 * math.log(2 * math.pi)
    log_prob = elem.mean(dim=tuple(range(1, x.ndim)))
    return torch.where(positive.reshape(-1), log_prob, torch.zeros_like(log_prob))
