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

Checksum: on CPU vLLM repacks linear weights into opaque oneDNN handles (the `weight` parameters
become empty), so the model's parameters cannot be summed. The extension instead records the
float64 sum of every tensor it handed to `reload_weights`, per checkpoint name, as a 0-dim tensor
on the device (`tensor_sum64`: no host sync, a bounded temporary; a few ms per sync of a 7B model on
a GPU); names never reloaded count with their value in the checkpoint files the engine started
from, read only when a checksum is asked for (never during a sync: for a 7B model that is 15 GB
from disk). That is the fingerprint of the weights the engine was given; that they took effect is
checked by tests that compare vLLM's greedy output with transformers' on the same weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from rollout.sync_ranks import process_rank
from rollout.weight_buckets import receive_buckets, standalone_group, tensor_sum64, tensors_checksum

__all__ = ["WeightSyncExtension"]

logger = logging.getLogger(__name__)


class WeightSyncExtension:
    """Mixed into vLLM's worker class. Thin: receive tensors, hand them to `reload_weights`."""

    _r3rl_group: Any = None
    _r3rl_file_sums: dict[str, float] | None = None  # per name, of the checkpoint files the engine started from
    _r3rl_given_sums: dict[str, torch.Tensor] | None = None  # per name, of the tensors reloaded since

    def r3rl_engine_rank(self) -> tuple[int, int]:
        """(this process's rank inside the engine, the engine's process count: tp x pp)."""
        return int(self.rank), int(self.parallel_config.world_size)

    def r3rl_join_weight_group(self, master_addr: str, port: int, first_rank: int, world_size: int,
                               backend: str, timeout_s: float = 300.0) -> None:
        """Join as group rank `first_rank` + this process's engine rank (rollout.sync_ranks): every
        tensor-parallel rank receives the full tensors and `reload_weights` keeps its shard."""
        rank = process_rank(first_rank, *self.r3rl_engine_rank())
        self._r3rl_group = standalone_group(master_addr, port, rank, world_size, backend, timeout_s)

    def r3rl_leave_weight_group(self) -> None:
        self._r3rl_group, self._r3rl_pool = None, None

    def r3rl_receive_weights(self, bucket_meta: list[dict[str, Any]], mode: str) -> int:
        """Receive every bucket of one broadcast and reload it; returns the bucket count."""
        if self._r3rl_group is None:
            raise ValueError("r3rl_receive_weights before r3rl_join_weight_group")
        count = 0
        if getattr(self, "_r3rl_pool", None) is None:
            self._r3rl_pool = []  # two flat receive buffers, reused across syncs
        for named in receive_buckets(self._r3rl_group, bucket_meta, device=self.device,
                                     per_param=mode == "per_param", pool=self._r3rl_pool):
            self._r3rl_reload(named)
            count += 1
        return count

    def r3rl_load_safetensors(self, data: bytes) -> None:
        from safetensors.torch import load

        self._r3rl_reload(list(load(bytes(data)).items()))

    def r3rl_weights_checksum(self) -> float:
        """Sum over checkpoint names of the float64 sums of the weights this engine was given."""
        if self._r3rl_file_sums is None:
            self._r3rl_file_sums = self._r3rl_checkpoint_sums()
        given = {name: float(s) for name, s in (self._r3rl_given_sums or {}).items()}
        return float(sum({**self._r3rl_file_sums, **given}.values()))

    def _r3rl_reload(self, named: list[tuple[str, torch.Tensor]]) -> None:
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        if self._r3rl_given_sums is None:
            self._r3rl_given_sums = {}
        for name, tensor in named:
            self._r3rl_given_sums[name] = tensor_sum64(tensor)

    def _r3rl_checkpoint_sums(self) -> dict[str, float]:
        from safetensors import safe_open

        folder = Path(self.vllm_config.model_config.model)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise ValueError(f"no *.safetensors in {folder}: cannot fingerprint the starting weights")
        sums: dict[str, float] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sums[name] = tensors_checksum([f.get_tensor(name)])
        return sums

    def r3rl_raw_broadcast(self, numel: int) -> float:
        buf = torch.empty(int(numel), dtype=torch.float32, device=self.device)
        self._r3rl_group.broadcast(buf, 0).wait()
        return float(buf[:1].sum()) if numel else 0.0
