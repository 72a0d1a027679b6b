"""LoRA adapters on a learner's model (peft): training, the reference policy, merged weights for the sync.

Design: docs/design.md#lora.

Why: with rank r adapters on the attention projections only the adapters (and their AdamW state)
are trained and held by the optimizer; the frozen base doubles as the KL reference (the same
module with its adapters switched off, no second copy); and a weight sync after the first one
sends only the layers the adapters change.

Pieces:
- `merged_weight` / `lora_scale` / `unmatched_targets`: the pure math and name matching.
- `LoraAdapters.apply(model, ...)`: `peft.inject_adapter_in_model` into the model in place (the
  model keeps its transformers / diffusers class and its parameter names, except that an adapted
  layer `<path>` holds `<path>.base_layer.weight` and `<path>.lora_{A,B}.default.weight`); only
  the adapters stay trainable.
- `LoraAdapters.forward_of(module, reference)`: what a learner calls for a policy or a reference
  forward (`AdaptersOff`; dropout on the adapters' input only in gradient forwards).
- `LoraAdapters.sync_tensors(module, changed_only)`: the weights in the workers' names (those of
  the un-wrapped model): each adapted layer's weight is W + (alpha/r)·B·A, refreshed in place by
  `refresh_merged` before every transfer. `changed_only` = the adapted layers plus the other
  parameters of their parent modules, so a fused layer of the receiver (vLLM's qkv_proj) gets
  every part in one reload; everything else never changes and is sent only in a full sync.
- `save_adapters` / `load_adapters` / `merge_into_state`: the adapter files of a checkpoint
  (`lora.json` + `adapters.safetensors`) and the merge the export command applies to a base.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["LORA_CONFIG", "LORA_WEIGHTS", "lora_rank_of", "lora_scale", "merged_weight", "unmatched_targets", "unwrapped_name",
           "AdaptersOff", "LoraAdapters", "merge_into_state", "read_lora_config", "is_adapter_folder"]

LORA_CONFIG = "lora.json"
LORA_WEIGHTS = "adapters.safetensors"
_ADAPTER = "default"  # peft's adapter name


# ---- pure functions ---------------------------------------------------------------------------
def lora_rank_of(settings: dict[str, Any] | None) -> int:
    """The rank of a learner's `lora` settings (0 or None = no adapters)."""
    return int((settings or {}).get("rank", 0) or 0)


def lora_scale(rank: int, alpha: float) -> float:
    """peft's (non-rsLoRA) scaling of the adapter product: alpha / rank."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    return float(alpha) / float(rank)


def merged_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale·B·A: the weight of a linear layer with its adapter folded in.

    base (out, in), lora_a (r, in), lora_b (out, r) -> (out, in), in base's dtype; the product is
    taken in fp32 (at least) so a bf16 base does not lose the small update before it is added.
    """
    if lora_a.shape[0] != lora_b.shape[1] or base.shape != (lora_b.shape[0], lora_a.shape[1]):
        raise ValueError(f"LoRA shapes do not fit: base {tuple(base.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)} (want base (out, in), A (r, in), B (out, r))")
    work = torch.promote_types(base.dtype, torch.float32)
    delta = (lora_b.to(work) @ lora_a.to(work)) * scale
    return (base.to(work) + delta).to(base.dtype)


def target_matches(module_name: str, pattern: str) -> bool:
    """peft's rule for a string entry of target_modules: the whole name, or its dotted suffix."""
    return module_name == pattern or module_name.endswith("." + pattern)


def unmatched_targets(module_names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The patterns of `patterns` that name no module of `module_names` (in the given order)."""
    return [p for p in patterns if not any(target_matches(n, p) for n in module_names)]


def unwrapped_name(param_name: str) -> str:
    """The name a parameter had before adapters were injected: `a.q_proj.base_layer.weight` -> `a.q_proj.weight`."""
    return param_name.replace(".base_layer.", ".")


# ---- forwards ---------------------------------------------------------------------------------
def _lora_layers(module: torch.nn.Module) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in module.named_modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(module: torch.nn.Module) -> Iterator[None]:
    """The base model inside the block. peft's own `enable_adapters(False)` also flips the adapters'
    requires_grad, which must not happen between a policy forward and its backward (the reference
    forward of the KL runs there), so only the layers' disable flag is set."""
    layers = [m for _, m in _lora_layers(module)]
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


@contextlib.contextmanager
def adapter_dropout(module: torch.nn.Module, active: bool) -> Iterator[None]:
    """Dropout on the adapters' input switched on for the block (the rest of the model stays as it is)."""
    drops = [d for _, m in _lora_layers(module) for d in m.lora_dropout.values()] if active else []
    for d in drops:
        d.train(True)
    try:
        yield
    finally:
        for d in drops:
            d.train(False)


class AdaptersOff:
    """Calls `module` with its adapters off: the reference policy of a LoRA learner. Attributes
    (`config`, `dtype`, ...) are the module's."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), adapters_disabled(self.module):
            return self.module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)


class _DropoutInGradForwards:
    """Calls `engine`, with adapter dropout on when gradients are being recorded (the policy forward
    of `train_step`); scoring forwards stay deterministic (ratio 1 before an update)."""

    def __init__(self, engine: Any, module: torch.nn.Module):
        self.engine, self.module = engine, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with adapter_dropout(self.module, torch.is_grad_enabled()):
            return self.engine(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)


# ---- the adapters of one learner --------------------------------------------------------------
class LoraAdapters:
    """Adapters injected into one model, and the merged view of it that the workers receive."""

    def __init__(self, rank: int, alpha: float, dropout: float, target_modules: Sequence[str]):
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        if not target_modules:
            raise ValueError("LoRA target_modules is empty; name the linear layers to adapt, e.g. ['q_proj', 'v_proj']")
        self.rank, self.alpha, self.dropout = int(rank), float(alpha), float(dropout)
        self.target_modules = [str(t) for t in target_modules]
        self.scale = lora_scale(self.rank, self.alpha)
        self._shadows: dict[str, torch.Tensor] = {}  # un-wrapped weight name -> merged weight (rank 0)
        self._layers: list[tuple[str, Any]] = []

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "target_modules": self.target_modules}

    @classmethod
    def apply(cls, model: torch.nn.Module, rank: int, alpha: float, dropout: float = 0.0,
              target_modules: Sequence[str] = (), seed: int = 0) -> LoraAdapters:
        """Inject adapters into `model` in place (B = 0: the adapted model equals the base); freeze the rest.

        A is drawn from `seed` alone (the global RNG is left as it was), so every rank and every
        way of loading the base (whole, or partitioned under ZeRO-3) starts from the same adapters.

        Raises:
            ValueError: a target_modules entry that matches no module of `model` (named), or one
                that matches a module peft cannot adapt.
        """
        from peft import LoraConfig, inject_adapter_in_model

        self = cls(rank, alpha, dropout, target_modules)
        names = [n for n, _ in model.named_modules()]
        missing = unmatched_targets(names, self.target_modules)
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ValueError(f"LoRA target_modules {missing} match no module of {type(model).__name__}; "
                             f"its linear layers end in {linear}")
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            target_modules=list(self.target_modules), bias="none")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
        self._layers = _lora_layers(model)
        for _, layer in self._layers:  # new modules start in training mode: dropout only in gradient forwards
            layer.lora_dropout.eval()
        return self

    def forward_of(self, engine: Any, module: torch.nn.Module, reference: bool) -> Any:
        """The callable for a policy forward (`engine`) or a reference forward (`module`, adapters off)."""
        if reference:
            return AdaptersOff(module)
        return _DropoutInGradForwards(engine, module) if self.dropout > 0 else engine

    # ---- merged weights ------------------------------------------------------------------------
    def sync_tensors(self, module: torch.nn.Module, changed_only: bool, rank: int) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) in the un-wrapped model's names and order; adapted weights are the merged
        shadows (filled by `refresh_merged`; meta tensors of the full shape on ranks other than 0,
        which only join the gathers). changed_only: the adapted layers' parent modules only."""
        adapted = {f"{path}.weight": layer for path, layer in self._layers}
        parents = tuple(path.rsplit(".", 1)[0] + "." for path, _ in self._layers)
        out = []
        for name, p in module.named_parameters():
            if ".lora_" in name:
                continue
            plain = unwrapped_name(name)
            if changed_only and not plain.startswith(parents):
                continue
            if plain in adapted:
                p = self._shadow(plain, p, rank)
            out.append((plain, p))
        return out

    def _shadow(self, name: str, base: torch.Tensor, rank: int) -> torch.Tensor:
        if name not in self._shadows:
            shape = tuple(base.ds_shape) if hasattr(base, "ds_shape") else tuple(base.shape)
            device = base.device if rank == 0 else "meta"
            self._shadows[name] = torch.empty(shape, dtype=base.dtype, device=device)
        return self._shadows[name]

    def refresh_merged(self, rank: int) -> None:
        """Recompute every adapted layer's merged weight into its shadow (collective under ZeRO-3:
        each layer's base weight and adapters are gathered on every rank, rank 0 writes)."""
        from learners.ds_engine import gathered

        for path, layer in self._layers:
            base, a, b = layer.base_layer.weight, layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
            with gathered([base, a, b]), torch.no_grad():
                if rank == 0:
                    shadow = self._shadow(f"{path}.weight", base, rank)
                    shadow.copy_(merged_weight(base.data, a.data, b.data, self.scale))

    def merged_state_dict(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The un-wrapped model's parameters with the adapters merged, full fp32 CPU tensors, on every
        rank (collective under ZeRO-3). For checks and tests: the sync reads `sync_tensors`."""
        from learners.ds_engine import gathered

        layers = dict(self._layers)
        out = {}
        for name, p in module.named_parameters():
            if ".lora_" in name:
                continue
            plain = unwrapped_name(name)
            layer = layers.get(plain.removesuffix(".weight")) if plain.endswith(".weight") else None
            if layer is None:
                with gathered([p]):
                    out[plain] = p.detach().to("cpu", torch.float32).clone()
                continue
            a, b = layer.lora_A[_ADAPTER].weight, layer.lora_B[_ADAPTER].weight
            with gathered([p, a, b]), torch.no_grad():
                out[plain] = merged_weight(p.data, a.data, b.data, self.scale).to("cpu", torch.float32)
        return out

    # ---- files ---------------------------------------------------------------------------------
    def adapter_state(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The adapters' parameters under the module's own names (collective under ZeRO-3), full CPU tensors."""
        from learners.ds_engine import gathered

        out = {}
        for name, p in module.named_parameters():
            if ".lora_" in name:
                with gathered([p]):
                    out[name] = p.detach().to("cpu").clone()
        return out

    def save_adapters(self, module: torch.nn.Module, out_dir: str | Path, rank: int, base_path: str) -> Path | None:
        """`lora.json` (rank, alpha, dropout, targets, base) + `adapters.safetensors` (rank 0 writes;
        collective under ZeRO-3).

        Raises:
            learners.finite.NonFiniteError: an adapter weight holds NaN or ±inf (nothing is written).
        """
        from safetensors.torch import save_file

        from learners.finite import check_finite_tensors

        state = self.adapter_state(module)
        check_finite_tensors(state, f"refusing to save LoRA adapters to {out_dir}")
        if rank != 0:
            return None
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / LORA_WEIGHTS))
        (out / LORA_CONFIG).write_text(json.dumps({**self.to_json(), "base_model": str(base_path)}, indent=2))
        return out


def is_adapter_folder(folder: str | Path) -> bool:
    """True when `folder` holds LoRA adapters (`save_adapters`), not full weights."""
    return (Path(folder) / LORA_CONFIG).is_file()


def read_lora_config(folder: str | Path) -> dict[str, Any]:
    return json.loads((Path(folder) / LORA_CONFIG).read_text())


def merge_into_state(base: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor],
                     scale: float) -> dict[str, torch.Tensor]:
    """The base model's state with every adapter of `adapters` (module names with
    `.lora_A.default.weight` / `.lora_B.default.weight`) merged into its layer's `.weight`.

    Raises:
        ValueError: an adapter whose layer the base lacks, or an A without its B.
    """
    out = dict(base)
    suffix_a, suffix_b = f".lora_A.{_ADAPTER}.weight", f".lora_B.{_ADAPTER}.weight"
    paths = sorted(n[: -len(suffix_a)] for n in adapters if n.endswith(suffix_a))
    if len(paths) * 2 != len(adapters):
        raise ValueError(f"adapter file holds {len(adapters)} tensors, expected an A and a B for each of {len(paths)} layers")
    for path in paths:
        key = f"{path}.weight"
        if key not in out or f"{path}{suffix_b}" not in adapters:
            raise ValueError(f"adapter for {path!r} does not fit the base model (no {key!r} or no lora_B)")
        out[key] = merged_weight(out[key], adapters[f"{path}{suffix_a}"], adapters[f"{path}{suffix_b}"], scale)
    return out
