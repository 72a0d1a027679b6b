"""What a learner rank holds in memory: measured tensor bytes, the ZeRO arithmetic, and RSS.

Why: ZeRO stages trade communication for memory, and a lean start (learners.lean_init) only
pays off if no rank ever holds a whole copy. `rank_tensor_bytes` counts what a rank really holds
(every distinct tensor storage reachable from the engine's module, its optimizer and a reference
module, each storage once, so views into DeepSpeed's flat buffers are not counted twice);
`zero_model_state_bytes` is what the ZeRO paper's arithmetic expects; `rss_bytes` is the process.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

__all__ = ["ModelStateBytes", "zero_model_state_bytes", "rank_tensor_bytes", "rss_bytes", "peak_rss_bytes"]

FP32_BYTES = 4
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32


class ModelStateBytes(NamedTuple):
    """Bytes of one rank's training state by kind (ZeRO paper, section 3.1)."""

    params: int  # the module's weights in the compute dtype
    grads: int  # gradients in the compute dtype
    master: int  # fp32 master weights (none when the compute dtype is fp32)
    optimizer: int  # Adam moments

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def zero_model_state_bytes(numel: int, world_size: int, stage: int, param_bytes: int) -> ModelStateBytes:
    """Expected model-state bytes per rank for `numel` trained parameters under ZeRO `stage`.

    Stage 1 partitions the optimizer state (master + moments), 2 also the gradients, 3 also the
    weights; a partition is ceil(numel / world_size) elements. param_bytes: 4 (fp32) or 2 (bf16,
    which adds fp32 master weights).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1 or numel < 0:
        raise ValueError(f"need world_size >= 1 and numel >= 0, got {world_size} and {numel}")
    if param_bytes not in (2, 4):
        raise ValueError(f"param_bytes must be 2 (bf16) or 4 (fp32), got {param_bytes}")
    part = math.ceil(numel / world_size)
    opt_numel = part if stage >= 1 else numel
    return ModelStateBytes(
        params=(part if stage >= 3 else numel) * param_bytes,
        grads=(part if stage >= 2 else numel) * param_bytes,
        master=opt_numel * FP32_BYTES if param_bytes != FP32_BYTES else 0,
        optimizer=opt_numel * ADAM_STATE_BYTES,
    )


def rank_tensor_bytes(engine: Any, reference: torch.nn.Module | None = None) -> dict[str, int]:
    """Bytes of distinct tensor storages this rank holds, by owner.

    Returns dict(params, grads, optimizer, reference, total): params = the module's parameters
    (under ZeRO-3 the local partitions, plus the few persistent small ones), grads = their
    gradients, optimizer = what the optimizer holds beyond those (master weights, moments, flat
    gradient partitions and buckets), reference = a frozen reference module or engine. A storage
    is counted once, with the first owner in that order.
    """
    seen: set[int] = set()
    module = engine.module
    params = list(module.parameters())
    out = {
        "params": _storage_bytes(_param_tensors(params), seen),
        "grads": _storage_bytes((p.grad for p in params if p.grad is not None), seen),
        "optimizer": _storage_bytes(_reachable_tensors(engine.optimizer), seen),
        "reference": 0,
    }
    if reference is not None:
        ref_module = getattr(reference, "module", reference)
        out["reference"] = _storage_bytes(_param_tensors(list(ref_module.parameters())), seen)
    out["total"] = sum(out.values())
    return out


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def peak_rss_bytes() -> int:
    """Highest resident set size of this process so far (getrusage; KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _param_tensors(params: list[torch.nn.Parameter]) -> Iterable[torch.Tensor]:
    for p in params:
        yield p.data
        if hasattr(p, "ds_tensor"):  # ZeRO-3: this rank's partition
            yield p.ds_tensor


def _reachable_tensors(obj: Any, depth: int = 0) -> Iterable[torch.Tensor]:
    """Tensors in an optimizer's attributes, containers and inner optimizer's state (bounded depth)."""
    if depth > 5 or obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
        if isinstance(obj, torch.nn.Parameter) and obj.grad is not None:
            yield obj.grad
        if hasattr(obj, "ds_tensor"):
            yield obj.ds_tensor
        return
    if isinstance(obj, dict):
        for v in list(obj.values()):
            yield from _reachable_tensors(v, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _reachable_tensors(v, depth + 1)
        return
    if isinstance(obj, torch.optim.Optimizer) or hasattr(obj, "__dict__") and depth <= 1:
        if isinstance(obj, torch.optim.Optimizer):
            yield from _reachable_tensors(dict(obj.state), depth + 1)
            yield from _reachable_tensors([g["params"] for g in obj.param_groups], depth + 1)
        for name, v in list(vars(obj).items()):
            if name not in ("module", "_modules", "param_coordinator"):
                yield from _reachable_tensors(v, depth + 1)


def _storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int]) -> int:
    total = 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total
