"""A learner rank's full training state, saved and restored without pickle, for exact resume.

Runs inside each learner actor (the driver calls these through `actor.__ray_call__`): every rank
writes its own optimizer partition; rank 0 also writes the full module weights in HF / diffusers
safetensors format. State: module weights, fp32 master partitions, the inner AdamW state, the LR
schedule, DeepSpeed's step counters, the learner's version, the torch RNG and, for the generator, its
EMA and the snapshots of the weights its pending rollouts were drawn with (`extra_state`). Weights with NaN or
±inf are never written, and neither they nor such master partitions are ever loaded
(`learners.finite.NonFiniteError`, naming the tensor).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from learners.finite import check_finite_tensors
from learners.lora import is_adapter_folder, read_lora_config
from rollout.state_io import load_tree, save_tree

__all__ = ["save_learner_state", "load_learner_state", "parameters_sha256"]

_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")


def save_learner_state(learner: Any, directory: str) -> str:
    """Collective (ZeRO-3 gathers): call on every rank with the same `directory`.

    Raises:
        learners.finite.NonFiniteError: a weight holds NaN or ±inf, on every rank (each checks the full
            weights it gathered); nothing of the checkpoint is committed.
    """
    root = Path(directory)
    rank_dir = root / f"rank-{learner.rank}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    learner.save(str(root / "weights"))  # rank 0 writes, all ranks join the gathers; refuses non-finite weights
    if getattr(learner, "ema", None) is not None:  # the weights evaluation uses (cluster.eval loads them)
        learner.save_ema_weights(str(root / "ema_weights"))
    engine = learner.engine
    opt = engine.optimizer
    state: dict[str, Any] = {
        "master": [t.detach().clone() for t in _master_partitions(opt)],
        "inner": _inner_optimizer(opt).state_dict(),
        "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "counters": {k: int(getattr(engine, k, 0) or 0) for k in _COUNTERS},
        "version": int(learner.version),
        "torch_rng": torch.get_rng_state(),
    }
    if hasattr(learner, "extra_state"):  # the generator's EMA and rollout-policy snapshots (learners.image_updates)
        state["extra"] = learner.extra_state()
    save_tree(_drop_callables(state), rank_dir)
    return str(rank_dir)


def load_learner_state(learner: Any, directory: str) -> int:
    """Restore what `save_learner_state` wrote into an engine built with the same config; returns the version."""
    root = Path(directory)
    state = load_tree(root / f"rank-{learner.rank}")
    engine = learner.engine
    _check_lora_settings(learner, root / "weights")
    _load_module_weights(engine.module, root / "weights")  # collective under ZeRO-3; refuses non-finite weights
    # this rank's own partitions, checked after the last collective so a refusal cannot leave others waiting
    check_finite_tensors({f"master partition {i}": t for i, t in enumerate(state["master"])},
                         f"refusing to load {root / f'rank-{learner.rank}'}")
    opt = engine.optimizer
    for dst, src in zip(_master_partitions(opt), state["master"], strict=True):
        if dst.shape != src.shape:
            raise ValueError(f"checkpoint partition shape {tuple(src.shape)} != engine's {tuple(dst.shape)}: "
                             "resume with the same learner count and ZeRO stage")
        dst.data.copy_(src)
    _inner_optimizer(opt).load_state_dict(state["inner"])
    if state["scheduler"] is not None:
        sched = state["scheduler"]
        sched.pop("lr_lambdas", None)
        engine.lr_scheduler.load_state_dict({**engine.lr_scheduler.state_dict(), **sched})
    for k, v in state["counters"].items():
        setattr(engine, k, v)
    learner.version = int(state["version"])
    if hasattr(learner, "load_extra_state"):
        learner.load_extra_state(state.get("extra"))
    torch.set_rng_state(state["torch_rng"])
    return learner.version


def parameters_sha256(learner: Any) -> str:
    """Bitwise fingerprint of the trained parameters (names and raw bytes; collective under ZeRO-3)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(learner.full_state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _master_partitions(opt: Any) -> list[torch.Tensor]:
    """fp32 master weights: ZeRO-1/2 and ZeRO-3 keep flat partitions; plain optimizers have none."""
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return []


def _inner_optimizer(opt: Any) -> Any:
    return getattr(opt, "optimizer", opt) if _master_partitions(opt) else opt


def _load_module_weights(module: torch.nn.Module, weights_dir: Path) -> None:
    from safetensors.torch import load_file

    files = sorted(weights_dir.rglob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights under {weights_dir}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(f))
        check_finite_tensors(part, f"refusing to load checkpoint weights {f}")
        state.update(part)
    params = dict(module.named_parameters())
    if is_adapter_folder(weights_dir):  # LoRA: the adapters alone; the frozen base is the model path's
        params = {n: p for n, p in params.items() if ".lora_" in n}
    missing = [n for n in params if n not in state]
    if missing:
        raise ValueError(f"checkpoint {weights_dir} lacks {len(missing)} parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            if getattr(p, "ds_numel", None) is not None and p.numel() == 0:  # ZeRO-3 partition
                import deepspeed

                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.data.copy_(state[name].to(p.dtype))
            else:
                p.data.copy_(state[name].to(p.dtype))


def _check_lora_settings(learner: Any, weights_dir: Path) -> None:
    """A LoRA checkpoint resumes only into a learner with the same adapters, and a full one only without."""
    saved = read_lora_config(weights_dir) if is_adapter_folder(weights_dir) else None
    own = learner.lora.to_json() if getattr(learner, "lora", None) is not None else None
    if saved is None and own is None:
        return
    if saved is None or own is None or any(saved[k] != own[k] for k in own):
        raise ValueError(f"checkpoint {weights_dir} holds {'LoRA adapters ' + str(saved) if saved else 'full weights'}, "
                         f"but the learner trains {'LoRA adapters ' + str(own) if own else 'full weights'}: resume "
                         "with the same grpo.lora / flow_grpo.lora settings")


def _drop_callables(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _drop_callables(v) for k, v in tree.items() if not callable(v)}
    if isinstance(tree, list):
        return [None if callable(v) else _drop_callables(v) for v in tree]
    return tree
