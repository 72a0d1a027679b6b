"""Finiteness checks before a learner update and around checkpoints (pure: torch only).

A NaN or ±inf that reaches an optimizer step spreads into every weight, and from there into every
later rollout, checkpoint and evaluation. So the learners refuse such a step instead of taking it
(`learners.learner_base.LearnerBase`): advantages are counted before any forward
(`count_nonfinite`); a micro-batch loss that is not finite is poisoned (`poison_nonfinite`) so that
its gradient is NaN, and an update whose gradient is not finite is skipped on every rank (DeepSpeed's
ZeRO and bf16 optimizers skip it themselves; the plain ZeRO-0 optimizer is handled by the learner).
Checkpoints refuse non-finite weights on save and on load (`check_finite_tensors`), naming the tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["NonFiniteError", "count_nonfinite", "nonfinite_tensors", "check_finite_tensors", "poison_nonfinite"]


class NonFiniteError(ValueError):
    """Values that must be finite are NaN or ±inf (weights to save or load; the message names them)."""


def count_nonfinite(values: Tensor | Iterable[float]) -> int:
    """Number of NaN and ±inf entries of a tensor or a sequence of floats (0 for an empty one)."""
    if isinstance(values, Tensor):
        if not values.is_floating_point():
            return 0
        return int((~torch.isfinite(values)).sum())
    return sum(not math.isfinite(float(v)) for v in values)


def nonfinite_tensors(named: Mapping[str, Tensor]) -> list[tuple[str, int]]:
    """(name, number of NaN/±inf entries) of every floating-point tensor that has some, in `named`'s order."""
    out = []
    for name, t in named.items():
        bad = count_nonfinite(t.detach())
        if bad:
            out.append((name, bad))
    return out


def check_finite_tensors(named: Mapping[str, Tensor], where: str) -> None:
    """Raise `NonFiniteError` naming the first tensors with NaN/±inf entries; `where` says whose they are.

    Raises:
        NonFiniteError: e.g. "weights of checkpoint X: tensor 'lm_head.weight' has 12 of 4096 entries NaN or
            ±inf (2 tensors in all)".
    """
    bad = nonfinite_tensors(named)
    if not bad:
        return
    name, count = bad[0]
    more = f" ({len(bad)} tensors in all: {[n for n, _ in bad[:5]]})" if len(bad) > 1 else ""
    raise NonFiniteError(
        f"{where}: tensor {name!r} has {count} of {named[name].numel()} entries NaN or ±inf{more}"
    )


def poison_nonfinite(loss: Tensor) -> Tensor:
    """`loss` unchanged if finite, else `loss · NaN`.

    The backward of the poisoned loss makes the gradient of every parameter it reaches NaN (also
    where the chain rule would give 0), so the gradient check before the optimizer step refuses the
    update; gradients are averaged over data-parallel ranks before that check, so every rank refuses it.
    loss: a scalar (0-dim) tensor.
    """
    if loss.dim() != 0:
        raise ValueError(f"poison_nonfinite takes a scalar loss, got shape {tuple(loss.shape)}")
    return loss if bool(torch.isfinite(loss)) else loss * math.nan
