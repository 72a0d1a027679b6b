"""The null arm of a learning claim: advantages shuffled within a batch.

A run whose learners receive the batch's advantages in a random order makes updates of the same
size, on the same samples, with the same optimiser state and learning-rate schedule as a real run,
but the advantage no longer says anything about the sample it is attached to. Whatever such a run
"learns" (drift from the KL term, the optimiser's own motion, which samples happen to be drawn) is
the baseline a real run must beat: a learning claim is arm − null on the same seeds, not after −
before (`train.null_advantages`, docs/design.md#the-r3-algorithm).

Pure torch; the permutation comes from a `torch.Generator` seeded by the caller, so a null run is
reproducible and its permutation differs between steps and between the text and image batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["shuffle_advantages", "null_seed"]


def shuffle_advantages(advantages: Tensor, seed: int) -> Tensor:
    """`advantages` [B] in a random order (a permutation drawn from `torch.Generator` seeded with
    `seed`). The multiset of values is kept exactly, so the batch's mean, spread and update size are
    those of the real batch; only which sample gets which value is random."""
    if advantages.dim() != 1:
        raise ValueError(f"advantages must be 1-D [B], got shape {tuple(advantages.shape)}")
    gen = torch.Generator().manual_seed(seed)
    return advantages[torch.randperm(advantages.numel(), generator=gen)]


def null_seed(run_seed: int, step_index: int, side: str) -> int:
    """The permutation seed of one batch: depends only on (run seed, step, side), so a resumed run
    redraws the same permutations, and the text and image batches of a step are shuffled apart."""
    sides = ("text", "image")
    if side not in sides:
        raise ValueError(f"side={side!r}; allowed: {sides}")
    return (run_seed * 1_000_003 + step_index) * 2 + sides.index(side)
