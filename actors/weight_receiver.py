"""Receiving side of the weight sync, as mixins for the rollout workers (docs/design.md#weight-sync).

Protocol (driven by `learners.weight_sync.WeightSync`, the sender is learner rank 0 = group rank 0):
1. `weight_group_size()` says how many group ranks a worker takes (one per process holding the
   weights: tensor_parallel_size x pipeline stages for vLLM); the coordinator lays the ranks out
   with `rollout.sync_ranks`. Then `join_weight_group(master_addr, port, first_rank, world_size,
   backend)` on every worker, concurrently with the sender's `init_weight_group` (a rendezvous).
2. Per update: `receive_weights(version, bucket_meta)` on every worker, concurrently with the
   sender's `broadcast_weights(version)`; `bucket_meta` is the list of wire dicts from
   `WeightSenderMixin.weight_bucket_meta`. Returns the version now held.
3. Object-store fallback / late joiners: `load_weights_bytes(version, data)` with safetensors bytes.
4. `weights_checksum()` for tests: compare with the learner's.

`TextWeightReceiver` (for `actors.text_worker.TextWorker`: `self.llm`, `self._version`,
`self.reset_caches()`) forwards into vLLM's own worker through `llm.collective_rpc` to
`actors.vllm_extension.WeightSyncExtension`, which must be the engine's `worker_extension_cls`.
`TorchWeightReceiver` (for `actors.diffusion_worker.DiffusionWorker`: `self.transformer`,
`self._version`) copies into the module's parameters in place.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from rollout.weight_buckets import receive_buckets, standalone_group, tensors_checksum

__all__ = ["EXTENSION_CLS", "TextWeightReceiver", "TorchWeightReceiver"]

logger = logging.getLogger(__name__)

EXTENSION_CLS = "actors.vllm_extension.WeightSyncExtension"
_MODES = ("bucketed", "per_param")


def _timed_load(method: Callable[..., int]) -> Callable[..., int]:
    """Add the call's wall seconds to the worker's `weight_load_seconds()` (also when it raises): the
    worker's own share of a weight sync, receiving and loading, that a profile sets beside the sender's."""

    @functools.wraps(method)
    def timed(self: Any, *args: Any, **kwargs: Any) -> int:
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            self._weight_load_s = getattr(self, "_weight_load_s", 0.0) + time.perf_counter() - start

    return timed


def _check_mode(mode: str) -> bool:
    if mode not in _MODES:
        raise ValueError(f"unknown weight transfer mode {mode!r}; known: {list(_MODES)}")
    return mode == "per_param"


class TextWeightReceiver:
    """Mixin for the vLLM text worker. Needs `self.llm`, `self._version`, `self.reset_caches()`."""

    llm: Any
    _version: int

    def weight_group_size(self) -> int:
        """Group ranks this worker takes: one per vLLM process (tensor_parallel_size x pipeline stages)."""
        ranks = self.llm.collective_rpc("r3rl_engine_rank")
        if sorted(r for r, _ in ranks) != list(range(ranks[0][1])):
            raise RuntimeError(f"vLLM engine reported process ranks {ranks}; expected each of 0..{ranks[0][1] - 1} once")
        return len(ranks)

    def join_weight_group(
        self, master_addr: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0
    ) -> None:
        """Join the standalone broadcast group: engine process r takes group rank `rank` + r
        (`rank` >= 1 is this worker's first rank, rollout.sync_ranks; rank 0 is the learner)."""
        self.llm.collective_rpc("r3rl_join_weight_group", args=(master_addr, int(port), int(rank),
                                                                  int(world_size), backend, float(timeout_s)))

    def leave_weight_group(self) -> None:
        self.llm.collective_rpc("r3rl_leave_weight_group")

    @_timed_load
    def receive_weights(self, version: int, bucket_meta: list[dict[str, Any]], mode: str = "bucketed") -> int:
        """Receive one broadcast into vLLM's worker, reset caches, and hold `version`."""
        _check_mode(mode)
        self.llm.collective_rpc("r3rl_receive_weights", args=(list(bucket_meta), mode))
        self.reset_caches()
        self._version = int(version)
        return self._version

    @_timed_load
    def load_weights_bytes(self, version: int, data: bytes, changed_only: bool = False) -> int:
        """Object-store path: a safetensors blob of the whole model (HF names), or with changed_only
        a part of it (vLLM keeps the layers it is not given)."""
        self.llm.collective_rpc("r3rl_load_safetensors", args=(bytes(data),))
        self.reset_caches()
        self._version = int(version)
        return self._version

    def weight_load_seconds(self) -> float:
        """Seconds spent in `receive_weights` and `load_weights_bytes` since the worker started."""
        return getattr(self, "_weight_load_s", 0.0)

    def weights_checksum(self) -> float:
        """Sum of float64 sums of vLLM's parameters (fused layers keep every element)."""
        return float(self.llm.collective_rpc("r3rl_weights_checksum")[0])

    def raw_broadcast(self, numel: int) -> float:
        """Benchmark only: receive `numel` fp32 elements with no packing or loading."""
        return float(self.llm.collective_rpc("r3rl_raw_broadcast", args=(int(numel),))[0])


class TorchWeightReceiver:
    """Mixin for a worker holding a plain torch module in `self.transformer` (diffusers)."""

    transformer: torch.nn.Module
    _version: int
    _weight_group: Any = None

    def weight_group_size(self) -> int:
        """Group ranks this worker takes: one (a single process holds the module)."""
        return 1

    def join_weight_group(
        self, master_addr: str, port: int, rank: int, world_size: int, backend: str = "gloo", timeout_s: float = 300.0
    ) -> None:
        """Join the standalone broadcast group as `rank` (>= 1; rank 0 is the learner)."""
        self._weight_group = standalone_group(master_addr, port, rank, world_size, backend, timeout_s)

    def leave_weight_group(self) -> None:
        self._weight_group, self._weight_pool = None, None

    @_timed_load
    def receive_weights(self, version: int, bucket_meta: list[dict[str, Any]], mode: str = "bucketed") -> int:
        """Receive one broadcast, copy every tensor into `self.transformer`, hold `version`."""
        per_param = _check_mode(mode)
        if self._weight_group is None:
            raise ValueError("receive_weights before join_weight_group: this worker is in no weight group")
        device = next(self.transformer.parameters()).device
        seen: set[str] = set()
        if getattr(self, "_weight_pool", None) is None:
            self._weight_pool = []  # two flat receive buffers, reused across syncs
        for named in receive_buckets(self._weight_group, bucket_meta, device=device, per_param=per_param,
                                     pool=self._weight_pool):
            seen.update(self._copy_named(named))
        if not any(isinstance(m, dict) and m.get("changed_only") for m in bucket_meta):  # a full sync covers all
            self._check_complete(seen)
        self._version = int(version)
        return self._version

    @_timed_load
    def load_weights_bytes(self, version: int, data: bytes, changed_only: bool = False) -> int:
        """Object-store path: a safetensors blob of the whole module (diffusers names), or with
        changed_only a part of it."""
        from safetensors.torch import load

        state = load(bytes(data))
        seen = self._copy_named(state.items())
        if not changed_only:
            self._check_complete(seen)
        self._version = int(version)
        return self._version

    def weight_load_seconds(self) -> float:
        """Seconds spent in `receive_weights` and `load_weights_bytes` since the worker started."""
        return getattr(self, "_weight_load_s", 0.0)

    def weights_checksum(self) -> float:
        return tensors_checksum(self.transformer.parameters())

    def raw_broadcast(self, numel: int) -> float:
        """Benchmark only: receive `numel` fp32 elements with no packing or loading."""
        buf = torch.empty(int(numel), dtype=torch.float32)
        self._weight_group.broadcast(buf, 0).wait()
        return float(buf[:1].sum()) if numel else 0.0

    def _copy_named(self, named: Any) -> set[str]:
        params = dict(self.transformer.named_parameters())
        names = set()
        with torch.no_grad():
            for name, tensor in named:
                if name not in params:
                    raise ValueError(f"received weight {name!r} that the module does not have")
                target = params[name]
                if tuple(target.shape) != tuple(tensor.shape):
                    raise ValueError(f"weight {name!r}: shape {tuple(tensor.shape)} != module's {tuple(target.shape)}")
                target.copy_(tensor)
                names.add(name)
        return names

    def _check_complete(self, seen: set[str]) -> None:
        missing = {n for n, _ in self.transformer.named_parameters()} - seen
        if missing:
            raise ValueError(f"weight sync left {len(missing)} parameters stale, e.g. {sorted(missing)[:3]}")
