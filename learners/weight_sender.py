"""The learner side of weight sync: `WeightSenderMixin`, inherited by the learner actors.

Design: docs/design.md#weight-sync. Why a module of its own: this code runs inside every learner
process (next to the DeepSpeed engine), while the coordinators of `learners.weight_sync` run in the
driver and only call it through Ray actor handles.

The mixin needs `self.engine` (the DeepSpeed engine) and `self.rank` (the learner rank). Rank 0 is
rank 0 of a standalone broadcast group that every worker of the model joins (gloo on CPU, NCCL on
GPU); the receivers are `actors.weight_receiver`.

Protocol with ZeRO-3 (parameters partitioned across learner ranks): `broadcast_weights`,
`export_weights_bytes` and `weights_checksum` are collective over the learner group: EVERY
learner rank must call them at the same time (the coordinator does). Each bucket's parameters are
gathered with `deepspeed.zero.GatheredParameters` on all ranks, rank 0 packs and broadcasts that
bucket, and the gathered copies are released before the next bucket: the whole model is never
gathered at once. Without ZeRO-3 the gathers are no-ops and ranks other than 0 return at once.

Names: the learner module's parameter names (HF names for the reasoner, diffusers names for the
transformer) are what the receivers load: vLLM maps HF checkpoint names itself.

Dtype on the wire: the workers' own (`models.*.dtype`, the coordinator's `wire_dtype`), whatever the
learner trains in: a bf16 learner feeding bf16 workers sends its bf16 weights bit for bit at half the
bytes of fp32; an fp32 learner's weights are rounded once, on the sender, as the worker would round them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from rollout.ports import free_port
from rollout.weight_buckets import bucket_meta_for, dtype_from_name, plan_buckets, standalone_group

__all__ = ["WeightSenderMixin", "TRANSFER_MODES"]

# How a bucket travels: packed into one flat buffer ("bucketed") or one broadcast per parameter.
TRANSFER_MODES = ("bucketed", "per_param")


class WeightSenderMixin:
    """Sender side, mixed into the learner actors. Needs `self.engine` and `self.rank`."""

    engine: Any
    rank: int
    _weight_group: Any = None
    _weight_plan_cache: dict | None = None

    # ---- group ------------------------------------------------------------------------------
    def weight_group_address(self) -> tuple[str, int]:
        """(this node's address, a free port) for the group; call on learner rank 0."""
        import ray

        return ray.util.get_node_ip_address(), free_port()

    def init_weight_group(self, master_addr: str, port: int, world_size: int, backend: str = "gloo",
                          timeout_s: float = 300.0) -> None:
        """Create the broadcast group as its rank 0 (learner rank 0 only); a rendezvous with the
        workers' `join_weight_group`."""
        if self.rank != 0:
            raise ValueError(f"init_weight_group on learner rank {self.rank}; only rank 0 sends weights")
        self._weight_group = standalone_group(master_addr, port, 0, world_size, backend, timeout_s)

    def leave_weight_group(self) -> None:
        self._weight_group, self._weight_send_pool = None, None

    # ---- plan -------------------------------------------------------------------------------
    def weight_sync_module(self) -> torch.nn.Module:
        """The module whose parameters the workers hold (override if the engine wraps more)."""
        return self.engine.module

    def weight_sync_tensors(self, changed_only: bool = False) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs the workers load, in a fixed order. changed_only: only those an update
        can change (all of them here; a LoRA learner sends its adapted layers, learners.lora)."""
        return list(self.weight_sync_module().named_parameters())

    def _prepare_weight_transfer(self) -> None:
        """Called (collectively) before every transfer: a LoRA learner refreshes its merged weights."""

    def weight_bucket_meta(self, bucket_mb: float = 50.0, buffer_dtype: str = "float32",
                           changed_only: bool = False) -> list[dict[str, Any]]:
        """Wire metadata of every bucket, identical on every rank (full shapes, not shards); with
        changed_only each dict says so (`changed_only: True`), so a receiver expects a part of its weights."""
        plan = self._weight_plan(bucket_mb, buffer_dtype, changed_only)
        part = changed_only and len(self.weight_sync_tensors(True)) < len(self.weight_sync_tensors(False))
        return [{**meta.to_wire(), **({"changed_only": True} if part else {})} for _, meta in plan]

    # ---- transfer ---------------------------------------------------------------------------
    def broadcast_weights(
        self, version: int, bucket_mb: float = 50.0, mode: str = "bucketed", buffer_dtype: str = "float32",
        changed_only: bool = False,
    ) -> dict[str, float]:
        """Collective over learner ranks: gather bucket by bucket; rank 0 broadcasts each bucket.

        Returns:
            dict(seconds, bytes, buckets, version, peak_gathered_numel, total_numel): bytes is 0
            on ranks other than 0; peak_gathered_numel is the most parameter elements held in full
            at once under ZeRO-3 (the largest bucket, never the whole model), 0 without ZeRO-3.
        """
        if mode not in TRANSFER_MODES:
            raise ValueError(f"unknown weight transfer mode {mode!r}; known: {list(TRANSFER_MODES)}")
        if self.rank == 0 and self._weight_group is None:
            raise ValueError("broadcast_weights before init_weight_group on learner rank 0")
        start = time.perf_counter()
        dtype = dtype_from_name(buffer_dtype)
        self._prepare_weight_transfer()
        plan = self._weight_plan(bucket_mb, buffer_dtype, changed_only)
        largest = max((meta.numel for _, meta in plan), default=0)
        buffers = self._send_buffers(largest, dtype) if self.rank == 0 and mode == "bucketed" else [None, None]
        pending: list[Any] = [None, None]
        sent, peak = 0, 0
        all_params = [p for params, _ in plan for p in params]
        for i, (params, meta) in enumerate(plan):
            slot = i % 2
            if pending[slot] is not None:
                pending[slot].wait()  # double buffering: reuse a buffer once its send is done
                pending[slot] = None
            with _gathered(params):
                peak = max(peak, _gathered_numel(all_params))
                if self.rank != 0:
                    continue
                if mode == "per_param":
                    for p in params:
                        self._weight_group.broadcast(p.data.detach().to(dtype).contiguous(), 0).wait()
                else:
                    flat = buffers[slot][: meta.numel]
                    for p, spec in zip(params, meta.tensors, strict=True):
                        flat[spec.offset : spec.offset + spec.numel].copy_(p.data.reshape(-1))
                    pending[slot] = self._weight_group.broadcast(flat, 0)
            sent += meta.nbytes
        for work in pending:
            if work is not None:
                work.wait()
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "bytes": float(sent if self.rank == 0 else 0), "buckets": float(len(plan)),
                "version": float(version), "peak_gathered_numel": float(peak),
                "total_numel": float(sum(_full_numel(p) for p in all_params))}

    def export_weights_bytes(self, wire_dtype: str = "float32", changed_only: bool = False) -> bytes | None:
        """Collective over learner ranks: the whole module (changed_only: what an update can change,
        `weight_sync_tensors`) as safetensors bytes in `wire_dtype` on rank 0 (None elsewhere).
        Gathers bucket by bucket (50 MB) but holds the full copy on rank 0's CPU."""
        from safetensors.torch import save

        state: dict[str, torch.Tensor] = {}
        self._prepare_weight_transfer()
        for params, meta in self._weight_plan(50.0, wire_dtype, changed_only):
            with _gathered(params):
                if self.rank == 0:
                    for p, spec in zip(params, meta.tensors, strict=True):
                        state[spec.name] = p.data.detach().to("cpu", dtype_from_name(wire_dtype)).clone()
        return save(state) if self.rank == 0 else None

    def weights_checksum(self) -> float | None:
        """Collective over learner ranks: sum of float64 sums of the full parameters (rank 0)."""
        total = torch.zeros((), dtype=torch.float64)
        self._prepare_weight_transfer()
        for params, _ in self._weight_plan(50.0, "float32"):
            with _gathered(params):
                for p in params if self.rank == 0 else ():  # other ranks only join the gathers
                    total += p.data.detach().to(torch.float64).sum().cpu()
        return float(total) if self.rank == 0 else None

    def raw_broadcast(self, numel: int) -> float:
        """Benchmark only: broadcast `numel` fp32 elements with no packing (rank 0)."""
        buf = torch.ones(int(numel), dtype=torch.float32, device=self._weight_device())
        start = time.perf_counter()
        self._weight_group.broadcast(buf, 0).wait()
        return time.perf_counter() - start

    # ---- helpers ----------------------------------------------------------------------------
    def _send_buffers(self, numel: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Two flat send buffers kept between syncs (2 x bucket size of memory on rank 0)."""
        pool = getattr(self, "_weight_send_pool", None)
        if not pool or pool[0].numel() < numel or pool[0].dtype != dtype:
            pool = [torch.empty(numel, dtype=dtype, device=self._weight_device()) for _ in range(2)]
            self._weight_send_pool = pool
        return pool

    def _weight_device(self) -> torch.device:
        return next(self.weight_sync_module().parameters()).device

    def _weight_plan(self, bucket_mb: float, buffer_dtype: str,
                     changed_only: bool = False) -> list[tuple[list[torch.nn.Parameter], Any]]:
        key = (float(bucket_mb), buffer_dtype, bool(changed_only))
        if self._weight_plan_cache is None:
            self._weight_plan_cache = {}
        if key not in self._weight_plan_cache:
            dtype = dtype_from_name(buffer_dtype)
            named = self.weight_sync_tensors(changed_only)
            by_name = {n: p for n, p in named}
            sizes = [(n, _full_numel(p)) for n, p in named]
            element = torch.empty((), dtype=dtype).element_size()
            plan = []
            for names in plan_buckets(sizes, int(bucket_mb * 2**20), element):
                params = [by_name[n] for n in names]
                # every tensor travels and arrives in the wire dtype (the workers' own): no cast on receipt
                meta = bucket_meta_for([(n, _full_shape(p), dtype) for n, p in zip(names, params, strict=True)], dtype)
                plan.append((params, meta))
            self._weight_plan_cache[key] = plan
        return self._weight_plan_cache[key]


def _full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)


def _full_numel(p: torch.nn.Parameter) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def _gathered_numel(params: Sequence[torch.nn.Parameter]) -> int:
    """Elements of ZeRO-3 parameters currently materialised in full on this rank."""
    return sum(int(p.ds_numel) for p in params if hasattr(p, "ds_numel") and p.data.numel() == p.ds_numel)


def _gathered(params: Sequence[torch.nn.Parameter]) -> Any:
    """ZeRO-3 gather of one bucket on every rank (a no-op context without ZeRO-3)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    import contextlib

    return contextlib.nullcontext()
