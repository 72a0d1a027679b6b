"""Shared DeepSpeed setup of the learner actors: process group, ZeRO config, AdamW + warm-up.

Why one module: the text and the diffusion learner differ only in their model and loss; the
distributed plumbing (env, `init_distributed` with gloo on CPU / NCCL on GPU, the ZeRO stage,
optimizer, schedule, clipping, bf16 vs fp32, gathering ZeRO-3 parameters, saving) is the same.
DeepSpeed is imported lazily inside the functions so importing this module stays cheap.

Gradient accumulation is sized per `train_step` from the batch (`set_micro_batches`): every rank
runs the same number of micro-batches, and the caller scales each micro-batch loss so that after
DeepSpeed's 1/gas scaling and its data-parallel gradient averaging the gradient equals that of
the full-batch objective (`micro_loss_scale`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from rollout.ports import free_port

__all__ = [
    "DistInfo",
    "set_dist_env",
    "dist_info_from_env",
    "on_gpu",
    "resolve_dtype",
    "init_distributed",
    "build_ds_config",
    "zero3_bucket_sizes",
    "warmup_lambda",
    "initialize_engine",
    "set_micro_batches",
    "micro_loss_scale",
    "all_reduce_sum",
    "all_reduce_max",
    "gathered",
    "full_state_dict",
    "save_hf_module",
    "checkpoint_in_eval",
]

log = logging.getLogger(__name__)


class DistInfo(NamedTuple):
    """Where this process sits in its learner group."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def set_dist_env(rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int = 0) -> None:
    """Write the torch.distributed rendezvous variables for this process."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    os.environ.update(
        MASTER_ADDR=master_addr,
        MASTER_PORT=str(master_port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(local_rank),
    )


def dist_info_from_env() -> DistInfo:
    """Read RANK/WORLD_SIZE/...; a process without them becomes a group of one on a free port."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        set_dist_env(0, 1, "127.0.0.1", free_port())
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(os.environ.get("MASTER_PORT", "0")),
    )


def on_gpu() -> bool:
    return os.environ.get("DS_ACCELERATOR", "") != "cpu" and torch.cuda.is_available()


LEARNER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """The learner's dtype by name: "float32", or "bfloat16" (bf16 weights, activations and
    gradients; fp32 master weights in the optimizer). Named explicitly by the config
    (`grpo.dtype`, `flow_grpo.dtype`), never guessed from the hardware."""
    if dtype not in LEARNER_DTYPES:
        raise ValueError(f"unknown learner dtype {dtype!r}; known: {sorted(LEARNER_DTYPES)}")
    return LEARNER_DTYPES[dtype]


def init_distributed(backend: str | None = None) -> str:
    """Join the default process group (idempotent). backend: None = NCCL on GPU, gloo on CPU."""
    import deepspeed

    backend = backend or ("nccl" if on_gpu() else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown process-group backend {backend!r}; known: ['gloo', 'nccl']")
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return backend


def build_ds_config(
    *,
    zero_stage: int,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    adam_eps: float,
    grad_clip: float,
    micro_batch_size: int,
    world_size: int,
    dtype: torch.dtype,
    hidden_size: int | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict. Gradient accumulation starts at 1 and is set per step.

    dtype bfloat16 turns on DeepSpeed's bf16 mode: bf16 weights, activations and gradients, fp32
    master weights in the optimizer. hidden_size: the model's width; under ZeRO-3 it sizes the
    communication buckets (`zero3_bucket_sizes`) instead of DeepSpeed's fixed defaults.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    zero: dict[str, Any] = {"stage": zero_stage}
    if zero_stage == 3 and hidden_size:
        zero.update(zero3_bucket_sizes(hidden_size))
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_size * world_size,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": lr,
                "betas": list(betas),
                "eps": adam_eps,
                "weight_decay": weight_decay,
                # torch's AdamW (foreach kernels on GPU): DeepSpeed's own fused (GPU) and CPU Adam are
                # compiled on first use and would need a compiler and, on GPU, the CUDA toolkit (nvcc)
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def zero3_bucket_sizes(hidden_size: int) -> dict[str, int]:
    """ZeRO-3 buffer sizes (elements) from the model width h.

    transformers' "auto" values: reduce_bucket_size h², stage3_prefetch_bucket_size 0.9·h²,
    stage3_param_persistence_threshold 10·h; and stage3_max_live_parameters =
    stage3_max_reuse_distance = 10·h² (about one decoder layer). Why: DeepSpeed's defaults are sized
    for no model in particular: its gradient bucket (5e8 elements) fills up to the whole gradient of
    a smaller model, and with 1e9 live parameters and reuse distance a forward leaves the whole
    model gathered on every rank until the backward, which a lean learner must not hold
    (docs/design.md#lean-learners-under-zero-3).
    """
    if hidden_size < 1:
        raise ValueError(f"hidden_size must be >= 1, got {hidden_size}")
    h2 = hidden_size * hidden_size
    return {"reduce_bucket_size": h2, "stage3_prefetch_bucket_size": int(0.9 * h2),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": 10 * h2, "stage3_max_reuse_distance": 10 * h2}


def warmup_lambda(warmup_steps: int, decay_steps: int = 0, min_ratio: float = 0.0):
    """LR factor: linear from 1/warmup to 1 over the first `warmup_steps` updates, then 1, or with
    `decay_steps` > 0 a cosine from 1 down to `min_ratio` at update `decay_steps` (flat after).

    (DeepSpeed's WarmupLR starts at exactly 0, wasting the first update.) Why a decay: at a
    constant lr, steps 100-200 of a small synthetic task's run gave back the generator's held-out
    gain; with the cosine over 200 steps it stayed where it was (measured on the example task,
    docs/reports/). Formula: docs/design.md#learning-rate-schedule.
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if decay_steps < 0 or (decay_steps and decay_steps <= warmup_steps):
        raise ValueError(f"decay_steps must be 0 (no decay) or > warmup_steps ({warmup_steps}), got {decay_steps}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not decay_steps:
            return 1.0
        cosine = 0.5 * (1 + float(np.cos(np.pi * min(1.0, (step - warmup_steps) / (decay_steps - warmup_steps)))))
        return min_ratio + (1 - min_ratio) * cosine

    return factor


def initialize_engine(
    model: torch.nn.Module, ds_config: dict[str, Any], warmup_steps: int, decay_steps: int = 0, min_lr_ratio: float = 0.0
):
    """`deepspeed.initialize` over the trainable parameters with the `warmup_lambda` schedule."""
    import deepspeed

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_lambda(warmup_steps, decay_steps, min_lr_ratio))

    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds_config,
                                      lr_scheduler=scheduler)
    return engine


def set_micro_batches(engine, num_micro: int) -> None:
    """Make the next optimizer step happen after `num_micro` backward calls on every rank."""
    if num_micro < 1:
        raise ValueError(f"need at least one micro-batch per rank, got {num_micro}")
    engine.set_train_batch_size(engine.train_micro_batch_size_per_gpu() * engine.dp_world_size * num_micro)


def mark_accumulation_boundary(engine, is_last: bool) -> None:
    """Say whether the next backward/step is the last micro-batch of this update (call before each).

    DeepSpeed otherwise derives the boundary from its running micro-step counter modulo the
    current accumulation count; the learners change that count every step (batches vary with
    stops, dropped groups and chain lengths), so after a step of another size the counter would
    put the update on the wrong micro-batch and carry the rest of the gradient into the next step.
    """
    engine.set_gradient_accumulation_boundary(is_last)


def micro_loss_scale(engine, num_micro: int) -> float:
    """Factor undoing DeepSpeed's 1/gas loss scaling and 1/world gradient averaging.

    A micro-batch loss already divided by the *global* normalizer (tokens, sequences or samples
    over all ranks) times this factor gives the gradient of the full-batch objective.
    """
    return float(num_micro * engine.dp_world_size)


def all_reduce_sum(value: float) -> float:
    return _all_reduce(value, "sum")


def all_reduce_max(value: float) -> float:
    return _all_reduce(value, "max")


@contextlib.contextmanager
def gathered(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Full ZeRO-3 parameters inside the block (collective: every rank must enter); else no-op."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def full_state_dict(module: torch.nn.Module, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Every parameter and persistent buffer as a full CPU tensor (collective under ZeRO-3), layer by layer.

    Non-persistent buffers (e.g. rotary `inv_freq`) are not checkpoint state: loaders such as vLLM's
    refuse them."""
    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        with gathered([p]):
            out[name] = p.detach().to("cpu", dtype or p.dtype).clone()
    for mod_name, mod in module.named_modules():
        for buf_name, b in mod.named_buffers(recurse=False):
            if b is not None and buf_name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{buf_name}" if mod_name else buf_name] = b.detach().to("cpu").clone()
    return out


def save_hf_module(module: torch.nn.Module, out_dir: str | Path, rank: int) -> Path | None:
    """Save as safetensors in HF/diffusers format (collective; rank 0 writes). Returns the dir.

    Raises:
        learners.finite.NonFiniteError: a weight holds NaN or ±inf (on every rank; nothing is written).
    """
    from learners.finite import check_finite_tensors

    state = full_state_dict(module, dtype=None)
    check_finite_tensors(state, f"refusing to save weights to {out_dir}")  # every rank holds the full state
    if rank != 0:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(out), state_dict=state, safe_serialization=True)
    return out


def checkpoint_in_eval(module: torch.nn.Module) -> int:
    """Make transformers' gradient checkpointing run in eval mode too. Returns the layers flagged.

    transformers recomputes a layer in the backward pass only while that layer is in training mode
    (`GradientCheckpointingLayer.__call__`), but the text learner runs in eval mode, so that no
    dropout makes its log-probs differ from the sampler's. So the `training` flag is set on the
    checkpointed layers alone, not on their children: dropout inside them stays off. Call it after
    `gradient_checkpointing_enable()` and after the last `.eval()` of the module. Raises
    `ValueError` when no layer has checkpointing enabled (it would silently do nothing).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    if not layers:
        raise ValueError(f"{type(module).__name__} has no layer with gradient checkpointing enabled; "
                         "call gradient_checkpointing_enable() first or set gradient_checkpointing=false")
    for layer in layers:
        layer.training = True
    return len(layers)


def _all_reduce(value: float, op: str) -> float:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())
