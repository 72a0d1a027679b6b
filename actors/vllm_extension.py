"""vLLM worker extension: receives weight buckets inside vLLM's own worker process.

Attach with `LLM(..., worker_extension_cls="actors.vllm_extension.WeightSyncExtension")`; vLLM adds
this class to its worker's bases, so `self` is the vLLM worker (it owns `reload_weights`,
`model_runner`, `device`). The project root must be importable in that process (in-process
engine with VLLM_ENABLE_V1_MULTIPROCESSING=0: the actor's own sys.path; multiprocess engine:
PYTHONPATH set before the engine starts). Methods are prefixed `r3rl_` so they never clash with
the worker's own attributes; call them through `llm.collective_rpc("r3rl_...", args=...)`.

Loading goes through the worker's `reload_weights(weights_iterator=..., is_checkpoint_format=True)`
per bucket: it maps HF checkpoint names to vLLM's fused layers and redoes the CPU repacking
(`model.load_weights` directly breaks after the first load on CPU). Buckets hold whole layers, so
every fused layer sees all its parts in one reload. Caches are reset by the caller (driver side).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rollout.weight_buckets import receive_buckets, standalone_group, tensors_checksum

__all__ = ["WeightSyncExtension"]

logger = logging.getLogger(__name__)


class WeightSyncExtension:
    """Mixed into vLLM's worker class. Thin: receive tensors, hand them to `reload_weights`."""

    _r3rl_group: Any = None

    def r3rl_join_weight_group(self, master_addr: str, port: int, rank: int, world_size: int, backend: str) -> None:
        self._r3rl_group = standalone_group(master_addr, port, rank, world_size, backend)

    def r3rl_leave_weight_group(self) -> None:
        self._r3rl_group = None

    def r3rl_receive_weights(self, bucket_meta: list[dict[str, Any]], mode: str) -> int:
        """Receive every bucket of one broadcast and reload it; returns the bucket count."""
        if self._r3rl_group is None:
            raise ValueError("r3rl_receive_weights before r3rl_join_weight_group")
        count = 0
        for named in receive_buckets(self._r3rl_group, bucket_meta, device=self.device,
                                     per_param=mode == "per_param"):
            self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
            count += 1
        return count

    def r3rl_load_safetensors(self, data: bytes) -> None:
        from safetensors.torch import load

        state = load(bytes(data))
        self.reload_weights(weights_iterator=iter(state.items()), is_checkpoint_format=True)

    def r3rl_weights_checksum(self) -> float:
        return tensors_checksum(self.model_runner.get_model().parameters())

    def r3rl_raw_broadcast(self, numel: int) -> float:
        buf = torch.empty(int(numel), dtype=torch.float32, device=self.device)
        self._r3rl_group.broadcast(buf, 0).wait()
        return float(buf[:1].sum()) if numel else 0.0
