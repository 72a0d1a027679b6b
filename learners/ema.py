"""Copies of a learner's trained parameters kept beside the live ones: an exponential moving
average for evaluation, and frozen snapshots of the policy that drew a batch (DiffusionNFT's v_old,
several updates per batch).

A `ParameterShadow` holds fp32 copies of the parameters that require gradients (all of them, or
only the LoRA adapters), by name, on the parameters' device. `swapped_in` puts the copies into the
module for a forward pass or a weight sync and restores the live values bit for bit afterwards.
Engines whose parameters are partitioned across ranks (ZeRO-3) are refused: each rank would hold
only a partition of each copy (`check_supported`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

__all__ = ["ParameterShadow", "ema_update", "warmed_up_decay", "check_supported"]


def ema_update(average: Tensor, value: Tensor, decay: float) -> Tensor:
    """In place: average ← decay·average + (1 − decay)·value; returns `average`.

    decay ∈ [0, 1): 0 copies `value`. Shapes equal; `value` is cast to the average's dtype.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    return average.mul_(decay).add_(value.detach().to(average.dtype), alpha=1.0 - decay)


def warmed_up_decay(decay: float, updates_done: int) -> float:
    """The decay of the EMA's next update after `updates_done` updates: min(d, (1 + n) / (10 + n)).

    Without a warm-up an EMA with d = 0.99 still weighs the initial weights by 0.99^n after n updates
    (0.74 after 30), so early evaluations mostly see the starting point. The warm-up (diffusers'
    `EMAModel` default, also Flow-GRPO's) lets the average follow the weights at first: 0.1 for the
    first update, 0.5 after 8, d once (1 + n) / (10 + n) passes it (n = 890 for d = 0.99).
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    if updates_done < 0:
        raise ValueError(f"updates_done must be >= 0, got {updates_done}")
    return min(decay, (1 + updates_done) / (10 + updates_done))


def check_supported(zero_stage: int, what: str) -> None:
    """Refuse ZeRO-3, where no rank holds whole parameters to copy."""
    if zero_stage == 3:
        raise ValueError(f"{what} keeps whole copies of the trained parameters, which ZeRO-3 partitions: "
                         "use flow_grpo.zero_stage 0, 1 or 2")


def _trained(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


class ParameterShadow:
    """fp32 copies of `module`'s trained parameters, by name."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.tensors: dict[str, Tensor] = {n: p.detach().float().clone() for n, p in _trained(module).items()}
        if not self.tensors:
            raise ValueError("the module has no trained parameters to copy")
        self._live: dict[str, Tensor] | None = None

    @torch.no_grad()
    def copy_from(self, module: torch.nn.Module) -> None:
        """The copies become the module's current values."""
        for name, p in self._pairs(module):
            self.tensors[name].copy_(p.detach())

    @torch.no_grad()
    def ema_step(self, module: torch.nn.Module, decay: float) -> None:
        """copies ← decay·copies + (1 − decay)·module's values (`ema_update`)."""
        for name, p in self._pairs(module):
            ema_update(self.tensors[name], p, decay)

    @contextmanager
    def swapped_in(self, module: torch.nn.Module) -> Iterator[None]:
        """Inside: the module's trained parameters hold the copies (in their dtype); after: the live values
        again, exactly (they are kept aside, not recomputed)."""
        self.swap_in(module)
        try:
            yield
        finally:
            self.swap_out(module)

    @torch.no_grad()
    def swap_in(self, module: torch.nn.Module) -> None:
        """Put the copies into the module, keeping the live values aside (undo with `swap_out`)."""
        if self._live is not None:
            raise RuntimeError("the copies are already swapped in")
        self._live = {}
        for name, p in self._pairs(module):
            self._live[name] = p.detach().clone()
            p.copy_(self.tensors[name].to(p.dtype))

    @torch.no_grad()
    def swap_out(self, module: torch.nn.Module) -> None:
        """Restore the live values that `swap_in` kept aside, bit for bit."""
        if self._live is None:
            raise RuntimeError("the copies are not swapped in")
        for name, p in self._pairs(module):
            p.copy_(self._live[name])
        self._live = None

    def state_dict(self) -> dict[str, Tensor]:
        """CPU copies, for a checkpoint."""
        return {n: t.detach().cpu().clone() for n, t in self.tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.tensors) - set(state))
        extra = sorted(set(state) - set(self.tensors))
        if missing or extra:
            raise ValueError(f"saved parameter copies do not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}; resume with the same flow_grpo.lora settings")
        for name, t in self.tensors.items():
            if tuple(state[name].shape) != tuple(t.shape):
                raise ValueError(f"saved copy of {name} has shape {tuple(state[name].shape)}, "
                                 f"the model {tuple(t.shape)}")
            t.copy_(state[name])

    def _pairs(self, module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        params = _trained(module)
        if set(params) != set(self.tensors):
            raise ValueError("the module's trained parameters changed since the copies were made")
        return iter(params.items())
