"""The sizes the memory plan needs, read from a model's config files without its weights.

Each model is built on PyTorch's meta device (tensors with shapes and no storage) from its
`config.json` (transformers `AutoConfig` + `from_config`) or its diffusers folder (`model_index.json`
and each component's `config.json`, `from_config`), so parameters are counted exactly and nothing
is downloaded or allocated: a 72B model takes a few seconds and no memory. `cluster.memory_plan`
does the arithmetic on the returned shapes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LinearShape", "LMShape", "PipelineShape", "lm_shape", "pipeline_shape"]


@dataclass(frozen=True)
class LinearShape:
    """One `nn.Linear` of a model: its dotted module name and (in, out) features (LoRA targets)."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class LMShape:
    """A (vision-)language model as vLLM serves it and a learner trains it.

    params: every parameter (vision tower included), tied weights once.
    layers, hidden, kv_heads, head_dim, vocab: of the language decoder (KV cache, activations).
    largest_layer_params: parameters of the biggest decoder layer (ZeRO-3 gathers one at a time).
    """

    params: int
    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int
    largest_layer_params: int
    linears: tuple[LinearShape, ...]


@dataclass(frozen=True)
class PipelineShape:
    """A FLUX-like diffusers pipeline: the transformer the learner trains plus what workers also load.

    transformer_params / transformer_layers / transformer_hidden: the denoiser (double + single blocks).
    other_params: component name -> parameters (text encoders, VAE), loaded by workers only.
    """

    transformer_params: int
    transformer_layers: int
    transformer_hidden: int
    largest_layer_params: int
    linears: tuple[LinearShape, ...]
    other_params: dict[str, int]

    @property
    def params(self) -> int:
        return self.transformer_params + sum(self.other_params.values())


def lm_shape(folder: str | Path) -> LMShape:
    """Shape of the transformers model whose `config.json` is in `folder` (a VLM when it has a vision_config)."""
    return _lm_shape(str(folder))


def pipeline_shape(folder: str | Path) -> PipelineShape:
    """Shape of the diffusers pipeline in `folder`: its `transformer` and the other model components."""
    return _pipeline_shape(str(folder))


@functools.lru_cache(maxsize=8)  # a plan and its check read the same folders; building a 72B model takes seconds
def _lm_shape(folder: str) -> LMShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    layers = _decoder_layers(model)
    return LMShape(
        params=_count(model), layers=text.num_hidden_layers, hidden=text.hidden_size,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, vocab=text.vocab_size,
        largest_layer_params=max((_count(layer) for layer in layers), default=0), linears=_linears(model),
    )


@functools.lru_cache(maxsize=8)
def _pipeline_shape(folder: str) -> PipelineShape:
    import torch
    import transformers
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text())
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(root / "transformer"))
        other: dict[str, int] = {}
        for name, entry in index.items():
            if name.startswith("_") or name == "transformer" or not isinstance(entry, list) or entry[0] is None:
                continue
            library, class_name = entry
            if library == "transformers" and class_name.endswith("Model") and (root / name / "config.json").is_file():
                cls = getattr(transformers, class_name)
                other[name] = _count(cls(cls.config_class.from_pretrained(root / name)))
            elif library == "diffusers" and class_name == "AutoencoderKL":
                other[name] = _count(AutoencoderKL.from_config(AutoencoderKL.load_config(root / name)))
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    cfg = transformer.config
    return PipelineShape(
        transformer_params=_count(transformer), transformer_layers=len(blocks),
        transformer_hidden=cfg.num_attention_heads * cfg.attention_head_dim,
        largest_layer_params=max((_count(b) for b in blocks), default=0), linears=_linears(transformer),
        other_params=other,
    )


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _linears(module) -> tuple[LinearShape, ...]:
    from torch import nn

    return tuple(LinearShape(name, m.in_features, m.out_features)
                 for name, m in module.named_modules() if isinstance(m, nn.Linear))


def _decoder_layers(model) -> list:
    """The language decoder's layers: the longest `ModuleList` named `layers` (the vision tower's are `blocks`)."""
    from torch import nn

    lists = [m for name, m in model.named_modules() if name.endswith("layers") and isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []
