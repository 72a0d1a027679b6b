"""ZeRO-3 lean initialisation: models partitioned from their construction, and a sharded reference.

Design: docs/design.md#lean-learners-under-zero-3.

Why: built the plain way, every rank first holds the whole model (and a second whole copy for the
KL reference, for the whole run) before DeepSpeed partitions the policy. Under ZeRO-3 instead:
- `load_pretrained_partitioned(load, build, ds_config)`: every rank builds the model from its config
  inside `deepspeed.zero.Init` (each parameter is partitioned as its module is created); rank 0
  alone loads the checkpoint whole (`from_pretrained`, so transformers' key renames apply) and
  copies it in one parameter at a time. transformers' own ZeRO-3 `from_pretrained` reads the whole
  checkpoint on every rank instead;
- `hf_partitioned_loading(ds_config)`: transformers sees an `HfDeepSpeedConfig`, so a model built
  inside the block is built inside `deepspeed.zero.Init`;
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
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "is_zero3",
    "hf_partitioned_loading",
    "load_pretrained_partitioned",
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


def load_pretrained_partitioned(load: Callable[[], torch.nn.Module], build: Callable[[], torch.nn.Module],
                                ds_config: dict[str, Any], copies: int = 1) -> list[torch.nn.Module]:
    """`copies` models holding the pretrained weights, partitioned from construction under ZeRO-3.

    load: the plain whole load (`from_pretrained` on the CPU: transformers' key renames apply);
    build: the same class built from its config (`from_config`, in the learner's dtype). Under
    ZeRO-3 every rank builds each copy inside `deepspeed.zero.Init` (`hf_partitioned_loading`);
    rank 0 alone runs `load` once and writes each parameter in, in module order (gathered, written
    by rank 0, partitioned again), broadcasts the buffers and the generation config, then frees its
    copy. So while loading rank 0 holds one whole copy plus its partitions, the other ranks their
    partitions plus one gathered parameter. The names are checked before any write: a parameter or
    buffer of the built model that the loaded one lacks, or a shape that differs, raises ValueError
    on every rank. Tied input/output embeddings are tied again and checked. Collective. Below
    ZeRO-3: `load()` per copy.
    """
    if not is_zero3(ds_config):
        return [load() for _ in range(copies)]
    import torch.distributed as dist

    rank0 = dist.get_rank() == 0
    source = load() if rank0 else None
    try:
        models = []
        for _ in range(copies):
            # the random init of the built model (overwritten next) leaves the seeded RNG as it was
            with hf_partitioned_loading(ds_config), torch.random.fork_rng():
                model = build()
            _fill_from_rank0(model, source)
            models.append(model)
    finally:
        del source
        gc.collect()
    return models


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
    built partitioned (`load_pretrained_partitioned` / `partitioned_construction`); its forward gathers
    each layer's parameters and releases them after. Collective: every rank runs the same forwards."""
    import deepspeed

    if not is_zero3(ds_config):
        raise ValueError("reference_engine is for ZeRO-3 (stage 3); below it keep the module itself")
    module.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=module, config=reference_ds_config(ds_config))
    engine.eval()
    return engine


def _fill_from_rank0(model: torch.nn.Module, source: torch.nn.Module | None) -> None:
    """Copy rank 0's `source` into every parameter and buffer of the partitioned `model` (collective)."""
    import deepspeed
    import torch.distributed as dist

    params = list(model.named_parameters())  # tied weights once, the same order on every rank
    buffers = list(model.named_buffers())
    verdict: list[Any] = [None, None]
    if source is not None:
        verdict = [_mismatches(model, source), getattr(source, "generation_config", None)]
    dist.broadcast_object_list(verdict, src=0)  # every rank raises together, none waits in a gather
    if verdict[0]:
        raise ValueError(f"the loaded {type(model).__name__} does not fit the one built from its config: "
                         f"{verdict[0]}")
    tensors = {} if source is None else {**dict(source.named_parameters(remove_duplicate=False)),
                                         **dict(source.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for name, p in params:
            if hasattr(p, "ds_id"):
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    if source is not None:
                        p.data.copy_(tensors[name])
            else:
                _broadcast_from_rank0(p.data, tensors.get(name))
        for name, b in buffers:
            _broadcast_from_rank0(b, tensors.get(name))
    if verdict[1] is not None:
        model.generation_config = verdict[1]
    _retie_embeddings(model)


def _mismatches(model: torch.nn.Module, source: torch.nn.Module) -> str:
    """The built model's names the loaded one lacks, and differing shapes ('' when none)."""
    have = {n: tuple(t.shape) for n, t in [*source.named_parameters(remove_duplicate=False),
                                           *source.named_buffers(remove_duplicate=False)]}
    want = {n: tuple(getattr(t, "ds_shape", t.shape)) for n, t in [*model.named_parameters(),
                                                                   *model.named_buffers()]}
    missing = sorted(set(want) - set(have))
    shapes = [f"{n}: {have[n]} loaded, {s} built" for n, s in want.items() if n in have and have[n] != s]
    out = []
    if missing:
        out.append(f"{len(missing)} names missing from the loaded model: {missing}")
    if shapes:
        out.append(f"{len(shapes)} shapes differ: {shapes}")
    return "; ".join(out)


def _broadcast_from_rank0(target: torch.Tensor, value: torch.Tensor | None) -> None:
    """Rank 0 writes `value` into `target` and sends it to the other ranks (NCCL: through the GPU)."""
    import torch.distributed as dist

    if value is not None:
        target.data.copy_(value)
    wire = target.data.to("cuda") if dist.get_backend() == "nccl" else target.data
    dist.broadcast(wire, src=0)
    if wire is not target.data:
        target.data.copy_(wire)


def _retie_embeddings(model: torch.nn.Module) -> None:
    """A model with `tie_word_embeddings` keeps one output/input embedding matrix (checked)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if not (getattr(config, "tie_word_embeddings", False) or getattr(text_config, "tie_word_embeddings", False)):
        return
    model.tie_weights()
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and out.weight is not inp.weight:
        raise ValueError(f"{type(model).__name__} has tie_word_embeddings but its output embeddings are "
                         "not its input embeddings after tie_weights()")


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
