"""What the text and diffusion learners share: rank setup, engine access, checksums, saving.

A learner is a plain class (usable in-process; `learners.group` wraps it with `ray.remote`).
Lifecycle: construct (joins the process group, builds the DeepSpeed engine) -> `train_step` /
`compute_*` calls, identical in number and order on every rank (they are collective) -> the
weight sender methods of `WeightSenderMixin` -> process exit. Invariant: every rank holds the same
logical weights after each `train_step`.

Non-finite guard (`learners.finite`): a `train_step` whose advantages, losses or gradients are not
finite makes no optimizer update and no lr-schedule step on any rank, and reports
`skipped_nonfinite: 1` (with `nonfinite_advantages` / `nonfinite_loss` counts) in its metrics.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from learners import ds_engine, finite
from learners.weight_sender import WeightSenderMixin
from rollout.ports import free_port

__all__ = ["LearnerBase", "split_even"]

log = logging.getLogger(__name__)


class LearnerBase(WeightSenderMixin):
    """Holds `self.engine` (DeepSpeed), `self.rank`, `self.world_size`, `self.dtype`, `self.device`."""

    engine: Any
    rank: int
    world_size: int
    lora: Any = None  # learners.lora.LoraAdapters when only LoRA adapters are trained

    def _setup_dist(self, rank: int | None, world_size: int | None, master_addr: str | None,
                    master_port: int | None, backend: str | None, seed: int) -> None:
        from learners import memory

        memory.return_freed_memory_promptly()  # before any weights load (learners.memory)
        if rank is not None or world_size is not None:
            if rank is None or world_size is None:
                raise ValueError(f"give both rank and world_size (got rank={rank}, world_size={world_size})")
            ds_engine.set_dist_env(rank, world_size, master_addr or "127.0.0.1",
                                   master_port or free_port())
        info = ds_engine.dist_info_from_env()
        self.rank, self.world_size = info.rank, info.world_size
        self.backend = ds_engine.init_distributed(backend)
        self.device = torch.device(f"cuda:{info.local_rank}") if ds_engine.on_gpu() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        torch.manual_seed(seed)
        self.version = 0

    # ---- plumbing ---------------------------------------------------------------------------
    def ready(self) -> dict[str, Any]:
        """Cheap liveness probe; also tells the group where this rank runs."""
        return {"rank": self.rank, "world_size": self.world_size, "pid": os.getpid(),
                "zero_stage": self.engine.zero_optimization_stage(), "backend": self.backend}

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """All trained parameters as full fp32 CPU tensors (collective under ZeRO-3)."""
        return ds_engine.full_state_dict(self.engine.module)

    def state_dict_checksum(self) -> float:
        """Sum of float64 sums of all trained parameters (collective under ZeRO-3)."""
        from rollout.weight_buckets import tensors_checksum

        return tensors_checksum(self.full_state_dict().values())

    def memory_stats(self) -> dict[str, float]:
        """This rank's memory: bytes of the tensors it holds by owner (params, grads, optimizer,
        reference; `learners.memory.rank_tensor_bytes`), the full model's bytes in the learner's
        dtype, the process's RSS now and at its peak, and what loading the weights cost where the
        learner measured it (`load_rss_before_bytes`, `load_rss_after_bytes`,
        `load_peak_growth_bytes`: `learners.memory.measured_span`). Not collective."""
        from learners import memory

        held = memory.rank_tensor_bytes(self.engine, getattr(self, "ref_model", None))
        full = sum(int(getattr(p, "ds_numel", p.numel())) for p in self.engine.module.parameters())
        return {**{f"{k}_bytes": float(v) for k, v in held.items()},
                "full_model_bytes": float(full * torch.empty((), dtype=self.dtype).element_size()),
                "rss_bytes": float(memory.rss_bytes()), "peak_rss_bytes": float(memory.peak_rss_bytes()),
                **{f"load_{k}": v for k, v in getattr(self, "load_memory", {}).items()}}

    def save(self, out_dir: str) -> str | None:
        """Safetensors in HF / diffusers format plus the source folder's side files (rank 0 writes);
        with LoRA the adapters alone (`learners.lora`: the base is the model path).

        Collective under ZeRO-3. Returns the folder on rank 0, None elsewhere.
        """
        if self.lora is not None:
            out = self.lora.save_adapters(self.engine.module, out_dir, self.rank, self.model_path)
            return str(out) if out is not None else None
        out = ds_engine.save_hf_module(self.engine.module, out_dir, self.rank)
        if out is not None:
            self._copy_side_files(Path(out))
        return str(out) if out is not None else None

    # ---- LoRA: the workers receive merged weights in the un-wrapped model's names (learners.lora)
    def weight_sync_tensors(self, changed_only: bool = False) -> list[tuple[str, torch.Tensor]]:
        if self.lora is None:
            return super().weight_sync_tensors(changed_only)
        return self.lora.sync_tensors(self.engine.module, changed_only, self.rank)

    def _prepare_weight_transfer(self) -> None:
        if self.lora is not None:
            self.lora.refresh_merged(self.rank)

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the workers hold after a sync, full fp32 CPU tensors (collective under ZeRO-3):
        `full_state_dict` without LoRA, else the base with the adapters merged."""
        if self.lora is None:
            return self.full_state_dict()
        return self.lora.merged_state_dict(self.engine.module)

    def _copy_side_files(self, out: Path) -> None:
        """Tokenizer / processor files next to the weights, so the folder loads on its own."""
        import shutil

        src = Path(self.model_path)
        for f in src.iterdir():
            if f.is_file() and f.suffix not in (".safetensors", ".bin") and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)

    # ---- step helpers -----------------------------------------------------------------------
    def _plan_micro_batches(self, n_local: int, collective: bool = True) -> list[slice]:
        """Split n_local samples into micro-batches; `collective`: as many as every other rank."""
        if n_local < 1:
            raise ValueError("need at least one sample on every rank")
        num_micro = math.ceil(n_local / self.micro_batch_size)
        if not collective:
            return split_even(n_local, num_micro)
        num_micro = int(ds_engine.all_reduce_max(num_micro))
        if num_micro > n_local:
            raise ValueError(f"rank {self.rank} has {n_local} samples but the group needs {num_micro} "
                             "micro-batches; shard the batch evenly across ranks")
        return split_even(n_local, num_micro)

    def _begin_update(self, advantages: Any) -> int:
        """Start of a `train_step` (collective): note DeepSpeed's skipped-step count, and return the
        number of non-finite advantages over all ranks (non-zero: the caller returns `_refused_update`)."""
        self._skipped_before = int(self.engine.skipped_steps)
        return int(ds_engine.all_reduce_sum(finite.count_nonfinite(advantages)))

    def _refused_update(self, nonfinite_advantages: int, start: float) -> dict[str, float]:
        """Metrics of a step refused before any forward: no optimizer update, no lr-schedule step.

        The version still advances: it counts steps in lockstep with the driver's policy version."""
        if self.rank == 0:
            log.warning("update skipped: %d non-finite advantages", nonfinite_advantages)
        self.version += 1
        return {"skipped_nonfinite": 1.0, "nonfinite_advantages": float(nonfinite_advantages),
                "nonfinite_loss": 0.0, "lr": float(self.engine.get_lr()[0]),
                "step_seconds": time.perf_counter() - start, "version": float(self.version)}

    def _engine_step(self, is_last: bool) -> None:
        """engine.step(); at the boundary of ZeRO stage 0 (which records no norm) note the grad norm,
        and refuse the update if it is not finite (`_skip_plain_step`)."""
        if is_last and self.engine.zero_optimization_stage() == 0:
            grads = [p.grad.detach().float() for p in self.engine.module.parameters() if p.grad is not None]
            self._stage0_grad_norm = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
            if not math.isfinite(self._stage0_grad_norm) and not hasattr(self.engine.optimizer, "overflow"):
                self._skip_plain_step()
                return
        self.engine.step()

    def _skip_plain_step(self) -> None:
        """Book a boundary step without an update, for a plain torch optimizer (ZeRO-0 in fp32), which
        has no gradient check of its own. DeepSpeed's engine step runs with the optimizer's `step`
        made a no-op and the step flagged as an overflow, as DeepSpeed's own ZeRO and bf16 optimizers
        flag a non-finite gradient: the engine then drops the gradients, counts the step in
        `skipped_steps`, leaves the lr schedule and keeps its micro-step counter in line."""
        opt = self.engine.optimizer
        own_step = opt.__dict__.get("step")  # an instance-level wrapper (the lr scheduler's), if any
        opt.step = _no_update
        opt.overflow = True  # read by DeepSpeedEngine._take_model_step
        try:
            self.engine.step()
        finally:
            del opt.overflow
            if own_step is None:
                del opt.step
            else:
                opt.step = own_step

    def _finish_step(self, sums: dict[str, float], mins: dict[str, float], maxs: dict[str, float],
                     start: float, unit: str) -> dict[str, float]:
        """Optimizer bookkeeping after the boundary step + metrics reduced over all ranks."""
        keys = sorted(sums)
        totals = [ds_engine.all_reduce_sum(sums[k]) for k in keys]
        metrics = dict(zip(keys, totals, strict=True))
        for k, v in mins.items():
            metrics[k] = -ds_engine.all_reduce_max(-v)
        for k, v in maxs.items():
            metrics[k] = ds_engine.all_reduce_max(v)
        grad_norm = self.engine.get_global_grad_norm()
        if self.engine.zero_optimization_stage() == 0:
            grad_norm = self._stage0_grad_norm  # pre-clip norm of the all-reduced gradient
        metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        metrics["lr"] = float(self._lr_used)
        skipped = int(self.engine.skipped_steps) > self._skipped_before
        metrics["skipped_nonfinite"] = float(skipped)
        metrics.setdefault("nonfinite_advantages", 0.0)
        if skipped and self.rank == 0:
            log.warning("update skipped: non-finite gradient (%d non-finite micro-batch losses)",
                        int(metrics.get("nonfinite_loss", 0)))
        elapsed = time.perf_counter() - start
        metrics["step_seconds"] = elapsed
        metrics[f"{unit}_per_s"] = metrics.get(f"num_{unit}", 0.0) / max(elapsed, 1e-9)
        self.version += 1
        metrics["version"] = float(self.version)
        return metrics


def _no_update(*_args: Any, **_kwargs: Any) -> None:
    """Stands in for an optimizer's `step` during a skipped update (`LearnerBase._skip_plain_step`)."""


def split_even(n: int, parts: int) -> list[slice]:
    """Contiguous slices of sizes differing by at most one (first ones larger)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(slice(start, start + size))
        start += size
    return out
