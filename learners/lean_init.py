"""ZeRO-3 lean initialisation: models partitioned from their construction, and a sharded reference.

Design: docs/design.md#lean-learners-under-zero-3.

Why: built the plain way, every rank first holds the whole model (and a second whole copy for the
KL reference, for the whole run) before DeepSpeed partitions the policy. Under ZeRO-3 instead:
- `hf_partitioned_loading(ds_config)`: transformers' `from_pretrained` sees an `HfDeepSpeedConfig`,
  builds the model inside `deepspeed.zero.Init` (each parameter is partitioned as its module is
  created) and copies the checkpoint into the partitions;
- `partitioned_construction(ds_config)` + `load_safetensors_partitioned(module, folder)`: the same
  for a diffusers module built with `from_config`, one checkpoint tensor at a time (gathered,
  written by rank 0, partitioned again);
- `reference_engine(module, ds_config)`: the frozen reference as a second DeepSpeed engine with no
  optimizer, partitioned like the policy and gathered layer by layer in its forward.
Stages 0-2 keep whole parameters on every rank; there these helpers are plain loads.
Every helper here is collective under ZeRO-3 (all ranks call it together).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "is_zero3",
    "hf_partitioned_loading",
    "partitioned_construction",
    "load_safetensors_partitioned",
    "reference_ds_config",
    "reference_engine",
]


def is_zero3(ds_config: dict[str, Any]) -> bool:
    """Whether a DeepSpeed config dict (`ds_engine.build_ds_config`) partitions the parameters."""
    return int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3


@contextlib.contextmanager
def hf_partitioned_loading(ds_config: dict[str, Any]) -> Iterator[None]:
    """transformers' `from_pretrained` inside the block builds and loads ZeRO-3 partitions.

    transformers reads a process-wide weak reference to an `HfDeepSpeedConfig`; it is held for the
    block only, so later loads in the process are plain again. A no-op below ZeRO-3.
    """
    if not is_zero3(ds_config):
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    holder = HfDeepSpeedConfig(dict(ds_config))  # must stay referenced while loading
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del holder


@contextlib.contextmanager
def partitioned_construction(ds_config: dict[str, Any]) -> Iterator[None]:
    """Modules created inside the block hold only this rank's partition (`deepspeed.zero.Init`,
    in the config's dtype: bf16 when `bf16.enabled`). A no-op below ZeRO-3."""
    if not is_zero3(ds_config):
        yield
        return
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)):
        yield


def load_safetensors_partitioned(module: torch.nn.Module, folder: str | Path) -> int:
    """Copy every `*.safetensors` tensor of `folder` into `module` (collective under ZeRO-3).

    A partitioned parameter is gathered, overwritten on rank 0 and partitioned again, one tensor at
    a time, so no rank ever holds the whole model. Buffers are not partitioned: every rank copies
    them. Raises ValueError naming the first missing or unexpected tensor. Returns tensors loaded.
    """
    import torch.distributed as dist
    from safetensors import safe_open

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    seen: set[str] = set()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for name in sorted(fh.keys()):  # the same order on every rank: the gathers pair up
                    if name in params:
                        p = params[name]
                        with _gathered_for_write(p):
                            if rank0 or not hasattr(p, "ds_id"):
                                _copy_checked(p, fh.get_tensor(name), name)
                    elif name in buffers:
                        _copy_checked(buffers[name], fh.get_tensor(name), name)
                    else:
                        raise ValueError(f"{f} holds {name!r}, which {type(module).__name__} does not have")
                    seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"{folder} lacks {len(missing)} parameters of {type(module).__name__}, e.g. {missing[:3]}")
    return len(seen)


def reference_ds_config(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The policy's config without optimizer, clipping or accumulation: for a frozen forward-only
    engine with the same ZeRO stage and dtype."""
    return {
        "train_micro_batch_size_per_gpu": ds_config["train_micro_batch_size_per_gpu"],
        "train_batch_size": ds_config["train_batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": dict(ds_config["zero_optimization"]),
        "bf16": dict(ds_config["bf16"]),
        "steps_per_print": ds_config.get("steps_per_print", 10**9),
        "wall_clock_breakdown": False,
    }


def reference_engine(module: torch.nn.Module, ds_config: dict[str, Any]) -> Any:
    """A frozen reference module under ZeRO-3: a DeepSpeed engine without optimizer over a module
    built partitioned (`hf_partitioned_loading` / `partitioned_construction`); its forward gathers
    each layer's parameters and releases them after. Collective: every rank runs the same forwards."""
    import deepspeed

    if not is_zero3(ds_config):
        raise ValueError("reference_engine is for ZeRO-3 (stage 3); below it keep the module itself")
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=reference_ds_config(ds_config))
    engine.eval()
    return engine


def _gathered_for_write(p: torch.nn.Parameter) -> Any:
    if hasattr(p, "ds_id"):
        import deepspeed

        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)
    return contextlib.nullcontext()


def _copy_checked(target: torch.Tensor, source: torch.Tensor, name: str) -> None:
    if tuple(target.shape) != tuple(source.shape):
        raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(source.shape)}, the module "
                         f"{tuple(target.shape)}")
    target.data.copy_(source)
