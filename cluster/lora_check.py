"""Refuse LoRA target_modules that match no module of the model, before any engine starts.

The models are built on the meta device from their config files alone (no weights are read), and
their module names are matched with peft's rule (`learners.lora.unmatched_targets`). Called by
`cluster.config.load_config(check_paths=True)`, which turns the ValueError into a ConfigError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from learners.lora import unmatched_targets

__all__ = ["check_lora_targets", "reasoner_module_names", "generator_module_names"]


def check_lora_targets(cfg: Any) -> None:
    """ValueError naming every `grpo.lora` / `flow_grpo.lora` target_modules entry the model lacks.

    cfg: a `cluster.config.R3Config` whose model paths were checked (`check_model_paths`)."""
    for key, section, path, names_of in (
        ("grpo.lora", cfg.grpo.lora, cfg.models.reasoner.path, reasoner_module_names),
        ("flow_grpo.lora", cfg.flow_grpo.lora, cfg.models.generator.path, generator_module_names),
    ):
        if section.rank == 0:
            continue
        folder = _local_folder(path)
        if not Path(folder).is_dir():  # a dry run elsewhere: nothing to read here
            continue
        missing = unmatched_targets(names_of(folder), section.target_modules)
        if missing:
            raise ValueError(f"{key}.target_modules: {missing} match no module of {path!r}; name its linear "
                              "layers (a module name or its dotted suffix, e.g. q_proj or attn.to_out.0)")


def _local_folder(path: str) -> str:
    """`tiny:<name>` -> its folder (built on first use); else the path, `~` expanded."""
    import os

    if path.startswith("tiny:"):
        from actors.named_models import named_model_path

        return str(named_model_path(path[len("tiny:"):]))
    return os.path.expanduser(path)


def reasoner_module_names(folder: str) -> list[str]:
    """Module names of the reasoner as the text learner builds it (causal LM or image-text-to-text)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(folder)
    cls = AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    return [n for n, _ in model.named_modules()]


def generator_module_names(folder: str) -> list[str]:
    """Module names of the generator's Flux transformer (a pipeline folder or a transformer folder)."""
    import torch
    from diffusers import FluxTransformer2DModel

    path = Path(folder) / "transformer" if (Path(folder) / "transformer").is_dir() else Path(folder)
    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(FluxTransformer2DModel.load_config(str(path)))
    return [n for n, _ in model.named_modules()]
