"""GPU memory arithmetic of the roles: learners under ZeRO, vLLM engines' KV cache, activations.

Pure functions of counts and sizes (no torch, no Ray), each formula in one place; the numbers come
from `cluster.model_shapes` and the config (`cluster.launch_plan`). All results are bytes.

Learner (mixed precision as in the ZeRO paper, Rajbhandari et al. 2020): the weights in the learner
dtype (2 bytes bf16, 4 fp32), gradients of the trained parameters in the same dtype, and Adam's
state: an fp32 master copy plus two fp32 moments (12 bytes per trained parameter; 8 in fp32 training
below ZeRO-3, whose weights are the master copy; ZeRO-3 keeps its own fp32 partition even then, as
measured on a DeepSpeed learner). ZeRO stage 1 shards the optimizer state over the data-parallel
ranks, stage 2 the gradients too, stage 3 the weights too (plus a gathered working set of about two
layers: the one computed and the one prefetched). A reference model for the KL term is a second
copy of the weights, sharded like them under ZeRO-3 (a frozen DeepSpeed engine, `learners.lean_init`)
and whole below it; with LoRA the base model with its adapters off is the reference, at no extra cost,
but rank 0 keeps a merged copy (base + scaled B A) of every adapted layer for the weight sync
(`learners.lora.LoraAdapters`: the workers receive merged weights). Activations per transformer layer follow Korthikanti et al. 2022 ("Reducing
Activation Recomputation in Large Transformer Models") with flash attention: 34 * tokens * hidden
bytes in 16-bit; with gradient checkpointing only each layer's input (2 * tokens * hidden) is kept,
plus one layer recomputed at a time.

vLLM engine: weights split over the tensor-parallel GPUs; the KV cache gets
`gpu_memory_utilization * GPU memory - weights` (vLLM also sets aside its profiled activation peak,
left out here) and holds `budget / (2 * layers * kv_heads_per_gpu * head_dim * dtype bytes)` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

__all__ = [
    "GB", "DTYPE_BYTES", "ACTIVATION_BYTES_PER_TOKEN_HIDDEN", "CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN",
    "LearnerSetup", "MemoryEstimate", "learner_memory", "optimizer_bytes_per_param", "layer_activation_bytes",
    "activation_bytes", "logits_bytes", "lora_params", "lora_adapted_params", "kv_bytes_per_token", "kv_cache_budget",
    "engine_memory", "EngineEstimate",
]

GB = 1e9  # plans print decimal gigabytes, as GPU data sheets do (an "80 GB" H100 holds 80e9 bytes)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ACTIVATION_BYTES_PER_TOKEN_HIDDEN = 34  # one layer's saved activations, 16-bit, flash attention
CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN = 2  # one layer's input, 16-bit, kept under gradient checkpointing


@dataclass(frozen=True)
class LearnerSetup:
    """What a learner rank holds. params: every parameter of the trained module; trainable: those the
    optimizer updates (all, or the LoRA adapters' when `lora`); dp: data-parallel degree (the role's
    learner count); activations: bytes of saved activations on one rank (`activation_bytes` + `logits_bytes`);
    merged_params: with `lora`, the base weights of the adapted layers (`lora_adapted_params`), whose merged
    copies rank 0 keeps for the sync."""

    params: int
    trainable: int
    weight_bytes: int
    zero_stage: int
    dp: int
    reference: bool
    lora: bool
    largest_layer_params: int
    activations: float
    merged_params: int = 0


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU by part (ordered as printed) and their total."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def optimizer_bytes_per_param(weight_bytes: int, zero_stage: int) -> int:
    """Adam state per trained parameter: fp32 master + 2 moments (12), or the 2 moments alone (8) when
    fp32 weights serve as the master copy (fp32 training below ZeRO-3)."""
    return 8 if weight_bytes >= 4 and zero_stage < 3 else 12


def learner_memory(s: LearnerSetup) -> MemoryEstimate:
    """Per-GPU bytes of one learner rank (see the module docstring for each term)."""
    if s.dp < 1 or s.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"dp={s.dp} must be >= 1 and zero_stage={s.zero_stage} in 0..3")
    weights = s.params * s.weight_bytes + (s.trainable * s.weight_bytes if s.lora else 0)
    parts = {
        "weights": weights / (s.dp if s.zero_stage >= 3 else 1),
        "gradients": s.trainable * s.weight_bytes / (s.dp if s.zero_stage >= 2 else 1),
        "optimizer": (s.trainable * optimizer_bytes_per_param(s.weight_bytes, s.zero_stage)
                      / (s.dp if s.zero_stage >= 1 else 1)),
        "reference": (s.params * s.weight_bytes / (s.dp if s.zero_stage >= 3 else 1)
                      if s.reference and not s.lora else 0.0),
        "zero3_gather": 2 * s.largest_layer_params * s.weight_bytes if s.zero_stage >= 3 and s.dp > 1 else 0.0,
        "activations": float(s.activations),
        "lora_merged": float(s.merged_params * s.weight_bytes) if s.lora else 0.0,  # rank 0's, the largest rank
    }
    return MemoryEstimate(parts)


def layer_activation_bytes(tokens: int, hidden: int, act_bytes: int = 2) -> float:
    """Saved activations of one transformer layer for `tokens` (batch x sequence) tokens."""
    return ACTIVATION_BYTES_PER_TOKEN_HIDDEN * tokens * hidden * act_bytes / 2


def activation_bytes(tokens: int, hidden: int, layers: int, checkpointing: bool, act_bytes: int = 2) -> float:
    """Saved activations of a `layers`-deep stack for one micro-batch of `tokens` tokens in all.

    Without checkpointing every layer keeps 34*t*h (16-bit); with it each keeps its 2*t*h input and
    one layer at a time is recomputed in full."""
    if not checkpointing:
        return layers * layer_activation_bytes(tokens, hidden, act_bytes)
    kept = layers * CHECKPOINTED_BYTES_PER_TOKEN_HIDDEN * tokens * hidden * act_bytes / 2
    return kept + layer_activation_bytes(tokens, hidden, act_bytes)


def logits_bytes(batch: int, answer_tokens: int, vocab: int) -> float:
    """fp32 logits of the answer tokens and their gradient (the learners score answers in fp32)."""
    return 2 * batch * answer_tokens * vocab * 4


def lora_params(linears: Iterable[tuple[str, int, int]], rank: int, target_modules: Sequence[str] | str) -> int:
    """Adapter parameters: rank * (in + out) for each targeted `(name, in, out)` linear.

    Targets match as in peft: a module whose dotted name equals a target or ends with "." + target;
    "all-linear" targets every linear but the output layer (`lm_head`, `proj_out`)."""
    if rank < 1:
        raise ValueError(f"LoRA rank {rank} must be >= 1")
    return sum(rank * (fan_in + fan_out) for name, fan_in, fan_out in linears if _targeted(name, target_modules))


def lora_adapted_params(linears: Iterable[tuple[str, int, int]], target_modules: Sequence[str] | str) -> int:
    """Base weights of the layers LoRA adapts: in * out for each targeted `(name, in, out)` linear
    (targets as in `lora_params`)."""
    return sum(fan_in * fan_out for name, fan_in, fan_out in linears if _targeted(name, target_modules))


def _targeted(name: str, target_modules: Sequence[str] | str) -> bool:
    if target_modules == "all-linear":
        return name.rsplit(".", 1)[-1] not in ("lm_head", "proj_out")
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return any(name == t or name.endswith("." + t) for t in targets)


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, tensor_parallel: int, dtype_bytes: int) -> int:
    """KV cache bytes of one token on one GPU: a key and a value per layer for this GPU's KV heads
    (vLLM replicates KV heads when the tensor-parallel size exceeds their number)."""
    heads_per_gpu = max(1, math.ceil(kv_heads / tensor_parallel))
    return 2 * layers * heads_per_gpu * head_dim * dtype_bytes


def kv_cache_budget(gpu_bytes: float, utilization: float, weights_per_gpu: float) -> float:
    """What vLLM leaves for the KV cache on one GPU (negative: the weights alone exceed its share)."""
    return utilization * gpu_bytes - weights_per_gpu


@dataclass(frozen=True)
class EngineEstimate:
    """A vLLM engine on one of its GPUs: weights, KV budget and the tokens it holds (None: GPU memory unknown)."""

    weights: float
    kv_budget: float | None
    kv_tokens: int | None
    bytes_per_token: int


def engine_memory(params: int, dtype_bytes: int, tensor_parallel: int, layers: int, kv_heads: int, head_dim: int,
                  utilization: float, gpu_bytes: float | None) -> EngineEstimate:
    """Per-GPU weights of a vLLM engine and, when the GPU's memory is known, its KV budget in bytes and tokens."""
    weights = params * dtype_bytes / tensor_parallel
    per_token = kv_bytes_per_token(layers, kv_heads, head_dim, tensor_parallel, dtype_bytes)
    if gpu_bytes is None:
        return EngineEstimate(weights, None, None, per_token)
    budget = kv_cache_budget(gpu_bytes, utilization, weights)
    return EngineEstimate(weights, budget, max(0, int(budget // per_token)), per_token)
